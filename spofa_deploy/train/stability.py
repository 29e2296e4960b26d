"""Stability and accuracy figures of one training run, from its `trace.csv` and `metrics.jsonl`.

Pure functions (no torch, no files except the two readers), so they can be checked on
synthetic traces. The definitions, as `spofa compare` reports them:

- **loss spike**: a logged step whose training loss is more than `SPIKE_FACTOR` (3) times
  the median of the `SPIKE_WINDOW` (20) finite losses logged just before it; the first
  `SPIKE_MIN_HISTORY` (3) logged steps are never spikes (no median yet). Each logged step
  over the line counts once, so a loss that stays up for 4 logged steps is 4 spikes.
  Non-finite losses are not spikes: they are divergence. `spofa compare` logs every
  step (`log_every=1`), so the window is 20 optimisation steps there. Counted on the
  total loss (`loss`) and on the cross-entropy term alone (`loss_gt`): a method whose
  total carries large, steady distillation terms dilutes a CE blow-up in its total, so
  the CE counts are the ones to compare across methods.
- **divergence**: any of `nonfinite` (a `nonfinite` event in metrics.jsonl, a NaN/Inf
  loss in the trace, or the run stopped with `TrainingDiverged`) and `collapse` (the
  final validation top-1 of the model is at most chance + 2 points, `100 / C + 2`).
- **tail variance**: population variance (ddof = 0) of the finite values of a trace
  column over the last `TAIL_FRACTION` (25%) of logged steps (at least 2 of them).
  Reported for the total loss (`loss`, whose scale differs between methods) and for
  the cross-entropy term (`loss_gt`, the same quantity for every method).
- **peak ratio**: the largest finite value of the CE term over its first logged value
  (and the same for the total loss), a scale-free measure of the early blow-up that
  fragile rates show in warm-up, which spike counts can miss when it starts at once.
- **gradient cosine**: mean over logged steps of `grad_cos_mean`, the batch-mean cosine
  between the logit gradients of the CE and the distillation terms; `None` for `none`.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 3
TAIL_FRACTION = 0.25
COLLAPSE_MARGIN = 2.0  # top-1 points above chance that still count as collapsed


def _float(value) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_trace(path: str | Path) -> list[dict[str, float]]:
    """Rows of a `trace.csv` with every value as a float (missing -> NaN); [] without a file."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _float(v) for k, v in row.items() if k is not None} for row in csv.DictReader(f)]


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a `metrics.jsonl` (epoch records and events); [] without a file."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted write: ignore it
    return out


def column(rows: Sequence[dict], key: str) -> list[float] | None:
    """One trace column as floats, or None where the trace does not have it."""
    if not rows or key not in rows[0]:
        return None
    return [_float(r.get(key)) for r in rows]


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def loss_spikes(losses: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                min_history: int = SPIKE_MIN_HISTORY) -> list[int]:
    """Indices of the logged losses that are spikes (see the module docstring).

    Entry i is a spike when `losses[i] > factor * median(previous <= window finite losses)`
    and at least `min_history` finite losses precede it. The median excludes entry i.
    """
    out, history = [], []
    for i, v in enumerate(losses):
        if v is None or not math.isfinite(v):
            continue
        if len(history) >= min_history and v > factor * statistics.median(history[-window:]):
            out.append(i)
        history.append(float(v))
    return out


def peak_ratio(values: Sequence[float] | None) -> float | None:
    """Largest finite value over the first finite one (None without values or with a first value <= 0)."""
    v = _finite(values or [])
    return max(v) / v[0] if v and v[0] > 0 else None


def tail_variance(values: Sequence[float] | None, fraction: float = TAIL_FRACTION) -> float | None:
    """Population variance of the finite values in the last `fraction` of `values` (None: too few)."""
    if not values:
        return None
    n = max(2, math.ceil(fraction * len(values)))
    tail = _finite(values[-n:])
    return statistics.pvariance(tail) if len(tail) >= 2 else None


def epoch_records(metrics: Sequence[dict]) -> list[dict]:
    """The per-epoch evaluation records of a metrics.jsonl (events left out)."""
    return [m for m in metrics if "val_top1" in m and "event" not in m]


def nonfinite_events(metrics: Sequence[dict]) -> list[dict]:
    return [m for m in metrics if m.get("event") == "nonfinite"]


def chance_top1(num_classes: int) -> float:
    return 100.0 / num_classes


def collapsed(final_top1: float | None, num_classes: int, margin: float = COLLAPSE_MARGIN) -> bool:
    """Final top-1 at chance level (<= 100 / C + margin); False when there is no final top-1."""
    return final_top1 is not None and final_top1 <= chance_top1(num_classes) + margin


def accuracy_figures(metrics: Sequence[dict]) -> dict:
    """Final and best top-1 of the model and its EMA, epochs run, training seconds and img/s.

    `train_s` sums the per-epoch seconds (training + evaluation) of every epoch, across
    resumed sessions; `img_per_s` is training images over those seconds. Values are
    None where no epoch finished.
    """
    epochs = epoch_records(metrics)
    if not epochs:
        return {"epochs_run": 0, "final_top1": None, "final_top5": None, "final_ema_top1": None, "best_top1": None,
                "best_epoch": None, "best_ema_top1": None, "best_ema_epoch": None, "train_s": None, "img_per_s": None}
    last = epochs[-1]
    best = max(epochs, key=lambda e: e["val_top1"])
    best_ema = max(epochs, key=lambda e: e.get("ema_top1", -1.0))
    secs = sum(float(e.get("seconds", 0.0)) for e in epochs)
    images = sum(float(e.get("img_per_s", 0.0)) * float(e.get("seconds", 0.0)) for e in epochs)
    return {"epochs_run": len(epochs), "final_top1": last["val_top1"], "final_top5": last.get("val_top5"),
            "final_ema_top1": last.get("ema_top1"), "best_top1": best["val_top1"], "best_epoch": best["epoch"],
            "best_ema_top1": best_ema.get("ema_top1"), "best_ema_epoch": best_ema.get("epoch"),
            "train_s": secs, "img_per_s": images / secs if secs > 0 else None}


def divergence(trace: Sequence[dict], metrics: Sequence[dict], num_classes: int, stopped: bool = False) -> list[str]:
    """Reasons a run counts as diverged: `nonfinite`, `collapse` (empty list: it did not)."""
    reasons = []
    losses = column(trace, "loss") or []
    if stopped or nonfinite_events(metrics) or any(not math.isfinite(v) for v in losses):
        reasons.append("nonfinite")
    epochs = epoch_records(metrics)
    if epochs and collapsed(epochs[-1]["val_top1"], num_classes):
        reasons.append("collapse")
    return reasons


def stability(trace: Sequence[dict], metrics: Sequence[dict], num_classes: int, stopped: bool = False,
              factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW, tail: float = TAIL_FRACTION) -> dict:
    """Every stability figure of one run (definitions in the module docstring).

    Args:
        trace: rows of trace.csv (`read_trace`); needs `step` and `loss`, uses `loss_gt`
            and `grad_cos_mean` where present.
        metrics: records of metrics.jsonl (`read_metrics`).
        num_classes: for the chance level of the collapse test.
        stopped: the run was stopped by `TrainingDiverged`.
    """
    losses = column(trace, "loss") or []
    steps = column(trace, "step") or list(range(1, len(losses) + 1))
    spikes = loss_spikes(losses, factor, window)
    ce = column(trace, "loss_gt")
    ce_spikes = loss_spikes(ce or [], factor, window)
    reasons = divergence(trace, metrics, num_classes, stopped)
    cos = _finite(column(trace, "grad_cos_mean") or [])
    return {
        "logged_steps": len(losses),
        "loss_spikes": len(spikes),
        "spike_steps": [int(steps[i]) for i in spikes],
        "ce_spikes": len(ce_spikes) if ce is not None else None,
        "ce_spike_steps": [int(steps[i]) for i in ce_spikes],
        "nonfinite_events": len(nonfinite_events(metrics)),
        "diverged": bool(reasons),
        "divergence": reasons,
        "chance_top1": chance_top1(num_classes),
        "loss_peak_ratio": peak_ratio(losses),
        "ce_peak_ratio": peak_ratio(ce),
        "loss_var_tail": tail_variance(losses, tail),
        "ce_var_tail": tail_variance(column(trace, "loss_gt"), tail),
        "grad_cos_mean": statistics.fmean(cos) if cos else None,
    }
