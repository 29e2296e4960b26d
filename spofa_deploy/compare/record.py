"""The record of one run of a compare (its `done.json`), read from its run folder."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from spofa_deploy.artifacts import read_model_meta, sidecar_path
from spofa_deploy.compare.config import VARIANTS
from spofa_deploy.run_files import METRICS, STUDENT_FILE, TRACE
from spofa_deploy.train.stability import accuracy_figures, read_metrics, read_trace, stability


def run_record(run_dir: Path, method: str, lr: float, seed: int, num_classes: int, *, stopped: bool = False,
               error: str | None = None, wall_s: float | None = None, resumed: bool = False,
               threads: int | None = None, cpu_isa: str | None = None, device: str | None = None) -> dict:
    """The record of one run, read from its folder (metrics.jsonl, trace.csv, student.json); `device`, `threads`
    and `cpu_isa`: where it trained, its CPU threads and the instruction set of its CPU kernels (each changes its
    numbers)."""
    metrics, trace = read_metrics(run_dir / METRICS), read_trace(run_dir / TRACE)
    acc = accuracy_figures(metrics)
    saved = {}
    if sidecar_path(run_dir / STUDENT_FILE).is_file():  # (the metadata alone in an archived compare)
        meta = read_model_meta(run_dir / STUDENT_FILE)
        saved = {"saved_top1": meta.get("top1"), "saved": meta.get("saved"),
                 "agreement": (meta.get("transfer") or {}).get("agreement")}
    return {"name": run_dir.name, "method": method, "base_method": VARIANTS[method][0], "lr": lr, "seed": seed,
            "run_dir": str(run_dir), "status": "stopped" if stopped else "finished", "error": error,
            "resumed": resumed, **acc, **saved, "wall_s": wall_s, "device": device, "threads": threads,
            "cpu_isa": cpu_isa,
            **_step_sizes(trace),
            "stability": stability(trace, metrics, num_classes, stopped=stopped)}


def _step_sizes(trace: list[dict]) -> dict:
    """Mean update norm and mean total / CE gradient-norm ratio over the measured steps: whether a method
    wins or loses only by taking larger steps at the same nominal rate."""
    def mean(key_fn):
        v = [x for x in map(key_fn, trace) if x is not None and math.isfinite(x)]
        return statistics.fmean(v) if v else None

    return {"update_norm": mean(lambda r: r.get("update_norm")),
            "grad_over_ce": mean(lambda r: r["gnorm_total"] / r["gnorm_ce"]
                                 if r.get("gnorm_total") is not None and r.get("gnorm_ce") else None)}
