"""Does QAT with the teacher recover what post-training INT8 loses? QAT-KD vs PTQ vs QAT-labels, paired over seeds.

For one distilled run (student + teacher) and each seed, on a fresh copy of the run:
  PTQ        the student with INT8 fake quantization calibrated on training images (the seed draws
             them), no fine-tuning: what post-training quantization gives with the same scheme;
  QAT-labels `spofa qat --labels-only` from that calibration (same seed, same epochs, same rate);
  QAT-KD     `spofa qat` (the run's FP32 teacher's logits plus the labels).
Val top-1 is PyTorch's fake-quant model on the whole validation split (ONNX Runtime gives the same
top-1 to within a tie, `tests/test_qat.py`). Differences are paired by seed: mean and 95 %
t-interval. `--per-tensor` uses per-tensor weight scales, which make the INT8 loss visible on a
student whose per-channel PTQ loses little.

    OMP_NUM_THREADS=1 python benchmarks/qat_evidence.py RUN --seeds 0,1,2,3,4 [--per-tensor] [--epochs 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from calibration.qat import default_train, qat
from spofa_deploy.compare.report import t_quantile
from spofa_deploy.console import console


def fresh_copy(run: Path, tmp: Path, name: str) -> Path:
    """The run's student and teacher (files and sidecars) in a new folder: each QAT starts from the same student."""
    dst = tmp / name
    dst.mkdir()
    for f in ("student.safetensors", "student.json", "teacher.safetensors", "teacher.json"):
        if (run / f).is_file():
            shutil.copy2(run / f, dst / f)
    return dst


def paired(a: list[float], b: list[float]) -> str:
    """Mean of a - b with its 95 % t-interval (paired by seed)."""
    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return f"{m:+.2f}"
    half = t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a distilled run folder (student + teacher)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=default_train().epochs)
    ap.add_argument("--lr", type=float, default=default_train().lr)
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (the loss made visible)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    start = time.perf_counter()
    rows = {"fp32": [], "PTQ": [], "QAT-labels": [], "QAT-KD": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            cfg = replace(default_train(), epochs=a.epochs, lr=a.lr, seed=seed, device="cpu", workers=0)
            for labels_only, key in ((True, "QAT-labels"), (False, "QAT-KD")):
                r = qat(fresh_copy(a.run, Path(tmp), f"s{seed}-{key}"), train=cfg, labels_only=labels_only,
                        per_channel=not a.per_tensor)
                rows[key].append(r.meta["top1"])
            rows["fp32"].append(r.fp32_top1)
            rows["PTQ"].append(r.ptq_top1)  # the same calibration (seed) both QAT runs started from
            console.print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    wall = time.perf_counter() - start
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), load average "
          f"{os.getloadavg()[0]:.1f} at the end; {len(seeds)} seeds, {a.epochs} epochs at lr {a.lr}, weights per "
          f"{'tensor' if a.per_tensor else 'channel'}; wall time {wall / 60:.1f} min\n")
    print("| | " + " | ".join(rows) + " |\n| --- |" + " --- |" * len(rows))
    print("| val top-1, mean over seeds | " + " | ".join(f"{statistics.mean(v):.2f}" for v in rows.values()) + " |")
    print(f"\nQAT-KD - PTQ:        {paired(rows['QAT-KD'], rows['PTQ'])}")
    print(f"QAT-KD - QAT-labels: {paired(rows['QAT-KD'], rows['QAT-labels'])}")
    print(f"QAT-labels - PTQ:    {paired(rows['QAT-labels'], rows['PTQ'])}")
    print(f"fp32 - PTQ:          {paired(rows['fp32'], rows['PTQ'])}")
    print(f"fp32 - QAT-KD:       {paired(rows['fp32'], rows['QAT-KD'])}")


if __name__ == "__main__":
    main()
