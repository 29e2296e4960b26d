"""The accuracy gate of every reduced-precision export: the artifact's top-1 against the PyTorch model's.

An INT8 or fp16 model can lose its accuracy silently (a calibration set of the wrong images, a
saturating layer) while still running and still looking like a model. So `spofa export` scores
the exported model and the PyTorch model it came from on the same validation images (seeded,
class-stratified, at most `DEFAULT_SAMPLES` by default) and refuses the export when the top-1
drop exceeds `--max-drop` points (0 disables the refusal). It reports the drop and the share of
images whose top-1 differs between the two (disagreement): a drop near 0 can hide many flips
that cancel out.

Where it runs: ONNX in ONNX Runtime CPU (an INT8 Q/DQ graph as written, the arithmetic TensorRT
reproduces), a TensorRT engine on the GPU that built it, a `.pt2` package on its device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from calibration.dataset import batches, draw, load_split
from spofa_deploy.errors import UserError

DEFAULT_MAX_DROP = 1.0  # points of val top-1
DEFAULT_SAMPLES = 1000  # validation images: +-1 point resolution is ~10 images here

Predict = Callable[[np.ndarray], np.ndarray]  # float32 (N, C, H, W) images -> (N, classes) logits


@dataclass(frozen=True)
class Scores:
    """Top-1 (percent) of the PyTorch model and of each predictor on the same `n` validation images."""

    n: int
    reference: float
    top1: dict[str, float]
    disagreement: dict[str, float]  # percent of images whose top-1 differs from PyTorch's


@dataclass(frozen=True)
class GateResult:
    """The exported model's val top-1 against PyTorch's, and the verdict under `max_drop`."""

    reference_top1: float
    top1: float
    disagreement: float
    n: int
    max_drop: float
    checked_on: str

    @property
    def drop(self) -> float:
        """Points of top-1 lost against PyTorch (negative: the export scores higher)."""
        return self.reference_top1 - self.top1

    @property
    def passed(self) -> bool:
        return self.max_drop <= 0 or self.drop <= self.max_drop

    def describe(self) -> str:
        """One line: both top-1, the drop, the disagreement, where it was measured."""
        return (f"val top-1 {self.top1:.2f}% vs PyTorch {self.reference_top1:.2f}% ({-self.drop:+.2f} points), "
                f"top-1 differs on {self.disagreement:.1f}% of {self.n} images ({self.checked_on})")

    def to_dict(self) -> dict:
        return {**asdict(self), "drop": self.drop, "passed": self.passed}


def validation_split(meta: dict):
    """The model's validation images the gate scores on.

    Raises:
        UserError: its data cannot be loaded, or it has no validation images.
    """
    ds, _ = load_split(meta, "val")
    if len(ds) == 0:
        raise UserError("the validation split is empty")
    return ds


def score(model, ds, predictors: Mapping[str, Predict], n: int, seed: int = 0) -> Scores:
    """Val top-1 of the PyTorch `model` and of each predictor on the same `n` stratified images of `ds`
    (`validation_split`); a predictor's error is raised as it is."""
    from export.parity import torch_logits

    ref_hits, total = 0, 0
    hits = dict.fromkeys(predictors, 0)
    differ = dict.fromkeys(predictors, 0)
    for x, y in batches(ds, draw(ds, n, seed)):
        ref = torch_logits(model, x).argmax(1)
        ref_hits += int((ref == y).sum())
        total += len(y)
        for name, predict in predictors.items():
            got = predict(x).argmax(1)
            hits[name] += int((got == y).sum())
            differ[name] += int((got != ref).sum())
    pct = 100.0 / total
    return Scores(total, ref_hits * pct, {k: v * pct for k, v in hits.items()},
                  {k: v * pct for k, v in differ.items()})


def verdict(scores: Scores, name: str, max_drop: float, checked_on: str) -> GateResult:
    """The gate's result for predictor `name` of `scores`."""
    return GateResult(reference_top1=scores.reference, top1=scores.top1[name], disagreement=scores.disagreement[name],
                      n=scores.n, max_drop=max_drop, checked_on=checked_on)


def check_max_drop(max_drop: float, samples: int) -> None:
    """Refuse a negative `--max-drop` or fewer than one `--gate-samples` image, before any work."""
    if not max_drop >= 0:  # (NaN too)
        raise UserError(f"--max-drop must be >= 0 points (0 disables the gate), got {max_drop}")
    if samples < 1:
        raise UserError(f"--gate-samples must be >= 1, got {samples}")


def refusal(gate: GateResult, precision: str, aside: str) -> str:
    """The one-line message of a refused export."""
    tries = ("more --calib-samples, another --calib-data or --quantizer, or --max-drop 0 to "
             "accept it") if precision == "int8" else "fp32, or --max-drop 0 to accept it"
    return (f"{precision} export refused: {gate.describe()}; the drop exceeds --max-drop {gate.max_drop:g}. "
            f"Kept aside as {aside}, not installed (try {tries})")
