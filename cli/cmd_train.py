"""`spofa teacher` and `spofa distill`: parse options, call `spofa_deploy.teacher.stage.train_teacher` or
`spofa_deploy.pipeline.distill`, print the result."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli import options as o


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def teacher(
    teacher: o.Teacher = "vit_b",
    data: o.Data = "digits",
    img_size: o.ImgSize = None,
    teacher_weights: o.TeacherWeights = None,
    pretrained: o.Pretrained = True,
    epochs: o.Epochs = None, batch_size: o.BatchSize = None, lr: o.Lr = None, opt: o.Optim = None,
    device: o.Device = "auto", amp: o.Amp = "auto", out: o.TeacherOut = None, resume: o.TeacherResume = False,
    seed: o.Seed = 0, workers: o.Workers = None, download: o.Download = False, on_nan: o.OnNan = "stop",
    clip_grad: o.ClipGrad = None,
    skip_corrupt: o.SkipCorrupt = False,
    threads: o.Threads = None,
    weight_decay: o.WeightDecay = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the teacher's CE (0: soft targets that teach).")] = 0.0,
) -> None:
    """Train / fine-tune the teacher on the data (teacher.safetensors + teacher.json)."""
    from spofa_deploy.data.splits import DataOptions
    from spofa_deploy.teacher import stage

    o.use_threads(threads)
    recipe = stage.TeacherOptions().train
    opts = stage.TeacherOptions(
        name=teacher, weights=_str(teacher_weights), pretrained=pretrained, label_smoothing=label_smoothing,
        train=o.train_settings(recipe, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=opt, device=device,
                               amp=amp, seed=seed, workers=workers, on_nan=on_nan, clip_grad=clip_grad,
                               weight_decay=weight_decay),
        cpu_budget=None if epochs else stage.TEACHER_CPU_BUDGET)  # epochs given are taken as given
    data_opts = DataOptions(spec=data, img_size=img_size, skip_corrupt=skip_corrupt, download=download)
    path = stage.train_teacher(teacher=opts, data=data_opts, out=out, resume=resume)
    typer.echo(str(path))


@o.with_options(o.loss_options)
def distill(
    teacher: o.Teacher = "vit_b",
    student: o.Student = "mobilenetv3",
    data: o.Data = "digits",
    method: Annotated[str, typer.Option("--method", help="spofa | ofa | kd | none")] = "spofa",
    img_size: o.ImgSize = None,
    teacher_ckpt: o.TeacherCkpt = None,
    teacher_finetune: Annotated[bool, typer.Option("--teacher-finetune", help="Fine-tune a teacher made elsewhere (--teacher-ckpt of timm, or --teacher hf-hub:ID / local-dir:DIR) on the data by the teacher stage, its classifier re-initialised where the classes differ; without it the teacher is used as it is.")] = False,
    teacher_weights: o.TeacherWeights = None,
    teacher_epochs: o.TeacherEpochs = None,
    pretrained: o.Pretrained = True,
    teacher_batch_size: Annotated[Optional[int], typer.Option("--teacher-batch-size", help="Batch size of the teacher stage (default 32).")] = None,
    epochs: o.Epochs = None, batch_size: o.BatchSize = None, lr: o.Lr = None, opt: o.Optim = None,
    device: o.Device = "auto", amp: o.Amp = "auto", out: o.Out = None, resume: o.Resume = False,
    seed: o.Seed = 0, workers: o.Workers = None, download: o.Download = False, on_nan: o.OnNan = "stop",
    clip_grad: o.ClipGrad = None,
    weight_decay: o.WeightDecay = None,
    teacher_label_smoothing: Annotated[float, typer.Option("--teacher-label-smoothing", help="Label smoothing of the teacher stage, if it runs (0: soft targets that teach).")] = 0.0,
    teacher_cache: Annotated[Optional[Path], typer.Option("--teacher-cache", metavar="DIR", help="Store the teacher's logits of every training view here once; later runs with the same teacher, data, size and seed read them instead of running the teacher.")] = None,
    teacher_cache_max_gb: Annotated[Optional[float], typer.Option("--teacher-cache-max-gb", help="Bound on the teacher cache folder (GB).")] = None,
    teacher_cache_format: Annotated[Optional[str], typer.Option("--teacher-cache-format", help="fp32 (exact) | fp16 | topk (default: fp16, top-50 beyond 100 classes at temperature 1).")] = None,
    gpu_decode: Annotated[bool, typer.Option("--gpu-decode", help="Decode and augment training JPEGs on the GPU (nvJPEG): for image folders whose loader cannot keep up (benchmarks/loader.py).")] = False,
    train_fraction: o.TrainFraction = 1.0,
    skip_corrupt: o.SkipCorrupt = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) on this node: re-launches through torchrun.")] = 1,
    threads: o.Threads = None,
    **loss,
) -> None:
    """Distil the teacher into the student (runs the teacher stage first if needed)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from spofa_deploy.train.distributed import relaunch_with_torchrun

        raise SystemExit(relaunch_with_torchrun(nproc, without_option(sys.argv[1:], "--nproc")))
    from spofa_deploy import pipeline
    from spofa_deploy.data.splits import DataOptions
    from spofa_deploy.errors import UserError
    from spofa_deploy.method.distillers import METHODS, DistillConfig
    from spofa_deploy.teacher.stage import TEACHER_CPU_BUDGET, TeacherOptions
    from spofa_deploy.train import distributed
    from spofa_deploy.train.loop import TrainConfig

    o.use_threads(threads)
    if gpu_decode and device.strip().lower() == "cpu":
        raise UserError("--gpu-decode decodes on the GPU: it cannot run with --device cpu")
    shared = dict(device=device, amp=amp, seed=seed, workers=workers, on_nan=on_nan, clip_grad=clip_grad)
    recipe = TeacherOptions().train
    topts = TeacherOptions(name=teacher, checkpoint=_str(teacher_ckpt), weights=_str(teacher_weights),
                           pretrained=pretrained, label_smoothing=teacher_label_smoothing, finetune=teacher_finetune,
                           train=o.train_settings(recipe, epochs=teacher_epochs, batch_size=teacher_batch_size, **shared),
                           cpu_budget=None if teacher_epochs else TEACHER_CPU_BUDGET)  # epochs given are taken as given
    loss_cfg = DistillConfig(method=o.choice(method, "--method", METHODS), **o.loss_options(**loss))
    r = pipeline.distill(
        student=student, teacher=topts, method=loss_cfg.method, loss=loss_cfg,
        data=DataOptions(spec=data, img_size=img_size, train_fraction=train_fraction, skip_corrupt=skip_corrupt,
                         download=download, gpu_decode=gpu_decode),
        train=o.train_settings(TrainConfig(), epochs=epochs, batch_size=batch_size, lr=lr, optimizer=opt,
                               weight_decay=weight_decay, **shared),
        cache=o.teacher_cache(teacher_cache, max_gb=teacher_cache_max_gb, fmt=teacher_cache_format),
        out=out, resume=resume)
    if distributed.info().is_main:
        print_summary(r)


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def print_summary(r) -> None:
    """The teacher and student of a finished distillation, in one table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"spofa distill ({r.student['method']}) -> {r.run_dir}")
    for c in ("", "model", "val top-1", "params", "file"):
        t.add_column(c)
    t.add_row("teacher", r.teacher["model"], f"{r.teacher.get('top1', float('nan')):.2f}%", f"{r.teacher['params'] / 1e6:.2f}M", str(r.teacher_path))
    t.add_row("student", r.student["model"], f"{r.student['top1']:.2f}% ({r.student['saved']})", f"{r.student_params / 1e6:.2f}M", str(r.student_path))
    Console().print(t)
    heads = f"{r.head_params / 1e6:.3f}M training-only head/scaler parameters, none of them in {r.student_path.name}" if r.head_params else "no training-only heads"
    Console().print(f"{heads}; {r.fit.epochs_run} epochs in {r.fit.seconds:.0f}s ({r.fit.img_per_s:,.0f} img/s); "
                    f"metrics: {r.run_dir / 'metrics.jsonl'}, trace: {r.run_dir / 'trace.csv'}")
    if note := (r.student.get("transfer") or {}).get("note"):
        Console().print(f"[yellow]note:[/] {note}")
