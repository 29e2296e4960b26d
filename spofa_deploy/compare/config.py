"""What a compare is: its settings (`CompareConfig`), its methods (SPOFA and its ablations), its result.

Shared by the plan and resume (`compare.plan`), the running (`compare.run`) and the report (`compare.report`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from spofa_deploy.errors import UserError, check_choice
from spofa_deploy.method.distillers import DistillConfig

TEACHER_CACHE = "teacher-cache"

# Method name -> (pipeline method, DistillConfig overrides). The ablations of SPOFA:
# without MEMA (LayerNorm heads, alpha = beta = 1), without the output-level weights
# (beta = 1, alpha from MEMA), two MEMA variants, and without the LayerNorm, which is exactly `ofa`.
VARIANTS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "kd": ("kd", {}),
    "ofa": ("ofa", {}),
    "spofa": ("spofa", {}),
    "spofa-nomema": ("spofa", {"mema": False}),
    "spofa-nobeta": ("spofa", {"sample_weights": False}),
    # MEMA variants beside the paper's formula: stage weights capped at 1 (damping only),
    # and a faster baseline (momentum 0.9 instead of 0.99).
    "spofa-damp": ("spofa", {"alpha_max": 1.0}),
    "spofa-m0.9": ("spofa", {"momentum": 0.9}),
    # The stage heads' weight of the OFA-KD authors' small-data runs (CIFAR-100: 0.1), beside the default 1.0.
    "ofa-fw0.1": ("ofa", {"feat_weight": 0.1}),
    "spofa-fw0.1": ("spofa", {"feat_weight": 0.1}),
}
METHOD_ALIASES = {"spofa-noln": "ofa"}
ABLATIONS = ("spofa", "spofa-nomema", "spofa-nobeta", "spofa-damp", "spofa-m0.9", "ofa")
# Peak SGD rates of the default sweep at batch 16 (the student's own optimiser; at 0.02 distillation turns
# fragile: plain KD fell to 77 % there in the transfer study; `spofa distill`'s 0.02 is at batch 64, about
# 0.005 here by linear scaling). Spaced by 4 so that three rates bracket each method's optimum: in the
# transfer study (ResNet-18 teacher, 10 seeds) every method's best rate lay between 0.0025 and 0.01, and on
# its records this sweep's best is 0.005 for none, kd, ofa and spofa (at 10 seeds; at 5, spofa's is 0.00125,
# by 0.06 points). In the earlier study (ViT-B teacher, 4 seeds) a sweep of 0.005 / 0.02 / 0.1 left every
# method's best at its lowest rate, and at 0.1 kd, ofa and spofa stayed at chance. docs/commands/compare.md,
# "Defaults".
DEFAULT_LRS = (0.00125, 0.005, 0.02)

# Settings that change the numbers: a resumed compare must keep them.
RESULT_FIELDS = ("teacher", "student", "data", "img_size", "epochs", "batch_size", "train_fraction", "optimizer",
                 "weight_decay", "warmup_epochs", "loss", "amp", "log_every", "on_nan", "clip_grad")


@dataclass
class CompareConfig:
    """What `spofa compare` trains. Defaults: an informative comparison on `digits` (low data, fragile rates)."""

    # A ViT teacher that knows more than the student alone here: DeiT-Tiny/16 keeps the teacher recipe's 30
    # epochs on the CPU (97.6 % on digits, 2 seeds; the student alone on a tenth of the images: 94.5 %),
    # where the CPU budget leaves a ViT-B 4 (90.5 %), a teacher with nothing to teach (docs/results.md,
    # "The teacher recipe").
    teacher: str = "deit_t"
    student: str = "mobilenetv3"
    data: str = "digits"
    methods: tuple[str, ...] = ("none", "kd", "ofa", "spofa")
    seeds: int = 5  # seeds 0 .. seeds-1: enough for a paired t-interval that can exclude zero
    lrs: tuple[float, ...] = DEFAULT_LRS
    # From the student-alone learning curve (docs/results.md, "Students trained to convergence"): at the best
    # rate, 25 epochs left the student at 76 % with training CE 0.98; 100 epochs reach 95 % (CE ~0.2),
    # where 150 add little. Earlier defaults (25) measured speed of fitting, not what distillation leaves.
    epochs: int = 100
    batch_size: int = 16  # 9 steps per epoch on 144 images: 900 steps in 100 epochs
    img_size: int | None = None  # None: the data's natural size (32 for digits / CIFAR)
    train_fraction: float = 0.1  # ~14 training images per class on digits
    optimizer: str = "sgd"
    # Measured (docs/results.md, "Student weight decay"): for the student alone at 100 epochs, 0.05 ended above
    # 0.005 and 0.0005 on each of 2 seeds (by 2-10 points; not significant with 2 seeds).
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # Distillation settings shared by every method (each variant changes only its own fields): the
    # same DistillConfig `spofa distill` takes, so every distill flag has its compare twin.
    loss: DistillConfig = field(default_factory=DistillConfig)
    amp: str = "auto"
    log_every: int = 1  # every step in the trace, so no spike is missed
    on_nan: str = "stop"
    clip_grad: float | None = None
    teacher_ckpt: str | None = None  # a teacher.safetensors; default: the teacher folder for this data
    teacher_epochs: int | None = None  # None: the teacher recipe's (`TeacherOptions`), within its CPU budget
    teacher_pretrained: bool = True
    device: str = "auto"
    workers: int | None = None
    download: bool = False
    out: str | None = None
    # Teacher outputs computed once per seed and read back by every method and rate (<out>/teacher-cache):
    # exact fp32 records, so the results are bitwise those of a compare without it (on CPU).
    teacher_cache: bool = True

    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def validate(self) -> None:
        if self.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise UserError(f"--lr-sweep needs positive rates, got {list(self.lrs)}")
        if len({f"{lr:g}" for lr in self.lrs}) < len(self.lrs):  # (a run folder is named by the rate's %g)
            raise UserError(f"--lr-sweep names a rate twice: {', '.join(f'{lr:g}' for lr in self.lrs)}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be >= 1")
        parse_methods(self.methods)


@dataclass
class CompareResult:
    """What `run_compare` did: the compare folder, its report (as in report.json), runs trained now and earlier."""

    out: Path
    report: dict
    runs_done: int  # distill() calls made by this invocation
    runs_skipped: int  # finished earlier, read from done.json
    plots: list[Path] = field(default_factory=list)


def parse_methods(value: str | Iterable[str], ablations: bool = False) -> list[str]:
    """`"none,kd,ofa,spofa"` -> names, aliases resolved, duplicates dropped; `ablations` adds the SPOFA ablations."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    items += list(ABLATIONS) if ablations else []
    out: list[str] = []
    for m in items:
        m = check_choice(METHOD_ALIASES.get(m, m), [*VARIANTS, *METHOD_ALIASES], "--methods", noun="method")
        if m not in out:
            out.append(m)
    if not out:
        raise UserError("--methods is empty")
    return out


def run_name(method: str, lr: float, seed: int) -> str:
    """The folder name of one run of the plan, e.g. `spofa-lr0.02-seed3`."""
    return f"{method}-lr{lr:g}-seed{seed}"


# What compare.json keeps of the teacher's record, so that a finished compare reports without the teacher's weights.
TEACHER_RECORD = ("model", "top1", "source", "num_classes", "img_size")
