"""The `spofa` command line. Each command parses options, calls one library function, prints.

Error policy (`main`), for every exception: one line on stderr. A problem the user can fix
(`UserError`, a bad flag or value) prints `error: ...` and exits 2; anything else prints
`internal error: ...` with the `--debug` hint and exits 1; `spofa --debug ...` adds the
traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli import options as o

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SPOFA distillation of a ViT teacher into a CNN student, export to ONNX / TensorRT, benchmarks.")
_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


def _train_config(base, **given):
    """`base` with the options the user actually gave (None means: keep the default)."""
    from dataclasses import replace

    return replace(base, **{k: v for k, v in given.items() if v is not None or k in ("workers", "clip_grad")})


@app.command()
def teacher(
    teacher: o.Teacher = "vit_b",
    data: o.Data = "digits",
    img_size: o.ImgSize = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="Local weights file to start from.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Try timm's pretrained weights first.")] = True,
    epochs: o.Epochs = None, batch_size: o.BatchSize = None, lr: o.Lr = None, opt: o.Optim = None,
    device: o.Device = "auto", amp: o.Amp = "auto", out: o.Out = None, resume: o.Resume = False,
    seed: o.Seed = 0, workers: o.Workers = None, download: o.Download = False, on_nan: o.OnNan = "stop",
    clip_grad: o.ClipGrad = None,
    skip_corrupt: Annotated[bool, typer.Option(help="Skip unreadable images (with a warning) instead of failing.")] = False,
    threads: o.Threads = None,
    weight_decay: o.WeightDecay = None,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the teacher's CE (0: soft targets that teach).")] = 0.0,
) -> None:
    """Train / fine-tune the teacher on the data (teacher.safetensors + teacher.json)."""
    from spofa_deploy.pipeline import TeacherOptions, train_teacher

    o.use_threads(threads)

    opts = TeacherOptions(name=teacher, weights=str(teacher_weights) if teacher_weights else None, pretrained=pretrained,
                          label_smoothing=label_smoothing)
    opts.train = _train_config(opts.train, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=opt, device=device,
                               amp=amp, seed=seed, workers=workers, on_nan=on_nan, clip_grad=clip_grad,
                               weight_decay=weight_decay)
    path = train_teacher(opts, data, img_size, out=out, resume=resume, download=download, skip_corrupt=skip_corrupt)
    typer.echo(str(path))


@app.command()
def distill(
    teacher: o.Teacher = "vit_b",
    student: o.Student = "mobilenetv3",
    data: o.Data = "digits",
    method: Annotated[str, typer.Option("--method", help="spofa | ofa | kd | none")] = "spofa",
    img_size: o.ImgSize = None,
    teacher_ckpt: Annotated[Optional[Path], typer.Option("--teacher-ckpt", help="A teacher.safetensors from `spofa teacher`.")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="Local weights file for the teacher stage.")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option(help="Epochs of the teacher stage, if it runs.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Try timm's pretrained teacher weights first.")] = True,
    teacher_batch_size: Annotated[Optional[int], typer.Option(help="Batch size of the teacher stage (default 32).")] = None,
    epochs: o.Epochs = None, batch_size: o.BatchSize = None, lr: o.Lr = None, opt: o.Optim = None,
    device: o.Device = "auto", amp: o.Amp = "auto", out: o.Out = None, resume: o.Resume = False,
    seed: o.Seed = 0, workers: o.Workers = None, download: o.Download = False, on_nan: o.OnNan = "stop",
    clip_grad: o.ClipGrad = None,
    weight_decay: o.WeightDecay = None,
    gt_weight: o.GtWeight = None, kd_weight: o.KdWeight = None, feat_weight: o.FeatWeight = None, eps: o.Eps = None,
    stage_eps: o.StageEps = None, temperature: o.Temperature = None, kd_temperature: o.KdTemperature = None,
    label_smoothing: o.LabelSmoothing = None, mema: o.Mema = None, sample_weights: o.SampleWeights = None,
    momentum: o.Momentum = None, lambda_feat: o.LambdaFeat = None, lambda_out: o.LambdaOut = None,
    alpha_max: o.AlphaMax = None,
    teacher_label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the teacher stage, if it runs (0: soft targets that teach).")] = 0.0,
    teacher_cache: Annotated[Optional[Path], typer.Option("--teacher-cache", metavar="DIR", help="Store the teacher's logits of every training view here once; later runs with the same teacher, data, size and seed read them instead of running the teacher.")] = None,
    teacher_cache_max_gb: Annotated[Optional[float], typer.Option("--teacher-cache-max-gb", help="Bound on the teacher cache folder (GB).")] = None,
    teacher_cache_format: Annotated[Optional[str], typer.Option("--teacher-cache-format", help="fp32 (exact) | fp16 | topk [default: fp16, top-50 beyond 100 classes at temperature 1].")] = None,
    gpu_decode: Annotated[bool, typer.Option("--gpu-decode", help="Decode and augment training JPEGs on the GPU (nvJPEG): for image folders whose loader cannot keep up (benchmarks/loader.py).")] = False,
    train_fraction: Annotated[float, typer.Option(help="Train on this stratified fraction of the training split.")] = 1.0,
    skip_corrupt: Annotated[bool, typer.Option(help="Skip unreadable images (with a warning) instead of failing.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) on this node: re-launches through torchrun.")] = 1,
    threads: o.Threads = None,
) -> None:
    """Distil the teacher into the student (runs the teacher stage first if needed)."""
    import os

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from spofa_deploy.distributed import relaunch_with_torchrun

        argv = sys.argv[1:]
        i = argv.index("--nproc")
        raise SystemExit(relaunch_with_torchrun(nproc, argv[:i] + argv[i + 2:]))
    from spofa_deploy.errors import UserError
    from spofa_deploy.pipeline import TeacherOptions, distill as run_distill
    from spofa_deploy.train import TrainConfig

    o.use_threads(threads)
    if gpu_decode and device.strip().lower() == "cpu":
        raise UserError("--gpu-decode decodes on the GPU: it cannot run with --device cpu")
    topts = TeacherOptions(name=teacher, checkpoint=str(teacher_ckpt) if teacher_ckpt else None,
                           weights=str(teacher_weights) if teacher_weights else None, pretrained=pretrained,
                           label_smoothing=teacher_label_smoothing)
    common = dict(device=device, amp=amp, seed=seed, workers=workers, on_nan=on_nan, clip_grad=clip_grad)
    topts.train = _train_config(topts.train, epochs=teacher_epochs, batch_size=teacher_batch_size, **common)
    tcfg = _train_config(TrainConfig(), epochs=epochs, batch_size=batch_size, lr=lr, optimizer=opt,
                         weight_decay=weight_decay, **common)
    lcfg = o.loss_config(method, gt_weight=gt_weight, kd_weight=kd_weight, feat_weight=feat_weight, eps=eps,
                         stage_eps=stage_eps, temperature=temperature, kd_temperature=kd_temperature,
                         label_smoothing=label_smoothing, mema=mema, sample_weights=sample_weights, momentum=momentum,
                         lambda_feat=lambda_feat, lambda_out=lambda_out, alpha_max=alpha_max)
    r = run_distill(student, topts, data=data, method=method, img_size=img_size, loss=lcfg, train=tcfg, out=out,
                    resume=resume, download=download, train_fraction=train_fraction, skip_corrupt=skip_corrupt,
                    teacher_cache=teacher_cache, teacher_cache_max_gb=teacher_cache_max_gb,
                    teacher_cache_format=teacher_cache_format, gpu_decode=gpu_decode)
    from spofa_deploy.distributed import info

    if info().is_main:
        _print_summary(r)


def _print_summary(r) -> None:
    from rich.console import Console

    t = Table(title=f"spofa distill ({r.student['method']}) -> {r.run_dir}")
    for c in ("", "model", "val top-1", "params", "file"):
        t.add_column(c)
    t.add_row("teacher", r.teacher["model"], f"{r.teacher.get('top1', float('nan')):.2f}%", f"{r.teacher['params'] / 1e6:.2f}M", str(r.teacher_path))
    t.add_row("student", r.student["model"], f"{r.student['top1']:.2f}% ({r.student['saved']})", f"{r.student_params / 1e6:.2f}M", str(r.student_path))
    Console().print(t)
    heads = f"{r.head_params / 1e6:.3f}M training-only head/scaler parameters, none of them in {r.student_path.name}" if r.head_params else "no training-only heads"
    Console().print(f"{heads}; {r.fit.epochs_run} epochs in {r.fit.seconds:.0f}s ({r.fit.img_per_s:,.0f} img/s); "
                    f"metrics: {r.run_dir / 'metrics.jsonl'}, trace: {r.run_dir / 'trace.csv'}")


def _register_optional() -> None:
    # Commands that live in their own modules (export, bench, ...) register here.
    for mod, name in (("cli.cmd_export", "export"), ("cli.cmd_bench", "bench"), ("cli.cmd_compare", "compare"),
                      ("cli.cmd_doctor", "doctor")):
        try:
            module = __import__(mod, fromlist=[name])
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        app.command(name)(getattr(module, name))


_register_optional()


def main() -> None:
    """Console-script entry point: run the command, then apply the error policy to whatever it raised."""
    _state["debug"] = False  # set by the root callback (main may run more than once in a process: tests)
    try:
        rv = app(standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every exception gets the policy, Ctrl-C included
        sys.exit(_exit_code(e))
    # Without standalone mode click returns the code of an `Exit` (--help: 0); typer >= 0.20 also
    # turns Ctrl-C into Exit(130) here. A command itself returns None.
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(rv)


def _is_click(e: BaseException, name: str) -> bool:
    """`e` is click's (or typer's vendored click's) exception class `name`, or a subclass of it.

    By name, not by import: typer >= 0.20 vendors click as `typer._click` with exception classes
    of its own (and `Exit`/`Abort` in `typer.exceptions`), older typer uses click's.
    """
    return any(c.__name__ == name and c.__module__.split(".")[0] in ("click", "typer") for c in type(e).__mro__)


def _one_line(text: str, limit: int | None = None) -> str:
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def _exit_code(e: BaseException) -> int:
    """Print what `e` means on stderr (one line; the traceback too with --debug) and return the exit code.

    2: a problem the user can fix (UserError, a bad flag or value); 1: anything else (a bug);
    130: interrupted (Ctrl-C).
    """
    import traceback

    from spofa_deploy.errors import UserError

    debug = _state["debug"] or "--debug" in sys.argv[1:]
    if isinstance(e, KeyboardInterrupt) or _is_click(e, "Abort"):
        print("interrupted", file=sys.stderr)
        return 130
    if _is_click(e, "Exit"):
        return int(getattr(e, "exit_code", 0) or 0)
    if _is_click(e, "NoArgsIsHelpError"):  # plain `spofa`: the help, as click shows it
        e.show()
        return int(getattr(e, "exit_code", 2))
    if _is_click(e, "ClickException"):  # bad flag or value: click's message, on one line
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and _is_click(e, "UsageError") else ""
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return 2
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__)
    if isinstance(e, UserError):
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    what = _one_line(e, 300)
    hint = "report it with the traceback above" if debug else "rerun as `spofa --debug ...` for the traceback and report it"
    print(f"internal error: {type(e).__name__}{': ' + what if what else ''} (a bug: {hint})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
