"""Shared Typer options, declared once; the one parser of option values (choices, comma lists); the option
groups (library dataclasses) built from a command's options; and what `--threads` does.

Every command builds each group by a constructor call that names every field it sets
(`DataOptions(spec=data, img_size=img_size, ...)`, `train_settings(base, epochs=epochs, ...)`), so a
renamed field fails at once; `tests/test_cli_options.py` checks that every flag reaches the library.
"""
from __future__ import annotations

import copy
import inspect
import math
import re
import typing
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional

import typer

Data = Annotated[str, typer.Option("--data", help="digits | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR")]
Teacher = Annotated[str, typer.Option("--teacher", help="Teacher: alias (vit_b, vit_s, vit_t, deit_t, deit_s, swin_t, mixer_b, convnext_t), any timm name, or a model made elsewhere: hf-hub:ID (a warm hub cache) or local-dir:DIR (a folder of timm's save_for_hf).")]
Student = Annotated[str, typer.Option("--student", help="Student: alias (mobilenetv3, mobilenetv3_s, mobilenetv2, resnet18, resnet50, efficientnet_b0) or any timm CNN.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Input size (default: 32 for digits/CIFAR, 224 for image folders).")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Global batch size (default: 64 student, 32 teacher).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Amp = Annotated[str, typer.Option("--amp", help="auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<name>-<time>).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out (default runs/latest) from its last checkpoint.")]
TeacherOut = Annotated[Optional[Path], typer.Option("--out", help="Teacher folder (default runs/teachers/<model>-<data>-<size>px, where distill and compare find it).")]
TeacherResume = Annotated[bool, typer.Option("--resume", help="Continue the teacher stage in --out (default: the folder above) from its last checkpoint.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader workers (default: cores - 1, at most 8; 0 in the parallel jobs of spofa compare).")]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download CIFAR (needs a network).")]
SkipCorrupt = Annotated[bool, typer.Option("--skip-corrupt", help="Skip unreadable images (with a warning) instead of failing.")]
Optim = Annotated[Optional[str], typer.Option("--opt", help="sgd | adamw (default: sgd for the student, adamw for the teacher)")]
OnNan = Annotated[str, typer.Option("--on-nan", help="stop | skip (skip non-finite steps; stop after 5 in a row)")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the gradient norm to this value.")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay of the optimizer (default: 0.05 student, 0.05 teacher).")]
TrainFraction = Annotated[float, typer.Option("--train-fraction", help="Train on this stratified fraction of the training split.")]
# Where the teacher comes from and how its stage trains (TeacherOptions), for `spofa teacher`, `distill` and `compare`.
TeacherCkpt = Annotated[Optional[Path], typer.Option("--teacher-ckpt", help="A teacher.safetensors from `spofa teacher`, or a checkpoint of timm's training script (model_best.pth.tar, .pth, .safetensors) of the --teacher architecture, used as it is.")]
TeacherWeights = Annotated[Optional[Path], typer.Option("--teacher-weights", help="Local weights file (timm / torchvision format) the teacher stage starts from.")]
TeacherEpochs = Annotated[Optional[int], typer.Option("--teacher-epochs", help="Epochs of the teacher stage, if it runs (default: the recipe's 30, fewer on the CPU for big teachers).")]
Pretrained = Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Try timm's pretrained teacher weights first.")]
# The same meaning everywhere: CPU threads of this process's PyTorch (and ONNX Runtime, where a command runs it).
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads of PyTorch (and ONNX Runtime, where used); default: one per core. "
                             "1 on a busy machine (see `spofa doctor`).")]


def defaulting(option: Any, default: str) -> Any:
    """`option` for a parameter whose default is None, its help naming `default` (what None stands for) in place
    of the default it names: `spofa compare`'s result-shaping options, where None also keeps a resumed
    compare's setting."""
    kind, info = typing.get_args(option)
    info = copy.copy(info)
    text = re.sub(r"\s*\(default: [^)]*\)", "", info.help).rstrip(".")
    info.help = f"{text} (default: {default})."
    return Annotated[Optional[kind], info]


# Distillation settings (DistillConfig), declared once for `spofa distill` and `spofa compare`.
GtWeight = Annotated[Optional[float], typer.Option("--gt-weight", help="Weight of the CE loss (l_gt) (default: 1).")]
KdWeight = Annotated[Optional[float], typer.Option("--kd-weight", help="Weight of the final-logit distillation loss (l_kd) (default: 1).")]
FeatWeight = Annotated[Optional[float], typer.Option("--feat-weight", help="Weight of the stage-head losses (l_ofa) (default: 1). 0.1, OFA-KD's small-data value, did worse on digits (docs/results.md).")]
Eps = Annotated[Optional[float], typer.Option("--eps", help="OFA target-enhancement exponent on the final logits (default: 1).")]
StageEps = Annotated[Optional[str], typer.Option("--stage-eps", help="Per-stage eps, comma separated (4 values) (default: 1,1,1,1).")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", help="OFA temperature tau (default: 1).")]
KdTemperature = Annotated[Optional[float], typer.Option("--kd-temperature", help="Temperature of --method kd (default: 4).")]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing of the student's CE term (default: 0).")]
Mema = Annotated[Optional[bool], typer.Option("--mema/--no-mema", help="MEMA dynamic scaler (spofa); --no-mema for the ablation (default: on).", show_default=False)]
SampleWeights = Annotated[Optional[bool], typer.Option("--sample-weights/--no-sample-weights", help="MEMA output-level weights beta_i (default: on).", show_default=False)]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="MEMA momentum m (default: 0.99).")]
LambdaFeat = Annotated[Optional[float], typer.Option("--lambda-feat", help="MEMA feature-level scale lambda_f (default: 5).")]
LambdaOut = Annotated[Optional[float], typer.Option("--lambda-out", help="MEMA output-level scale lambda_o (default: 2).")]
AlphaMax = Annotated[Optional[float], typer.Option("--alpha-max", help="Upper clip of MEMA's stage weights (default: 2, the paper's); 1 damps only.")]


def loss_options(
    gt_weight: GtWeight = None, kd_weight: KdWeight = None, feat_weight: FeatWeight = None, eps: Eps = None,
    stage_eps: StageEps = None, temperature: Temperature = None, kd_temperature: KdTemperature = None,
    label_smoothing: LabelSmoothing = None, mema: Mema = None, sample_weights: SampleWeights = None,
    momentum: Momentum = None, lambda_feat: LambdaFeat = None, lambda_out: LambdaOut = None,
    alpha_max: AlphaMax = None,
) -> dict:
    """The distillation settings (`DistillConfig`'s fields) as one option group: `@with_options(loss_options)`.

    Called with a command's options, it returns the `DistillConfig` fields they set (None: the default),
    `--temperature` and `--kd-temperature` checked and `--stage-eps "1,1,1,1"` parsed.
    """
    from spofa_deploy.limits import check_positive

    for value, flag in ((temperature, "--temperature"), (kd_temperature, "--kd-temperature")):
        check_positive(value, flag)  # logits / 0: not a divergence the learning rate could fix
    changes = dict(gt_weight=gt_weight, kd_weight=kd_weight, feat_weight=feat_weight, eps=eps,
                   stage_eps=tuple(comma_list(stage_eps, "--stage-eps", of=float)) if stage_eps is not None else None,
                   temperature=temperature, kd_temperature=kd_temperature, label_smoothing=label_smoothing, mema=mema,
                   sample_weights=sample_weights, momentum=momentum, lambda_feat=lambda_feat, lambda_out=lambda_out,
                   alpha_max=alpha_max)
    return {k: v for k, v in changes.items() if v is not None}


def with_options(*groups: Callable) -> Callable:
    """Give a command the options of each group (a function whose signature declares them), after its own.

    The command takes them as `**options`; Typer reads one flat signature. A group is declared once and
    every command that has its options says so in one line.
    """

    def add(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        extra = [p for g in groups for p in inspect.signature(g).parameters.values()]
        hints = {**typing.get_type_hints(command, include_extras=True)}
        for g in groups:
            hints.update(typing.get_type_hints(g, include_extras=True))
        # Evaluated annotations in the signature itself: Typer reads `__signature__` as it is, and a string
        # annotation there would lose each option's `typer.Option` (its help, its flag form).
        command.__signature__ = inspect.Signature([p.replace(annotation=hints.get(p.name, p.annotation))
                                                   for p in own + extra])
        command.__annotations__ = hints
        return command

    return add


# Choices of the training options, as TrainConfig.validate accepts them: (flag, what it names, choices) per field.
TRAIN_CHOICES = {"optimizer": ("--opt", "optimizer", ("sgd", "adamw")),
                 "amp": ("--amp", "AMP mode", ("auto", "bf16", "fp16", "off")),
                 "on_nan": ("--on-nan", "on-NaN policy", ("stop", "skip"))}


# ---------------------------------------------------------------- the one parser of option values


def choice(value: str, flag: str, choices: Iterable[str], *, noun: str | None = None) -> str:
    """`value` stripped and in lower case, when it is one of `choices` (else the one UserError style,
    `spofa_deploy.errors.check_choice`, that the library uses too)."""
    from spofa_deploy.errors import check_choice

    return check_choice(value, choices, flag, noun=noun)


def comma_list(value: str, flag: str, *, of: type = str, choices: Iterable[str] | None = None,
               noun: str | None = None, positive: bool = False) -> list:
    """`"a, b"` -> ["a", "b"]: each item checked by `choice` (with `choices`) or converted with `of` (int, float).

    Raises:
        UserError naming `flag`: an empty list, an unknown choice, an item that is no number, or
        (`positive`) a number that is not > 0 and finite.
    """
    from spofa_deploy.errors import UserError

    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UserError(f"{flag} is empty")
    if choices is not None:
        return [choice(v, flag, choices, noun=noun) for v in items]
    try:
        out = [of(v) for v in items]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated {'integers' if of is int else 'numbers'}, got '{value}'") from None
    if positive and not all(v > 0 and math.isfinite(v) for v in out):
        raise UserError(f"{flag} needs positive values, got '{value}'")
    return out


def train_choice(field: str, value: str | None) -> str | None:
    """The value of a training option with choices (TrainConfig's `optimizer`, `amp`, `on_nan`) checked; None stays."""
    if value is None:
        return None
    flag, noun, options = TRAIN_CHOICES[field]
    return choice(value, flag, options, noun=noun)


# ---------------------------------------------------------------- option groups from a command's options


def train_settings(base, **changes):
    """`base` (a TrainConfig) with the training options a command gives, by field (None: `base`'s value), and
    `--opt`, `--amp` and `--on-nan` checked."""
    cfg = replace(base, **{k: v for k, v in changes.items() if v is not None})
    return replace(cfg, **{field: train_choice(field, getattr(cfg, field)) for field in TRAIN_CHOICES})


def teacher_cache(folder: Path | None, *, max_gb: float | None, fmt: str | None):
    """The TeacherCacheOptions of `spofa distill` (`--teacher-cache DIR`, `--teacher-cache-*`), None without a folder."""
    from spofa_deploy.teacher.cache import TeacherCacheOptions
    from spofa_deploy.teacher.cache_key import FORMATS

    if folder is None:
        return None
    fmt = choice(fmt, "--teacher-cache-format", FORMATS, noun="teacher cache format") if fmt is not None else None
    return TeacherCacheOptions(folder=folder, max_gb=max_gb, format=fmt)


def use_threads(n: int | None) -> None:
    """Apply `--threads` (PyTorch's CPU threads); without it, warn once when other processes crowd the cores."""
    import os

    from rich.markup import escape

    from spofa_deploy.console import console
    from spofa_deploy.machine import apply_threads

    advice = apply_threads(n)
    if advice and os.environ.get("RANK", "0") == "0":  # once, not per torchrun rank
        console.print(f"[yellow]warning:[/] {escape(advice)}")
