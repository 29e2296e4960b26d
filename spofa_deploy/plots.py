"""PNG plots of training traces (matplotlib, headless)."""
from __future__ import annotations

import csv
from pathlib import Path


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
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
