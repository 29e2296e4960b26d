"""Shared Typer options, declared once; the one parser of option values (choices, comma lists); the option
groups (library dataclasses) built from a command's parsed options; and what `--threads` does.

A command captures its options first (`given = dict(locals())`) and builds each group from them
(`data_options(given)`, ...): the parameter `teacher_cache_max_gb` fills `TeacherCacheOptions.max_gb`.
So a new option of a group is two lines: its Typer parameter and its dataclass field.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional

import typer

Data = Annotated[str, typer.Option("--data", help="digits | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR")]
Teacher = Annotated[str, typer.Option("--teacher", help="Teacher: alias (vit_b, vit_s, deit_t, swin_t), any timm name, or a model made elsewhere: hf-hub:ID (a warm hub cache) or local-dir:DIR (a folder of timm's save_for_hf).")]
Student = Annotated[str, typer.Option("--student", help="Student: alias (mobilenetv3, mobilenetv2, resnet18) or any timm CNN.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", help="Input size (default: 32 for digits/CIFAR, 224 for image folders).")]
Epochs = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Global batch size (default: 64 student, 32 teacher).")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Amp = Annotated[str, typer.Option("--amp", help="auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off")]
Out = Annotated[Optional[Path], typer.Option("--out", help="Run folder (default runs/<name>-<time>).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out (default runs/latest) from its last checkpoint.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Data loader workers (default: cores - 1).")]
Download = Annotated[bool, typer.Option("--download", help="Let torchvision download CIFAR (needs a network).")]
SkipCorrupt = Annotated[bool, typer.Option("--skip-corrupt", help="Skip unreadable images (with a warning) instead of failing.")]
Optim = Annotated[Optional[str], typer.Option("--opt", help="sgd | adamw (default: sgd for the student, adamw for the teacher)")]
OnNan = Annotated[str, typer.Option("--on-nan", help="stop | skip (skip non-finite steps; stop after 5 in a row)")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the gradient norm to this value.")]
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay of the optimizer (default: 0.05 student, 0.05 teacher).")]
# The same meaning everywhere: CPU threads of this process's PyTorch (and ONNX Runtime, where a command runs it).
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads of PyTorch (and ONNX Runtime, where used); default: one per core. "
                             "1 on a busy machine (see `spofa doctor`).")]

# Distillation settings (DistillConfig), declared once for `spofa distill` and `spofa compare`.
GtWeight = Annotated[Optional[float], typer.Option("--gt-weight", help="Weight of the CE loss (l_gt) [default: 1].")]
KdWeight = Annotated[Optional[float], typer.Option("--kd-weight", help="Weight of the final-logit distillation loss (l_kd) [default: 1].")]
FeatWeight = Annotated[Optional[float], typer.Option("--feat-weight", help="Weight of the stage-head losses (l_ofa) [default: 1]; 0.1 can steady MobileNets.")]
Eps = Annotated[Optional[float], typer.Option("--eps", help="OFA target-enhancement exponent on the final logits [default: 1].")]
StageEps = Annotated[Optional[str], typer.Option("--stage-eps", help="Per-stage eps, comma separated (4 values) [default: 1,1,1,1].")]
Temperature = Annotated[Optional[float], typer.Option("--temperature", help="OFA temperature tau [default: 1].")]
KdTemperature = Annotated[Optional[float], typer.Option("--kd-temperature", help="Temperature of --method kd [default: 4].")]
LabelSmoothing = Annotated[Optional[float], typer.Option("--label-smoothing", help="Label smoothing of the student's CE term [default: 0].")]
Mema = Annotated[Optional[bool], typer.Option("--mema/--no-mema", help="MEMA dynamic scaler (spofa); --no-mema for the ablation [default: on].", show_default=False)]
SampleWeights = Annotated[Optional[bool], typer.Option("--sample-weights/--no-sample-weights", help="MEMA output-level weights beta_i [default: on].", show_default=False)]
Momentum = Annotated[Optional[float], typer.Option("--momentum", help="MEMA momentum m [default: 0.99].")]
LambdaFeat = Annotated[Optional[float], typer.Option("--lambda-feat", help="MEMA feature-level scale lambda_f [default: 5].")]
LambdaOut = Annotated[Optional[float], typer.Option("--lambda-out", help="MEMA output-level scale lambda_o [default: 2].")]
AlphaMax = Annotated[Optional[float], typer.Option("--alpha-max", help="Upper clip of MEMA's stage weights [default: 2, the paper's]; 1 damps only.")]


def loss_options(
    gt_weight: GtWeight = None, kd_weight: KdWeight = None, feat_weight: FeatWeight = None, eps: Eps = None,
    stage_eps: StageEps = None, temperature: Temperature = None, kd_temperature: KdTemperature = None,
    label_smoothing: LabelSmoothing = None, mema: Mema = None, sample_weights: SampleWeights = None,
    momentum: Momentum = None, lambda_feat: LambdaFeat = None, lambda_out: LambdaOut = None,
    alpha_max: AlphaMax = None,
) -> None:
    """The distillation settings (`DistillConfig`'s fields) as one option group: `@with_options(loss_options)`."""


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
# What `spofa distill` gives its teacher stage besides --teacher-epochs and --teacher-batch-size.
SHARED_TRAIN = ("device", "amp", "seed", "workers", "on_nan", "clip_grad")


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


# ---------------------------------------------------------------- option groups from a command's options


def group_fields(cls, given: Mapping[str, Any], *, prefix: str = "", **names: str) -> dict:
    """The fields of dataclass `cls` that a command's options set: field `f` takes option `names[f]`, else
    `prefix + f`; an option that is absent or None leaves the field to its default."""
    out = {}
    for f in fields(cls):
        key = names.get(f.name, prefix + f.name)
        if given.get(key) is not None:
            out[f.name] = given[key]
    return out


def train_config(given: Mapping[str, Any], base=None, *, prefix: str = ""):
    """A TrainConfig (or `base` with changes) from a command's options, `--opt`, `--amp` and `--on-nan` checked.

    With `prefix` (distill's `teacher_` for its teacher stage) only the prefixed options and the
    shared ones (`SHARED_TRAIN`) count.
    """
    from spofa_deploy.train.loop import TrainConfig

    names = {"optimizer": prefix + "opt", **({f: f for f in SHARED_TRAIN} if prefix else {})}
    cfg = replace(base or TrainConfig(), **group_fields(TrainConfig, given, prefix=prefix, **names))
    return replace(cfg, **{field: train_choice(field, getattr(cfg, field)) for field in TRAIN_CHOICES})


def train_choice(field: str, value: str | None) -> str | None:
    """The value of a training option with choices (TrainConfig's `optimizer`, `amp`, `on_nan`) checked; None stays."""
    if value is None:
        return None
    flag, noun, options = TRAIN_CHOICES[field]
    return choice(value, flag, options, noun=noun)


def loss_fields(given: Mapping[str, Any]) -> dict:
    """The DistillConfig settings a command's options give (None: the default); `--stage-eps "1,1,1,1"` parsed."""
    from spofa_deploy.method.distillers import DistillConfig

    from spofa_deploy.limits import check_positive

    out = group_fields(DistillConfig, given)
    out.pop("method", None)  # (distill: --method; compare: --methods)
    for key in ("temperature", "kd_temperature"):  # logits / 0: not a divergence the learning rate could fix
        check_positive(out.get(key), "--" + key.replace("_", "-"))
    if "stage_eps" in out:
        out["stage_eps"] = tuple(comma_list(out["stage_eps"], "--stage-eps", of=float))
    return out


def loss_config(given: Mapping[str, Any]):
    """The DistillConfig of `spofa distill`: `--method` checked, the loss options it gives."""
    from spofa_deploy.method.distillers import METHODS, DistillConfig

    return DistillConfig(method=choice(given["method"], "--method", METHODS), **loss_fields(given))


def data_options(given: Mapping[str, Any]):
    """The DataOptions of a training command (`--data` is its `spec`)."""
    from spofa_deploy.pipeline import DataOptions

    return DataOptions(**group_fields(DataOptions, given, spec="data"))


def cache_options(given: Mapping[str, Any]):
    """The TeacherCacheOptions of `spofa distill` (`--teacher-cache DIR`, `--teacher-cache-*`), None without a folder."""
    from spofa_deploy.pipeline import TeacherCacheOptions
    from spofa_deploy.teacher.cache_key import FORMATS

    if given.get("teacher_cache") is None:
        return None
    opts = TeacherCacheOptions(**group_fields(TeacherCacheOptions, given, prefix="teacher_cache_", folder="teacher_cache"))
    if opts.format is not None:
        opts.format = choice(opts.format, "--teacher-cache-format", FORMATS, noun="teacher cache format")
    return opts


def use_threads(n: int | None) -> None:
    """Apply `--threads` (PyTorch's CPU threads); without it, warn once when other processes crowd the cores."""
    import os

    from rich.markup import escape

    from spofa_deploy.console import console
    from spofa_deploy.machine import apply_threads

    advice = apply_threads(n)
    if advice and os.environ.get("RANK", "0") == "0":  # once, not per torchrun rank
        console.print(f"[yellow]warning:[/] {escape(advice)}")
