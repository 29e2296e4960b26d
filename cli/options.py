"""Shared Typer option aliases (Annotated), so each command declares them in one line, and what `--threads` does."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Data = Annotated[str, typer.Option("--data", help="digits | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR")]
Teacher = Annotated[str, typer.Option("--teacher", help="Teacher: alias (vit_b, vit_s, deit_t, swin_t) or any timm name.")]
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
Optim = Annotated[Optional[str], typer.Option("--opt", help="sgd | adamw (default: sgd for the student, adamw for the teacher)")]
OnNan = Annotated[str, typer.Option("--on-nan", help="stop | skip (skip non-finite steps; stop after 5 in a row)")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", help="Clip the gradient norm to this value.")]
# The same meaning everywhere: CPU threads of this process's PyTorch (and ONNX Runtime, where a command runs it).
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads of PyTorch (and ONNX Runtime, where used); default: one per core. "
                             "1 on a busy machine (see `spofa doctor`).")]


def use_threads(n: int | None) -> None:
    """Apply `--threads` (PyTorch's CPU threads); without it, warn once when other processes crowd the cores."""
    import os

    from rich.markup import escape

    from spofa_deploy.console import console
    from spofa_deploy.machine import apply_threads

    advice = apply_threads(n)
    if advice and os.environ.get("RANK", "0") == "0":  # once, not per torchrun rank
        console.print(f"[yellow]warning:[/] {escape(advice)}")
WeightDecay = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay of the optimizer (default: 0.05 student, 0.05 teacher).")]

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


def loss_config(method: str = "spofa", **given):
    """A DistillConfig from the loss options the user gave (None: the default); `stage_eps` parsed from "1,1,1,1"."""
    from spofa_deploy.distillers import DistillConfig
    from spofa_deploy.errors import UserError

    given = {k: v for k, v in given.items() if v is not None}
    if "stage_eps" in given:
        try:
            given["stage_eps"] = tuple(float(v) for v in given["stage_eps"].split(","))
        except ValueError:
            raise UserError(f"--stage-eps must be comma-separated numbers, got '{given['stage_eps']}'") from None
    return DistillConfig(method=method, **given)

