"""Paired differences between two compare folders that differ in one setting.

`spofa compare` pairs methods within one folder; a change that needs its own folder (another
teacher, another weight decay) is measured here: for each method and rate present in both,
per-seed differences B minus A (same seed: same initialisation, data subset and order), their
mean and a 95 % Student-t interval (`compare.stats.paired_difference`).

    python benchmarks/paired_folders.py runs/ls0-kd-spofa runs/ls0.1-kd-spofa --labels "LS 0,LS 0.1"
    python benchmarks/paired_folders.py runs/curve-e100 runs/ls0-kd-spofa --baseline none --labels "none,method"
"""
from __future__ import annotations

import argparse
from pathlib import Path

from spofa_deploy.artifacts import read_json
from spofa_deploy.compare.report import fmt_num
from spofa_deploy.compare.stats import paired_difference
from spofa_deploy.run_files import DONE


def _records(folder: Path, tag: str) -> list[dict]:
    return [{**r, "method": f"{r['method']}@{tag}"} for r in map(read_json, sorted(folder.glob(f"*/{DONE}")))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", default="A,B", help="names of the two folders, comma separated")
    ap.add_argument("--key", default="final_top1", help="the figure of a run to compare")
    ap.add_argument("--baseline", help="pair every method of B with this method of A (e.g. none) instead of itself")
    a = ap.parse_args()
    la, lb = [s.strip() for s in a.labels.split(",")]
    ra, rb = _records(a.a, "a"), _records(a.b, "b")
    runs = ra + rb
    in_a = {(r["method"][:-2], r["lr"]) for r in ra}
    points = sorted((m, lr) for m, lr in {(r["method"][:-2], r["lr"]) for r in rb} if ((a.baseline or m), lr) in in_a)
    print(f"| method | lr | {la} (per seed) | {lb} (per seed) | {lb} - {la}: mean | 95 % interval | significant |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m, lr in points:
        base = a.baseline or m
        d = paired_difference(runs, f"{m}@b", f"{base}@a", lr, lr, key=a.key)

        def seeds(tag: str) -> str:
            name = f"{m}@b" if tag == "b" else f"{base}@a"
            return " / ".join(fmt_num(r[a.key]) for r in sorted(runs, key=lambda r: r["seed"])
                              if r["method"] == name and r["lr"] == lr and r["seed"] in d["seeds"])
        ci = f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else "-"
        sig = "-" if d["significant"] is None else ("yes" if d["significant"] else "no")
        print(f"| {m} | {lr:g} | {seeds('a')} | {seeds('b')} | {fmt_num(d['mean'])} | {ci} | {sig} |")


if __name__ == "__main__":
    main()
