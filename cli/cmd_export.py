"""`spofa export`: parse options into `ExportOptions` (and its groups), call `export.exporter.export_model`,
print a short summary (warnings are the library's log records, shown as they happen)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o

ROLES = ("student", "teacher")  # the two models of a run


def export(
    student: Annotated[Optional[Path], typer.Argument(
        help="Model .safetensors or run folder (default: the student of runs/latest).", show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", help="onnx | trt | pt2")] = ...,  # noqa: A002 (the option's name)
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | bf16 | int8 (what the format allows)")] = "fp32",
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", metavar="SPEC",
                          help="INT8 calibration data spec (default: the model's own data).")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="INT8 calibration images (stratified, seeded).")] = 512,
    batch: Annotated[Optional[int], typer.Option("--batch", help="A fixed batch size instead of the dynamic default.",
                     show_default=False)] = None,
    dynamic_batch: Annotated[Optional[str], typer.Option("--dynamic-batch", metavar="MIN:OPT:MAX",
                             help="Dynamic batch: the ONNX graph's symbolic batch and the range a TensorRT engine accepts (its profiles are tuned for MIN and MAX; OPT is the batch the graph is traced at) (default: 1:16:256).",
                             show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 17,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file or folder (default: beside the model).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    role: Annotated[Optional[str], typer.Option("--role", metavar="student|teacher", show_default=False, help=(
        "Which model of the run to export: its student (the default) or the teacher it was distilled from."))] = None,
    old_teacher: Annotated[bool, typer.Option("--teacher", hidden=True, help="Deprecated: --role teacher.")] = False,
    quantizer: Annotated[str, typer.Option("--quantizer", help=(
        "INT8 quantizer: auto (trt: ModelOpt where its ONNX quantizer can run, else ort; onnx: ort, int8 weights "
        "that ONNX Runtime CPU runs as int8) | ort | modelopt"))] = "auto",
    keep_ends: Annotated[bool, typer.Option("--keep-ends/--quantize-ends",
                         help="INT8: keep the first conv and the classifier in fp32.")] = True,
    slim: Annotated[Optional[bool], typer.Option("--slim/--no-slim",
                    help="Simplify the ONNX with onnxslim (default: when installed).", show_default=False)] = None,
    max_drop: Annotated[float, typer.Option("--max-drop", help=(
        "Accuracy gate of fp16/bf16/int8 exports: refuse (exit 2, the artifact set aside as *.refused.*) when val "
        "top-1 is more than this many points below the PyTorch model's; 0 disables."))] = 1.0,
    gate_samples: Annotated[int, typer.Option("--gate-samples", help=(
        "Validation images the accuracy gate scores (stratified, seeded; all of the split when fewer)."))] = 1000,
    workspace: Annotated[float, typer.Option("--workspace", help="TensorRT builder workspace, GiB.")] = 4.0,
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help=(
        "TensorRT: let fp32 layers run TF32 (its default; parity then judged at a TF32-sized tolerance)."))] = True,
    device: Annotated[str, typer.Option("--device", help="pt2: the device the package is compiled for (cpu | cuda).")] = "cpu",
) -> None:
    """Export a trained model to ONNX, a TensorRT engine or a .pt2 package, with a JSON sidecar."""
    from export.exporter import export_model
    from export.formats import FORMATS, PRECISIONS
    from export.options import ExportOptions, GateOptions, Int8Options, TrtOptions

    format = o.choice(format, "--format", [k for k, f in FORMATS.items() if f.exportable], noun="export format")  # noqa: A001
    precision = o.choice(precision, "--precision", PRECISIONS, noun="precision")
    role = _role(role, old_teacher)
    options = ExportOptions(format, precision, batch=batch, dynamic_batch=dynamic_batch, opset=opset, slim=slim,
                            device=device, out=out, force=force,
                            int8=Int8Options(calib_data=calib_data, calib_samples=calib_samples, quantizer=quantizer,
                                             keep_ends=keep_ends),
                            gate=GateOptions(max_drop=max_drop, samples=gate_samples),
                            trt=TrtOptions(workspace_gib=workspace, tf32=tf32))
    _print_result(export_model(student, options, teacher=role == "teacher"))


def _role(role: str | None, old_teacher: bool) -> str:
    """`--role`, or the deprecated `--teacher` (kept for one release: it says so on stderr)."""
    from spofa_deploy.errors import UserError

    role = o.choice(role, "--role", ROLES) if role is not None else None
    if old_teacher:
        typer.echo("warning: `spofa export --teacher` is deprecated and will be removed: use --role teacher", err=True)
        if role == "student":
            raise UserError("--teacher (deprecated: --role teacher) contradicts --role student")
        return "teacher"
    return role or "student"


def _print_result(r) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"spofa export {r.format} {r.precision}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("file", f"{r.path} ({r.size_bytes / 1e6:.2f} MB)")
    t.add_row("sidecar", str(r.sidecar))
    if r.onnx_path:
        t.add_row("built from", str(r.onnx_path))
    b = r.batch
    t.add_row("batch", f"{b['min']}:{b['opt']}:{b['max']}" if b["dynamic"] else str(b["opt"]))
    if r.opset is not None:
        t.add_row("opset", str(r.opset))
    for p in (r.parity, r.parity_engine):
        if p is not None:
            t.add_row(f"parity ({p.checked_on} vs PyTorch)", p.describe())
    if r.gate is not None:
        g = r.gate
        verdict = "off (--max-drop 0)" if g.max_drop <= 0 else f"passed (--max-drop {g.max_drop:g})"
        t.add_row("accuracy gate", f"{g.describe()}: {verdict}")
    if r.int8_top1_ort_kernels is not None:
        t.add_row("int8 in ORT's int8 kernels", f"val top-1 {r.int8_top1_ort_kernels:.2f}% on {r.eval_samples} images")
    if r.quantization:
        q = r.quantization
        t.add_row("quantizer", f"{q['quantizer']} for {q.get('target', 'onnx')}, {q['calib_samples']} images of "
                               f"{q['calib_data']}, kept {q.get('high_precision', 'fp32')}: "
                               f"{', '.join(q['excluded_nodes']) or 'none'}")
    if r.payoff:
        from export.onnx.payoff import describe

        t.add_row("int8 vs fp32", describe(r.payoff))
    if r.engine:
        e = r.engine
        t.add_row("TensorRT", f"{e['tensorrt']} on {e['gpu']} (sm {e['compute_capability']}), built in {e['build_seconds']}s")
    t.add_row("time", f"{r.seconds:.1f}s")
    Console().print(t)
