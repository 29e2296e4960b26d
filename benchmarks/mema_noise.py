"""How much MEMA's stage weights move from step to step (docs/results.md, "MEMA at batch 16 and 128").

MEMA sets each stage weight from one batch's agreement `s_k` and a slow baseline `b_k`:
`alpha_k = clip(1 - lambda_f (b_k - s_k), 0.1, alpha_max)`. With small batches `s_k` is
noisy and `lambda_f = 5` multiplies that noise, so alpha can swing across its whole range
from one step to the next. This reads the `trace.csv` of SPOFA runs (run folders, or compare
folders whose `spofa*` runs it takes) and prints, per run group (method and batch size):

- the step-to-step change |alpha_k(t) - alpha_k(t-1)| (median and 90th percentile),
- alpha's mean and standard deviation over the run, and the share of values at each clip (alpha_max, 0.1),
- the standard deviation of the step-to-step change of the agreement s_k itself (its noise).

    python benchmarks/mema_noise.py runs/mema-b16 runs/mema-b128

The first `--skip` steps (default 20: the baselines start at the first batch) are left out.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from spofa_deploy.artifacts import read_json
from spofa_deploy.run_files import TRACE
from spofa_deploy.train.stability import read_trace


def _run_dirs(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if (p / TRACE).is_file():
            out.append(p)
        else:
            out += sorted(d for d in p.glob("spofa*") if (d / TRACE).is_file())
    return out


def _label(run: Path) -> str:
    meta_path = run / "student.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    loss, train = meta.get("loss", {}), meta.get("train", {})
    return (f"{run.name.split('-lr')[0]} batch {train.get('batch_size', '?')} lr {train.get('lr', '?')} "
            f"alpha_max {loss.get('alpha_max', '?')} m {loss.get('momentum', '?')}")


def stats(run: Path, skip: int) -> dict | None:
    """The figures of one run (None without MEMA columns)."""
    rows = read_trace(run / TRACE)[skip:]
    keys = sorted(k for k in (rows[0] if rows else {}) if k.startswith("alpha_"))
    if not keys:
        return None
    alpha = np.array([[r[k] for k in keys] for r in rows if all(r.get(k) is not None for k in keys)], dtype=float)
    align = np.array([[r[k.replace("alpha", "align")] for k in keys] for r in rows
                      if all(r.get(k.replace("alpha", "align")) is not None for k in keys)], dtype=float)
    meta = read_json(run / "student.json") if (run / "student.json").is_file() else {}
    hi = float(meta.get("loss", {}).get("alpha_max", 2.0))
    step = np.abs(np.diff(alpha, axis=0)).ravel()
    return {"steps": len(alpha), "d_median": float(np.median(step)), "d_p90": float(np.percentile(step, 90)),
            "sd": float(alpha.std(axis=0).mean()), "mean": float(alpha.mean()),
            "at_hi": float((alpha >= hi - 1e-6).mean()), "at_lo": float((alpha <= 0.1 + 1e-6).mean()),
            "align_step_sd": float(np.diff(align, axis=0).std(axis=0).mean()) if len(align) > 1 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="run folders or compare folders")
    ap.add_argument("--skip", type=int, default=20, help="leave out the first N logged steps")
    a = ap.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in _run_dirs(a.paths):
        s = stats(run, a.skip)
        if s is not None:
            groups[_label(run)].append(s)
    print("| runs | steps/run | abs. step change of alpha: median | p90 | alpha mean | alpha sd | at upper clip "
          "| at 0.1 | agreement step sd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, ss in sorted(groups.items()):
        def rng(key: str, fmt: str = ".2f") -> str:
            v = [s[key] for s in ss]
            return f"{min(v):{fmt}}-{max(v):{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"
        print(f"| {label} ({len(ss)}) | {statistics.fmean(s['steps'] for s in ss):.0f} | {rng('d_median')} | "
              f"{rng('d_p90')} | {rng('mean')} | {rng('sd')} | {rng('at_hi', '.0%')} | {rng('at_lo', '.0%')} | "
              f"{rng('align_step_sd', '.3f')} |")


if __name__ == "__main__":
    main()
