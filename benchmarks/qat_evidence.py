"""Does QAT with the teacher recover what post-training INT8 loses? QAT-KD vs PTQ vs QAT-labels, paired over seeds.

For each distilled run (student + teacher) and each seed, on a fresh copy of the run:
  PTQ        the student with INT8 fake quantization calibrated on training images (the seed draws
             them), no fine-tuning: post-training quantization with the same scheme;
  QAT-labels `spofa qat --labels-only` from that calibration (same seed, same epochs, same rate);
  QAT-KD     `spofa qat` (the run's FP32 teacher's logits plus the labels);
  FT-fp32    (`--fp32-ft`) the same KD fine-tuning without fake quantization: QAT is also extra
             training, and this arm measures what that alone gives (the confound).
A seed pairs the calibration draw and the fine-tuning's data order and augmentation on one distilled
student; several RUNs (students distilled with other seeds) add the student's own variation.

Two val top-1 figures per fine-tuned arm (PyTorch, the whole validation split; ONNX Runtime gives the
fake-quant model's top-1 to within a rounding tie, tests/test_qat.py):
  last     the model after the last epoch: no choice made on the validation split (the comparison);
  shipped  what `spofa qat` writes: the best of model and EMA over the epochs, chosen on the
           validation split, so it is biased upwards against PTQ (which chooses nothing).
Differences are paired by (run, seed): mean and 95 % t-interval. Each arm's result is appended to
`--out` (JSON lines) as it finishes and a rerun skips what is there, so a kill loses one arm.

    OMP_NUM_THREADS=1 python benchmarks/qat_evidence.py RUN [RUN ...] --seeds 0,1,2,3,4 --out results.jsonl \
        [--per-tensor] [--quantize-ends] [--calib-samples 512] [--epochs 3] [--fp32-ft] [--teacher-cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from calibration.qat import _task, default_train, find_teacher, open_teacher_cache, qat
from spofa_deploy.artifacts import load_model
from spofa_deploy.compare.report import t_quantile
from spofa_deploy.data.splits import load_splits
from spofa_deploy.models import Preprocessing
from spofa_deploy.train.loop import TrainConfig, fit

ARMS = ("fp32", "PTQ", "QAT-labels", "QAT-KD", "FT-fp32")
DIFFS = (("QAT-KD", "PTQ"), ("QAT-KD", "QAT-labels"), ("QAT-labels", "PTQ"), ("fp32", "PTQ"), ("fp32", "QAT-KD"),
         ("FT-fp32", "QAT-KD"), ("FT-fp32", "fp32"))


def fresh_copy(run: Path, tmp: Path, name: str) -> Path:
    """The run's student and teacher (files and sidecars) in a new folder: each arm starts from the same student."""
    dst = tmp / name
    dst.mkdir()
    for f in ("student.safetensors", "student.json", "teacher.safetensors", "teacher.json"):
        if (run / f).is_file():
            shutil.copy2(run / f, dst / f)
    return dst


def last_top1(history: list[dict]) -> float:
    """Val top-1 of the model (not its EMA) after the last epoch."""
    return [h for h in history if "val_top1" in h][-1]["val_top1"]


def fp32_finetune(run: Path, cfg: TrainConfig, cache: Path | None) -> tuple[float, float]:
    """The QAT-KD fine-tuning without fake quantization: (last, best of model/EMA) val top-1."""
    student = run / "student.safetensors"
    model, meta = load_model(student, exportable=True)
    task, _ = _task(model, find_teacher(student, meta), meta)
    splits = load_splits(meta["data"], Preprocessing.from_meta(meta), seed=int(meta.get("train", {}).get("seed", 0)),
                         train_fraction=float(meta.get("train_fraction") or 1.0))
    tcache = open_teacher_cache(cache, task, splits, meta, cfg) if cache is not None else None
    torch.manual_seed(cfg.seed)
    (run / "ft").mkdir()
    r = fit(task, splits, cfg, run / "ft", label="ft-fp32", teacher_cache=tcache)
    return last_top1(r.history), r.best_top1


def paired(a: list[float], b: list[float]) -> str:
    """Mean of a - b with its 95 % t-interval (paired)."""
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


def load_done(path: Path) -> dict[tuple[str, int, str], dict]:
    """The arms already measured in `path`, by (run, seed, arm)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["run"], r["seed"], r["arm"])] = r
    return done


def record(path: Path, done: dict, row: dict) -> None:
    row = {**row, "load1": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    done[(row["run"], row["seed"], row["arm"])] = row
    print(f"  {row['run']} seed {row['seed']} {row['arm']}: last {row['last']:.2f}, shipped {row['shipped']:.2f} "
          f"({row['seconds']:.0f} s, load {row['load1']})", flush=True)


def measure(a: argparse.Namespace, runs: list[Path], seeds: list[int], done: dict, tmp: Path) -> None:
    for run in runs:
        for seed in seeds:
            cfg = replace(default_train(), epochs=a.epochs, lr=a.lr, seed=seed, device="cpu", workers=0)
            key = str(run)
            arms = [("QAT-KD", False), ("QAT-labels", True)]
            for arm, labels_only in arms:
                if (key, seed, arm) in done:
                    continue
                t = time.perf_counter()
                r = qat(fresh_copy(run, tmp, f"{run.name}-s{seed}-{arm}"), train=cfg, labels_only=labels_only,
                        per_channel=not a.per_tensor, keep_ends=not a.quantize_ends, calib_samples=a.calib_samples,
                        teacher_cache=None if labels_only else a.teacher_cache)
                secs = time.perf_counter() - t
                record(a.out, done, {"run": key, "seed": seed, "arm": arm, "last": last_top1(r.fit.history),
                                     "shipped": r.meta["top1"], "seconds": secs})
                for pre, value in (("fp32", r.fp32_top1), ("PTQ", r.ptq_top1)):  # the calibration both arms start from
                    if (key, seed, pre) not in done:
                        record(a.out, done, {"run": key, "seed": seed, "arm": pre, "last": value, "shipped": value,
                                             "seconds": 0.0})
            if a.fp32_ft and (key, seed, "FT-fp32") not in done:
                t = time.perf_counter()
                last, best = fp32_finetune(fresh_copy(run, tmp, f"{run.name}-s{seed}-FT"), cfg, a.teacher_cache)
                record(a.out, done, {"run": key, "seed": seed, "arm": "FT-fp32", "last": last, "shipped": best,
                                     "seconds": time.perf_counter() - t})


def report(a: argparse.Namespace, runs: list[Path], seeds: list[int], done: dict) -> None:
    pairs = [(str(r), s) for r in runs for s in seeds if all((str(r), s, arm) in done for arm in ARMS[:4])]
    arms = [arm for arm in ARMS if all((r, s, arm) in done for r, s in pairs)]
    if not pairs:
        print("nothing measured yet")
        return
    seconds = sum(done[(r, s, arm)]["seconds"] for r, s in pairs for arm in arms)
    loads = [done[(r, s, arm)]["load1"] for r, s in pairs for arm in arms]
    threads = sorted({str(done[(r, s, arm)].get("threads", "?")) for r, s in pairs for arm in arms})
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {'/'.join(threads)} torch thread(s) when measured, torch "
          f"{torch.__version__}; load average (1 min) {min(loads):.1f}-{max(loads):.1f} over the runs; "
          f"{len(pairs)} (run, seed) pairs, {a.epochs} epochs at lr {a.lr}, {a.calib_samples} calibration images, "
          f"weights per {'tensor' if a.per_tensor else 'channel'}, ends {'quantized' if a.quantize_ends else 'float'}; "
          f"summed wall time of the fine-tunings {seconds / 60:.1f} min\n")
    for which in ("last", "shipped"):
        print(f"val top-1, % ({which}):\n\n| run | seed | " + " | ".join(arms) + " |\n| --- | --- |" + " --- |" * len(arms))
        for r, s in pairs:
            print(f"| {Path(r).name} | {s} | " + " | ".join(f"{done[(r, s, arm)][which]:.2f}" for arm in arms) + " |")
        print("| mean | | " + " | ".join(f"{statistics.mean(done[(r, s, arm)][which] for r, s in pairs):.2f}"
                                          for arm in arms) + " |\n")
        col = {arm: [done[(r, s, arm)][which] for r, s in pairs] for arm in arms}
        for x, y in DIFFS:
            if x in col and y in col:
                print(f"  {x} - {y}: {paired(col[x], col[y])}")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="distilled run folders (student + teacher)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=default_train().epochs)
    ap.add_argument("--lr", type=float, default=default_train().lr)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales")
    ap.add_argument("--quantize-ends", action="store_true", help="quantize the first conv and the classifier too")
    ap.add_argument("--fp32-ft", action="store_true", help="add the FT-fp32 arm (the extra-training confound)")
    ap.add_argument("--teacher-cache", type=Path, help="teacher cache folder of the KD arms (QAT-KD, FT-fp32)")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines of the results (appended; reruns resume)")
    ap.add_argument("--report-only", action="store_true", help="print the tables of --out, measure nothing")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = [r.resolve() for r in a.runs]
    done = load_done(a.out)
    if not a.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            measure(a, runs, seeds, done, Path(tmp))
    report(a, runs, seeds, done)


if __name__ == "__main__":
    main()
