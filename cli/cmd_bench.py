"""`spofa bench`: parse options into `BenchOptions`, call `export.bench.run.run_bench` (which plans, shows the
plan as log records, and measures), print the table (`cli.bench_table`).

A new option is a field of `BenchOptions` (or `TimingOptions`), a parameter here, and one keyword in `bench`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o


def bench(
    artifact: Annotated[Path, typer.Argument(help="student.engine, student.onnx, student.pt2, student.safetensors, or a run folder.")],
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher to compare with (.safetensors, .onnx or .engine); default: the run's teacher_file.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data spec for accuracy (default: the one in the metadata).")] = None,
    backends: Annotated[str, typer.Option("--backend", help="auto | trt | ort-cuda | ort-cpu | aoti | torch-eager | torch-compile | torch-cudagraph (comma list allowed).")] = "auto",
    batch_sizes: Annotated[Optional[str], typer.Option("--batch", show_default=False, help=(
        "Batch sizes, comma separated (default: 1 and a large batch the artifact accepts: 256 on a GPU, 64 on CPU)."))] = None,
    precisions: Annotated[Optional[str], typer.Option("--precision", help="fp32 | bf16 | fp16 for PyTorch backends (comma list); ONNX/engines keep their export precision.")] = None,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up time per measurement (s).")] = 1.0,
    min_s: Annotated[float, typer.Option("--min-s", help="Minimum timed seconds per model and batch size.")] = 3.0,
    min_iters: Annotated[int, typer.Option("--min-iters", help="Minimum timed iterations per model and batch size.")] = 50,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved student/teacher rounds per batch size.")] = 3,
    max_val: Annotated[Optional[int], typer.Option("--max-val", help="Evaluate on a stratified subset of N validation images.")] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="Latency only.")] = False,
    teacher_backend: Annotated[Optional[str], typer.Option("--teacher-backend", help="Backend of the teacher (default: the student's; an exported student's teacher is exported the same way, cached beside it).")] = None,
    threads: o.Threads = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every figure and the machine to this JSON file.")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write an accuracy-vs-latency PNG.")] = None,
    device: o.Device = "auto",
    trust_engine: Annotated[bool, typer.Option("--trust", help="Run files you vouch for: a TensorRT engine or .pt2 package without a sidecar, or any file whose bytes differ from the SHA-256 its sidecar recorded (only files you built).")] = False,
    others: Annotated[Optional[list[Path]], typer.Option("--with", show_default=False, help=(
        "Another file of the same student (e.g. student.int8.onnx, student.qat.int8.onnx), benched beside ARTIFACT on "
        "the same images, with its top-1 agreement with the fp32 student."))] = None,
) -> None:
    """Latency (GPU compute and host) and accuracy of a student beside its teacher."""
    from cli.bench_table import print_report
    from export.bench.plan import BenchOptions
    from export.bench.run import run_bench
    from export.bench.timing import TimingOptions
    from export.bench.variants import BACKENDS

    options = BenchOptions(
        data=data, backends=o.comma_list(backends, "--backend", choices=BACKENDS, noun="backend"),
        batch_sizes=o.comma_list(batch_sizes, "--batch", of=int, positive=True) if batch_sizes else None,
        precisions=o.comma_list(precisions, "--precision") if precisions else None,
        timing=TimingOptions(warmup_s=warmup_s, min_s=min_s, min_iters=min_iters, rounds=rounds),
        max_val=max_val, device=device, teacher_backend=teacher_backend, accuracy=not no_accuracy,
        trust_engine=trust_engine, threads=threads, json_path=json_path, plot_path=plot_path, others=others or ())

    report = run_bench(artifact, teacher=teacher, options=options)
    print_report(report)
    students = [r for r in report.results if r.role == "student"]
    if students and not any(r.status == "ok" for r in students):
        from spofa_deploy.errors import MissingDependency

        reasons = "; ".join(sorted({r.reason for r in students if r.reason}))
        raise MissingDependency(f"nothing was measured for {Path(artifact).name}: {reasons}")
    for label, path in (("json", json_path), ("plot", plot_path)):
        if path is not None and Path(path).is_file():
            typer.echo(f"{label}: {path}")
