"""What `spofa bench` measured: result records, JSON, PNG (the terminal table is `cli.bench_table`).

`BenchReport` holds one `VariantResult` per model x backend x precision (its `BatchResult`s
and `Accuracy`, or why it was skipped or failed), the settings and the machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from export.bench.timing import LatencyStats
from spofa_deploy.artifacts import write_json

SCHEMA = "spofa-bench/1"
TIMING_NOTE = ("median/p99/img/s: GPU compute time (CUDA events, input already on the device) on GPU, host "
               "wall-clock latency on CPU; speed-up = teacher median / student median, same batch, interleaved")


# =========================================================================== records

@dataclass
class Accuracy:
    """Top-k accuracy (percent) on the validation split, through the runner itself."""

    top1: float
    top5: float
    n: int
    k5: int  # the k of "top-5" (fewer classes than 5 -> all classes)
    teacher_top1: float | None = None
    agreement: float | None = None  # percent of images where student and teacher top-1 agree
    agreement_fp32: float | None = None  # the same with the fp32 student (a bench of several student files)
    preds: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {"top1": self.top1, "top5": self.top5, "top5_k": self.k5, "n": self.n,
             "teacher_top1": self.teacher_top1, "agreement": self.agreement}
        if self.agreement_fp32 is not None:  # (a bench of one student file has no fp32 reference)
            d["agreement_fp32"] = self.agreement_fp32
        return d


@dataclass
class BatchResult:
    """Latency of one variant at one batch size, with the side-by-side ratio to its teacher."""

    batch: int
    latency: LatencyStats
    speedup_vs_teacher: float | None = None
    teacher_median_ms: float | None = None
    speedup_like_for_like: bool | None = None  # False: teacher on another backend/precision/device
    compile_s: float | None = None  # compile (or graph capture) at this batch, measured apart from the latency
    cuda_graph: bool | None = None  # the timed compute was a CUDA graph replay (None: not on a GPU)

    def to_dict(self) -> dict:
        return {**self.latency.to_dict(), "speedup_vs_teacher": self.speedup_vs_teacher,
                "teacher_median_ms": self.teacher_median_ms, "speedup_like_for_like": self.speedup_like_for_like,
                "compile_s": self.compile_s, "cuda_graph": self.cuda_graph}


@dataclass
class VariantResult:
    """One model on one backend at one precision: all batches, accuracy, or why it did not run."""

    key: str
    role: str  # student | teacher
    model: str
    backend: str
    backend_requested: str
    precision: str
    device: str
    artifact: str | None
    size_bytes: int | None
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    teacher: str | None = None  # key of the paired teacher variant
    batches: list[BatchResult] = field(default_factory=list)
    accuracy: Accuracy | None = None
    batch_failures: dict[int, str] = field(default_factory=dict)  # batch -> why it could not be timed there

    def batch(self, b: int) -> BatchResult | None:
        return next((r for r in self.batches if r.batch == b), None)

    def to_dict(self) -> dict:
        return {"key": self.key, "role": self.role, "model": self.model, "backend": self.backend,
                "backend_requested": self.backend_requested, "precision": self.precision, "device": self.device,
                "artifact": self.artifact, "size_bytes": self.size_bytes, "status": self.status,
                "reason": self.reason, "teacher": self.teacher,
                "accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "batches": [b.to_dict() for b in self.batches],
                "batch_failures": {str(b): why for b, why in self.batch_failures.items()}}


@dataclass
class BenchReport:
    """Everything one `spofa bench` measured."""

    results: list[VariantResult]
    settings: dict
    machine: dict
    data: dict | None = None
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def students(self) -> list[VariantResult]:
        return [r for r in self.results if r.role == "student"]

    @property
    def teachers(self) -> list[VariantResult]:
        return [r for r in self.results if r.role == "teacher"]

    def get(self, key: str) -> VariantResult:
        return next(r for r in self.results if r.key == key)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": self.created, "settings": self.settings, "machine": self.machine,
                "data": self.data, "notes": self.notes, "results": [r.to_dict() for r in self.results]}


# =========================================================================== output

def write_report_json(report: BenchReport, path: str | Path) -> Path:
    """Write the full report (every figure, settings, machine) as JSON, atomically."""
    path = Path(path)
    write_json(path, report.to_dict())
    return path


def write_plot(report: BenchReport, path: str | Path) -> Path | None:
    """PNG of top-1 accuracy against median latency, one point per variant and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spofa_deploy.artifacts import atomic_path

    pts = [r for r in report.results if r.accuracy and r.batches]
    if not pts:
        report.notes.append("no accuracy measured: no plot written")
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, r in enumerate(pts):
        xs = [b.latency.median_ms for b in r.batches]
        ys = [r.accuracy.top1] * len(xs)
        label = f"{r.role}: {r.model} {r.backend} {r.precision}"
        ax.plot(xs, ys, marker="*" if r.role == "teacher" else markers[i % len(markers)],
                markersize=12 if r.role == "teacher" else 7, linestyle=":", label=label)
        for b in r.batches:
            ax.annotate(f"b{b.batch}", (b.latency.median_ms, r.accuracy.top1), textcoords="offset points",
                        xytext=(3, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median latency per batch (ms, log)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
