"""The student-alone learning curve that sets `spofa compare`'s default epochs (docs/results.md).

Reads compare folders that trained `none` (the student alone) with the same settings but
different `--epochs` budgets, for example (2-core CPU, about 35 minutes with 2 such jobs at a time):

    for e in 25 50 100 150; do
      spofa compare --methods none --lr-sweep 0.005,0.02 --seeds 2 --epochs $e --threads 1 --out runs/curve-e$e
    done
    python benchmarks/learning_curve.py runs/curve-e* --plot docs/img/learning-curve.png

Prints, per budget and rate, the final val top-1 (mean and each seed), the final training CE
(mean of the last epoch's steps) and the wall time per run; the plot shows val top-1 per epoch
of every budget (mean over seeds), so a reader sees where a longer schedule stops paying.
Each budget is its own cosine schedule: a 50-epoch run is not the first half of a 100-epoch one.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from spofa_deploy.artifacts import read_json
from spofa_deploy.run_files import COMPARE, DONE, METRICS, TRACE
from spofa_deploy.train.stability import epoch_records, read_metrics, read_trace


def _runs(folder: Path) -> list[dict]:
    """The finished `none` runs of a compare folder, with their epoch records and final training CE."""
    out = []
    epochs = read_json(folder / COMPARE)["config"]["epochs"]
    for done in sorted(folder.glob(f"*/{DONE}")):
        rec = read_json(done)
        if rec["method"] != "none":
            continue
        ep = epoch_records(read_metrics(done.parent / METRICS))
        trace = read_trace(done.parent / TRACE)
        last = [r["loss_gt"] for r in trace if r.get("epoch") == ep[-1]["epoch"] and r.get("loss_gt") is not None] if ep else []
        out.append({"budget": epochs, "lr": rec["lr"], "seed": rec["seed"], "epochs": ep,
                    "final": rec["final_top1"], "ce": statistics.fmean(last) if last else None,
                    "wall_s": rec.get("wall_s")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="compare folders of the student alone, one per --epochs")
    ap.add_argument("--plot", type=Path, help="write val top-1 per epoch, per budget and rate, to this PNG")
    a = ap.parse_args()
    runs = [r for f in a.folders for r in _runs(f)]
    groups: dict[tuple[float, int], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["lr"], r["budget"])].append(r)
    print("| lr | epochs | runs | final val top-1 (mean) | per seed | final train CE | wall s/run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (lr, budget), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        finals = [r["final"] for r in rs if r["final"] is not None]
        ces = [r["ce"] for r in rs if r["ce"] is not None]
        walls = [r["wall_s"] for r in rs if r["wall_s"]]
        print(f"| {lr:g} | {budget} | {len(rs)} | {statistics.fmean(finals):.1f} | "
              f"{' / '.join(f'{v:.1f}' for v in finals)} | {statistics.fmean(ces):.3f} | "
              f"{statistics.fmean(walls):.0f} |" if finals and ces and walls else f"| {lr:g} | {budget} | {len(rs)} | - | - | - | - |")
    if a.plot:
        _plot(groups, a.plot)
        print(f"plot: {a.plot}")


def _plot(groups: dict[tuple[float, int], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({lr for lr, _ in groups})
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], rates):
        for (g_lr, budget), rs in sorted(groups.items()):
            if g_lr != lr:
                continue
            n = min(len(r["epochs"]) for r in rs)
            mean = [statistics.fmean(r["epochs"][i]["val_top1"] for r in rs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{budget} epochs ({len(rs)} seeds)")
        ax.set_title(f"student alone, peak lr {lr:g}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("val top-1 (%), mean over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
