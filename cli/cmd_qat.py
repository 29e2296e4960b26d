"""`spofa qat`: parse options, call `calibration.qat.qat`, export the QAT student's Q/DQ ONNX, print a summary."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o


def qat(
    run: Annotated[Optional[Path], typer.Argument(
        help="Run folder or student .safetensors (default: runs/latest).", show_default=False)] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs.")] = 3,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (low: a tenth of the student recipe's).")] = 0.002,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 64,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Training images that calibrate the activation ranges.")] = 512,
    keep_ends: Annotated[bool, typer.Option("--keep-ends/--quantize-ends",
                         help="Keep the first conv and the classifier in float (as spofa export int8).")] = True,
    labels_only: Annotated[bool, typer.Option("--labels-only", help="Fine-tune on the labels alone, even where the run has a teacher.")] = False,
    teacher_cache: Annotated[Optional[Path], typer.Option("--teacher-cache", metavar="DIR", help="The distillation's --teacher-cache folder: the teacher's logits are read from it where QAT feeds the teacher the same views (same seed, batch size, device), else the teacher runs.")] = None,
    export: Annotated[bool, typer.Option("--export/--no-export", help="Then write the Q/DQ ONNX (student.qat.int8.onnx).")] = True,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing QAT ONNX.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the fine-tuning in RUN/qat/ from its last checkpoint.")] = False,
    seed: o.Seed = 0, device: o.Device = "auto", workers: o.Workers = None, threads: o.Threads = None,
) -> None:
    """INT8 quantization-aware fine-tuning of a distilled student with its FP32 teacher (ModelOpt fake quant)."""
    from calibration.qat import default_train, qat as run_qat
    from export.exporter import export_model
    from export.options import ExportOptions

    o.use_threads(threads)
    train = o.train_settings(default_train(), epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                             workers=workers)
    r = run_qat(run, train=train, calib_samples=calib_samples, keep_ends=keep_ends, labels_only=labels_only,
                resume=resume, teacher_cache=teacher_cache)
    s = r.meta["qat_settings"]
    typer.echo(f"val top-1 (PyTorch): fp32 {r.fp32_top1:.2f}%, calibrated only {r.ptq_top1:.2f}%, "
               f"QAT {r.meta['top1']:.2f}% ({r.meta['saved']}, epoch {r.meta['epoch']}); "
               f"{'teacher ' + s['teacher'] if s['teacher'] else 'labels only'}, {r.fit.epochs_run} epochs, "
               f"{r.seconds:.0f}s -> {r.path}")
    if export:
        from cli.cmd_export import _print_result

        _print_result(export_model(r.path, ExportOptions("onnx", "int8", force=force)))
