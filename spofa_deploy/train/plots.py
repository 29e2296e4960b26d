"""PNG plots (matplotlib, headless): a run's training trace, and the figures of `spofa compare`."""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from spofa_deploy.train.stability import read_metrics, read_trace
from spofa_deploy.run_files import METRICS, TRACE

PLOT_TOP1 = "plot_val_top1.png"
PLOT_LOSS = "plot_train_loss.png"
PLOT_MEMA = "plot_mema_weights.png"
PLOT_PAIRED = "plot_paired_differences.png"


def _save(fig, png: Path) -> Path:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_trace(trace_csv: Path, png: Path) -> Path:
    """Losses and MEMA weights over training steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(trace_csv)))
    if not rows:
        raise ValueError(f"{trace_csv} has no rows")
    step = [int(r["step"]) for r in rows]
    col = lambda k: [float(r[k]) if r.get(k) not in (None, "") else float("nan") for r in rows]  # noqa: E731
    groups = [("losses", [k for k in ("loss", "loss_gt", "loss_kd", "loss_feat") if k in rows[0]]),
              ("stage weights alpha_k", [k for k in rows[0] if k.startswith("alpha_")]),
              ("stage alignment s_k", [k for k in rows[0] if k.startswith("align_")]),
              ("output level", [k for k in ("grad_cos_mean", "grad_cos_baseline", "beta_mean", "beta_min") if k in rows[0]])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 2.2 * len(groups)), sharex=True, squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], groups):
        for k in keys:
            ax.plot(step, col(k), label=k, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return _save(fig, png)


# ---------------------------------------------------------------------------------------------------------------------
# spofa compare

def _mean_curve(series: list[dict[float, float]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """x, mean, min, max over the runs that have a finite value at each x."""
    xs = sorted({x for s in series for x in s})
    xo, mean, lo, hi = [], [], [], []
    for x in xs:
        v = [s[x] for s in series if x in s and math.isfinite(s[x])]
        if v:
            xo.append(x)
            mean.append(statistics.fmean(v))
            lo.append(min(v))
            hi.append(max(v))
    return xo, mean, lo, hi


def _trace_series(runs: Sequence[dict], key: str) -> list[dict[float, float]]:
    out = []
    for r in runs:
        rows = read_trace(Path(r["run_dir"]) / TRACE)
        if rows and key in rows[0]:
            out.append({row["step"]: row[key] for row in rows})
    return out


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every run stopped before its first epoch
        ax.legend(**kw)


def plot_compare(out: Path, report: dict) -> list[Path]:
    """Val top-1 over epochs per method, training loss over steps, MEMA weights of `spofa`, paired
    differences: one PNG each, one column per rate."""
    import matplotlib

    matplotlib.use("Agg")
    runs, methods = report["runs"], report["config"]["methods"]
    view = _CompareView(runs, report["config"]["lrs"], {m: f"C{i}" for i, m in enumerate(methods)}, methods)
    paths = [_plot_top1(out / PLOT_TOP1, view, report), _plot_loss(out / PLOT_LOSS, view)]
    if any(r["method"] == "spofa" for r in runs):
        paths.append(_plot_mema(out / PLOT_MEMA, view))
    if report.get("paired"):
        paths.append(plot_paired(out / PLOT_PAIRED, report["paired"], report["title"]))
    return paths


@dataclass(frozen=True)
class _CompareView:
    """What every compare figure draws from: the runs, the rates (one column each), a colour per method."""

    runs: list[dict]
    lrs: list[float]
    colors: dict[str, str]
    methods: list[str]

    def sel(self, method: str, lr: float) -> list[dict]:
        return [r for r in self.runs if r["method"] == method and r["lr"] == lr]


def _top1_series(run: dict, epochs: int, ax, color: str) -> dict[float, float]:
    """Val top-1 by epoch of one run; a stopped run holds what it left (as in the tables), x marks the stop."""
    s = {float(e["epoch"]): float(e["val_top1"]) for e in read_metrics(Path(run["run_dir"]) / METRICS)
         if "val_top1" in e}
    if run["status"] == "stopped" and s:
        last = max(s)
        ax.plot([last], [s[last]], "x", ms=7, mew=1.5, color=color)
        s.update({float(e): s[last] for e in range(int(last) + 1, epochs + 1)})
    return s


def _plot_top1(png: Path, view: _CompareView, report: dict) -> Path:
    import matplotlib.pyplot as plt

    epochs, n = int(report["config"]["epochs"]), len(view.lrs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], view.lrs):
        for m in view.methods:
            x, mean, lo, hi = _mean_curve([_top1_series(r, epochs, ax, view.colors[m]) for r in view.sel(m, lr)])
            if x:
                ax.plot(x, mean, "o-", ms=3, lw=1.4, color=view.colors[m], label=m)
                ax.fill_between(x, lo, hi, color=view.colors[m], alpha=0.15)
        ax.axhline(100.0 / report["data"]["num_classes"], color="grey", ls=":", lw=1)  # chance
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("val top-1 (%) (mean, min-max over seeds)")
    _legend(axes[0, 0], fontsize=7)
    fig.suptitle(f"validation top-1: {report['title']}\n(x: a run stopped on NaN/Inf; it counts with its last "
                 "evaluated top-1 from there on)", fontsize=10)
    return _save(fig, png)


def _log_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.tick_params(axis="y", which="minor", labelsize=6)


def _plot_loss(png: Path, view: _CompareView) -> Path:
    import matplotlib.pyplot as plt

    n = len(view.lrs)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.6), squeeze=False, sharex="col")
    for j, lr in enumerate(view.lrs):
        for row, (key, title) in enumerate((("loss", "total training loss"), ("loss_gt", "cross-entropy term"))):
            ax = axes[row, j]
            for m in view.methods:
                x, mean, _, _ = _mean_curve(_trace_series(view.sel(m, lr), key))
                if x:
                    ax.plot(x, mean, lw=1.0, color=view.colors[m], label=m)
            _log_axis(ax)
            ax.set_title(f"{title}, lr {lr:g}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1, j].set_xlabel("step")
    _legend(axes[0, 0], fontsize=7)
    fig.suptitle("training loss over steps (mean over seeds)", fontsize=10)
    return _save(fig, png)


def _plot_mema(png: Path, view: _CompareView) -> Path:
    import matplotlib.pyplot as plt

    n = len(view.lrs)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], view.lrs):
        runs = view.sel("spofa", lr)
        rows = read_trace(Path(runs[0]["run_dir"]) / TRACE) if runs else []
        keys = [k for k in (rows[0] if rows else {}) if k.startswith("alpha_")] + \
               [k for k in ("beta_mean", "beta_min") if rows and k in rows[0]]
        for k in keys:
            x, mean, _, _ = _mean_curve(_trace_series(runs, k))
            ax.plot(x, mean, lw=1.0, ls="--" if k.startswith("beta") else "-", label=k)
        ax.set_title(f"spofa MEMA weights, lr {lr:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("weight (mean over seeds)")
    _legend(axes[0, 0], fontsize=7, ncol=2)
    return _save(fig, png)


def _tick(p: dict) -> str:
    """`spofa-damp` at 0.02 -> "spofa-\ndamp\n0.02" (ablation names on one line would overlap)."""
    return p["method"].replace("-", "-\n", 1) + "\n" + ("best" if p["at"] == "best rates" else p["at"].replace("lr ", ""))


def plot_paired(png: Path, paired: Sequence[dict], title: str) -> Path:
    """Per-seed paired differences (dots) with their mean and 95 % interval (bar), one panel per baseline;
    x: method at its best rate, then at each rate of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(p["baseline"] for p in paired))
    fig, axes = plt.subplots(len(bases), 1, figsize=(max(6.0, 0.55 * max(sum(p["baseline"] == b for p in paired)
                                                                         for b in bases)), 3.2 * len(bases)),
                             squeeze=False)
    for ax, base in zip(axes[:, 0], bases):
        rows = [p for p in paired if p["baseline"] == base]
        methods = list(dict.fromkeys(p["method"] for p in rows))
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        for x, p in enumerate(rows):
            c = colors[p["method"]]
            ax.plot([x] * len(p["diffs"]), p["diffs"], "o", ms=3.5, alpha=0.6, color=c)
            if p["mean"] is not None:
                lo, hi = p["ci95"] or (p["mean"], p["mean"])
                ax.errorbar([x], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="_", ms=14,
                            capsize=4, color=c, lw=1.6 if p["significant"] else 0.9)
        ax.axhline(0.0, color="grey", lw=1, ls=":")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([_tick(p) for p in rows], fontsize=7)
        ax.set_ylabel(f"top-1 minus {base} (points)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"paired differences by seed (bars: mean, 95 % t-interval; thick: excludes 0)\n{title}", fontsize=10)
    return _save(fig, png)
