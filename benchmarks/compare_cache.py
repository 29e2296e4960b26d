"""Wall time of a reduced `spofa compare` with and without the teacher cache (and with --jobs), and that the results are identical.

The real `compare.run_compare` runs twice per round on one teacher, with
`CompareConfig(teacher_cache=True)` and `(teacher_cache=False)`, in alternating order
(round 1: with, without; round 2: without, with; ...) so drift of a shared machine hits
both alike. With the cache, the first distillation run of the seed runs the teacher and
stores its logits (exact fp32 records, in <compare>/teacher-cache), and every later run of
the seed reads them instead of running the teacher. We report both wall times, their
ratio, each run's wall time, and check that every run's final top-1 and
`student.safetensors` bytes are equal in all compares.

`--jobs N` adds a third compare per round: with the cache, N runs at once in worker processes
(`run_compare(jobs=N)`), each with `--job-threads` threads (default: the cores / N). Its
students are checked bitwise against the others only when its threads per run equal
`--threads` (a different thread count sums floats in another order, so it trains other students).

From the per-run times we estimate the default `spofa compare` (none, kd, ofa, spofa x 3
rates, per seed; 5 seeds): `none` runs are unaffected; of the 9 distillation runs of a seed
the first (kd, first rate) computes the teacher and the other 8 read it. Methods not measured
here stand in as: ofa = spofa (SPOFA costs 1.00x OFA: docs/results.md), none = the cached kd runs
(the same student steps plus a KD loss and a cache read: an upper bound, which makes the
estimate conservative) unless `none` is among --methods.

The teacher is trained once first (its stage is timed apart and is not part of either
wall time). The default teacher is the compare's (DeiT-Tiny/16), from scratch at 32 px, for one
epoch only: its accuracy does not matter for timing, its forward cost is the same.
Runs get 10 epochs (the default compare: 100; each run's time is nearly proportional, and the
fixed per-run part makes the ratio a little lower at 10). Everything is written under --out.
CPU only; on a busy 2-core machine with `--threads 1` and a ViT-B/16 teacher (`--teacher vit_b`,
the compare's default until 2026-12-06) one round took 17 minutes (teacher stage 4, with the
cache 5.5, without 7.5):

    python benchmarks/compare_cache.py --out /tmp/compare-cache --threads 1
    python benchmarks/compare_cache.py --out /tmp/cc --methods none,kd,spofa --jobs 2 --json /tmp/cc.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from spofa_deploy.compare import plan
from spofa_deploy.compare import run as cmp
from spofa_deploy.data.datasets import parse_data_spec
from spofa_deploy.machine import cpu_load, set_threads, usable_cores
from spofa_deploy.run_files import STUDENT_FILE

DEFAULT = cmp.CompareConfig()  # the default compare, for the estimate


def run_one(base: cmp.CompareConfig, out: Path, cached: bool, jobs: int = 1, threads: int | None = None) -> dict:
    """One reduced compare into `out` (`jobs` > 1: in worker processes of `threads` threads); its wall time and runs."""
    cfg = cmp.CompareConfig(**{**base.__dict__, "teacher_cache": cached, "out": str(out)})
    load = load_now()
    t0 = time.perf_counter()
    result = cmp.run_compare(cfg, jobs=jobs, threads=threads)
    wall = time.perf_counter() - t0
    runs = {r["name"]: {"method": r["method"], "lr": r["lr"], "seed": r["seed"], "wall_s": r["wall_s"],
                        "final_top1": r["final_top1"], "status": r["status"],
                        "student": (Path(r["run_dir"]) / STUDENT_FILE).read_bytes()}
            for r in result.report["runs"]}
    return {"cache": cached, "jobs": jobs, "out": str(out), "wall_s": wall, "load_before": load,
            "load_after": load_now(), "runs": runs}


def differences(compares: list[dict]) -> list[str]:
    """Runs whose final top-1 or student bytes differ from the first compare's (empty: all identical)."""
    ref = compares[0]["runs"]
    bad = []
    for c in compares[1:]:
        for name, r in c["runs"].items():
            if r["final_top1"] != ref[name]["final_top1"]:
                bad.append(f"{c['out']}/{name}: final top-1 {r['final_top1']} != {ref[name]['final_top1']}")
            if r["student"] != ref[name]["student"]:
                bad.append(f"{c['out']}/{name}: {STUDENT_FILE} differs")
    return bad


def per_run(compares: list[dict], cached: bool) -> dict[str, float]:
    """Median wall time of each run name over the sequential compares with (or without) the cache."""
    names = compares[0]["runs"]
    return {n: statistics.median(c["runs"][n]["wall_s"] for c in compares if c["cache"] == cached and c["jobs"] == 1)
            for n in names}


def estimate_default(base: cmp.CompareConfig, plain: dict[str, float], cached: dict[str, float]) -> dict:
    """Speed-up of the default compare's runs, from these per-run times (see the module docstring)."""
    first = next(cmp.run_name(m, lr, 0) for lr in base.lrs for m in base.methods if m != "none")

    def method_s(times: dict[str, float], method: str) -> float:
        """Median run time of `method` (or its stand-in), the cache-filling run left out."""
        method = method if method in base.methods else {"ofa": "spofa"}.get(method, method)
        vals = [t for n, t in times.items() if n.startswith(method + "-lr") and n != first]
        return statistics.median(vals) if vals else float("nan")

    none = method_s(plain, "none") if "none" in base.methods else method_s(cached, "kd")
    distill = [m for m in DEFAULT.methods if m != "none"]
    # The default's first distillation run (kd, first rate) fills the cache: a run without it plus
    # what filling cost here (the teacher forward stays; record writes and the key's hashing come on top).
    cold = method_s(plain, distill[0]) + cached[first] - plain[first]
    rates = len(DEFAULT.lrs)
    without = rates * none + sum(rates * method_s(plain, m) for m in distill)
    with_ = rates * none + cold + sum(rates * method_s(cached, m) for m in distill) - method_s(cached, distill[0])
    free = rates * none + sum(rates * method_s(cached, m) for m in distill)  # every run as fast as a cached one
    return {"none_s": none, "none_source": "measured" if "none" in base.methods else "cached kd runs (upper bound)",
            "cold_run_s": cold, "per_seed_without_s": without, "per_seed_with_s": with_,
            "speedup_runs": without / with_, "speedup_free_teacher": without / free, "seeds": DEFAULT.seeds}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the teacher, the compares and the record")
    ap.add_argument("--teacher", default=DEFAULT.teacher)
    ap.add_argument("--teacher-epochs", type=int, default=1,
                    help="teacher stage epochs (its accuracy does not matter for timing)")
    ap.add_argument("--teacher-ckpt", default=None, help="a teacher.safetensors to use instead of training one")
    ap.add_argument("--student", default=DEFAULT.student)
    ap.add_argument("--data", default=DEFAULT.data)
    ap.add_argument("--methods", default="kd,spofa")
    ap.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT.lrs[:2]))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (with, without), alternating the order")
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch CPU threads (default: one per core; fewer on a machine busy with other work)")
    ap.add_argument("--jobs", type=int, default=1, help="> 1: also a compare with the cache and this many jobs")
    ap.add_argument("--job-threads", type=int, default=None, help="threads per job (default: the cores / --jobs)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def load_now() -> float:
    load = cpu_load().load
    return float("nan") if load is None else load


def print_report(a: argparse.Namespace, rec: dict) -> None:
    """The figures of `rec` (what --json writes), as a few lines and two small tables."""
    est, plain, cached = rec["estimate_default"], rec["per_run_without_s"], rec["per_run_with_s"]
    stage = "given" if rec["teacher_stage_s"] is None else f"{rec['teacher_stage_s']:.0f} s"
    print(f"\nCPU ({rec['cpu']}; load after {load_now():.1f}); {a.student} <- {a.teacher} "
          f"({a.teacher_epochs}-epoch teacher stage: {stage}), {a.data}, methods {','.join(rec['methods'])} "
          f"x rates {a.lrs} x 1 seed, {a.epochs} epochs, {a.rounds} round(s) alternating")
    print(f"{'compare':28} {'wall s':>8} {'load':>10}")
    for c in rec["compares"]:
        print(f"{Path(c['out']).name:28} {c['wall_s']:8.1f} {c['load_before']:4.1f}-{c['load_after']:<4.1f}")
    print(f"without / with cache: {rec['wall_without_s']:.1f} s / {rec['wall_with_s']:.1f} s = "
          f"{rec['speedup']:.2f}x faster with the cache")
    if rec["jobs"] > 1:
        print(f"without cache / with cache and {rec['jobs']} jobs x {rec['job_threads']} thread(s): "
              f"{rec['wall_without_s']:.1f} s / {rec['wall_jobs_s']:.1f} s = {rec['speedup_jobs']:.2f}x faster"
              + ("" if rec["jobs_checked"] else f" (its students are not compared bitwise: {rec['job_threads']} "
                 f"thread(s) per run, not --threads {rec['threads']})"))
    print(f"{'run':24} {'without s':>9} {'with s':>7} {'ratio':>6}")
    for n in plain:
        print(f"{n:24} {plain[n]:9.1f} {cached[n]:7.1f} {plain[n] / cached[n]:6.2f}")
    bad = rec["differences"]
    print(f"identical results (final top-1 and {STUDENT_FILE} bytes of every run, {rec['compares_checked']} compares): "
          + ("yes" if not bad else "NO\n  " + "\n  ".join(bad)))
    if math.isnan(est["speedup_runs"]):  # (no cached kd run besides the one that filled the cache)
        print("estimate, default compare: needs kd and spofa among --methods and at least 2 rates")
        return
    print(f"estimate, default compare ({len(DEFAULT.methods)} methods x {len(DEFAULT.lrs)} rates x {DEFAULT.seeds} "
          f"seeds; none = {est['none_source']}, {est['none_s']:.0f} s): per seed {est['per_seed_without_s']:.0f} s "
          f"without, {est['per_seed_with_s']:.0f} s with the cache: {est['speedup_runs']:.2f}x on the runs "
          f"({est['speedup_free_teacher']:.2f}x if the teacher cost nothing at all; the teacher stage and the "
          f"report come on top of both)")


def main() -> None:
    a = parse_args()
    if a.threads is not None:
        set_threads(a.threads)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the teacher stage writes runs/teachers/... under the working folder: keep it in --out
    base = cmp.CompareConfig(teacher=a.teacher, student=a.student, data=a.data,
                             methods=tuple(cmp.parse_methods(a.methods)), seeds=1, lrs=tuple(float(v) for v in a.lrs.split(",")),
                             epochs=a.epochs, teacher_epochs=a.teacher_epochs, teacher_pretrained=False,
                             teacher_ckpt=a.teacher_ckpt, device="cpu")
    cpu = cpu_load().line()

    t0 = time.perf_counter()
    base.teacher_ckpt = str(plan.ensure_teacher(base, base.img_size or parse_data_spec(base.data).natural_size))
    teacher_s = time.perf_counter() - t0 if a.teacher_ckpt is None else None

    threads = torch.get_num_threads()  # the sequential compares' (--threads, else one per core)
    job_threads = a.job_threads or max(1, usable_cores() // a.jobs)
    compares, parallel = [], []
    for r in range(a.rounds):
        for cached in ((True, False) if r % 2 == 0 else (False, True)):
            compares.append(run_one(base, out / f"round{r + 1}-{'with' if cached else 'without'}-cache", cached))
        if a.jobs > 1:
            parallel.append(run_one(base, out / f"round{r + 1}-with-cache-jobs{a.jobs}", True, a.jobs, job_threads))
    checked = job_threads == threads
    bad = differences(compares + (parallel if checked else []))
    compares += parallel
    for c in compares:
        for run in c["runs"].values():
            run.pop("student")  # (bytes: compared above, not for the record)

    with_s = statistics.median(c["wall_s"] for c in compares if c["cache"] and c["jobs"] == 1)
    without_s = statistics.median(c["wall_s"] for c in compares if not c["cache"])
    plain, cached = per_run(compares, False), per_run(compares, True)
    rec = {"cpu": cpu, "teacher": a.teacher, "teacher_epochs": a.teacher_epochs, "teacher_stage_s": teacher_s,
           "student": a.student, "methods": list(base.methods), "lrs": list(base.lrs), "epochs": a.epochs,
           "compares": compares, "identical": not bad, "differences": bad, "wall_without_s": without_s,
           "wall_with_s": with_s, "speedup": without_s / with_s, "per_run_without_s": plain,
           "per_run_with_s": cached, "estimate_default": estimate_default(base, plain, cached),
           "threads": threads, "jobs": a.jobs, "job_threads": job_threads, "jobs_checked": checked,
           "compares_checked": len(compares) - (0 if checked else len(parallel))}
    if parallel:
        rec["wall_jobs_s"] = statistics.median(c["wall_s"] for c in parallel)
        rec["speedup_jobs"] = without_s / rec["wall_jobs_s"]
    print_report(a, rec)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=2)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
