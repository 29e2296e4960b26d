"""`spofa bench`: parse options, call `export.benchmark.run_bench`, print the table (`export.report`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o


def _split(value: str, what: str) -> list[str]:
    from spofa_deploy.errors import UserError

    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{what} is empty")
    return items


def parse_batches(value: str) -> list[int]:
    """`"1,8,64"` -> [1, 8, 64]."""
    from spofa_deploy.errors import UserError

    try:
        out = [int(v) for v in _split(value, "--batch")]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got '{value}'") from None
    if any(b < 1 for b in out):
        raise UserError(f"--batch sizes must be >= 1, got '{value}'")
    return out


def bench(
    artifact: Annotated[Path, typer.Argument(help="student.engine, student.onnx, student.pt2, student.safetensors, or a run folder.")],
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher to compare with (.safetensors, .onnx or .engine); default: the run's teacher_file.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data spec for accuracy (default: the one in the metadata).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="auto | trt | ort-cuda | ort-cpu | aoti | torch-eager | torch-compile | torch-cudagraph (comma list allowed).")] = "auto",
    batch: Annotated[Optional[str], typer.Option("--batch", show_default=False, help=(
        "Batch sizes, comma separated [default: 1 and a large batch the artifact accepts: 256 on a GPU, 64 on CPU]."))] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 | bf16 | fp16 for PyTorch backends (comma list); ONNX/engines keep their export precision.")] = None,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up time per measurement (s).")] = 1.0,
    min_s: Annotated[float, typer.Option("--min-s", help="Minimum timed seconds per model and batch size.")] = 3.0,
    min_iters: Annotated[int, typer.Option("--min-iters", help="Minimum timed iterations per model and batch size.")] = 50,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved student/teacher rounds per batch size.")] = 3,
    max_val: Annotated[Optional[int], typer.Option("--max-val", help="Evaluate on a stratified subset of N validation images.")] = None,
    no_accuracy: Annotated[bool, typer.Option("--no-accuracy", help="Latency only.")] = False,
    teacher_backend: Annotated[Optional[str], typer.Option("--teacher-backend", help="Backend of the teacher (default: the student's; an exported student's teacher is exported the same way, cached beside it).")] = None,
    threads: o.Threads = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every figure and the machine to this JSON file.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write an accuracy-vs-latency PNG.")] = None,
    device: o.Device = "auto",
    trust: Annotated[bool, typer.Option("--trust", help="Run a TensorRT engine or .pt2 package that has no sidecar (only ones you built).")] = False,
) -> None:
    """Latency (GPU compute and host) and accuracy of a student beside its teacher."""
    from export.benchmark import run_bench
    from export.report import print_report

    report = run_bench(
        artifact, teacher=teacher, data=data, backends=_split(backend, "--backend"),
        batch_sizes=parse_batches(batch) if batch else None,
        precisions=_split(precision, "--precision") if precision else None, warmup_s=warmup_s, min_s=min_s,
        min_iters=min_iters, rounds=rounds, max_val=max_val, device=device, teacher_backend=teacher_backend,
        accuracy=not no_accuracy, threads=threads, trust_engine=trust, json_path=json_path, plot_path=plot, progress=True,
    )
    print_report(report)
    students = [r for r in report.results if r.role == "student"]
    if students and not any(r.status == "ok" for r in students):
        from spofa_deploy.errors import MissingDependency

        reasons = "; ".join(sorted({r.reason for r in students if r.reason}))
        raise MissingDependency(f"nothing was measured for {Path(artifact).name}: {reasons}")
    for label, path in (("json", json_path), ("plot", plot)):
        if path is not None and Path(path).is_file():
            typer.echo(f"{label}: {path}")
