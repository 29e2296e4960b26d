"""The report of `spofa compare`: report.json / report.md (and the plots).

Reads the run records `spofa_deploy.compare.run` collects (one per method x rate x seed) and
writes what a reviewer reads, with the statistics of `spofa_deploy.compare.stats`. The report leads with each method at its own best rate of
the sweep (the literature's protocol: every method gets the same chance at tuning), then
paired differences against the student alone, against OFA and (SPOFA's ablations) against
SPOFA (methods share seeds, so per-seed differences cancel the seed's luck), then the per-rate rows and every run.
Plots: `spofa_deploy.train.plots`; the terminal table: `cli`.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import shlex
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Sequence

from spofa_deploy.artifacts import versions, write_json
from spofa_deploy.compare.config import CompareConfig
from spofa_deploy.compare.stats import (CONFIDENCE, MIN_SEEDS_TO_READ, best_rates, bracketing, complete_seeds,
                                        decisions, paired_comparisons, scored, summarize)
from spofa_deploy.compare.stats import t_quantile  # noqa: F401 - importable from here too (benchmarks use it)
from spofa_deploy.machine import cpu_isa, cpu_model
from spofa_deploy.train.stability import SPIKE_FACTOR, SPIKE_MIN_HISTORY, SPIKE_WINDOW, TAIL_FRACTION, COLLAPSE_MARGIN

_log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


DEFINITIONS = {
    "loss_spike": f"a logged step whose training loss > {SPIKE_FACTOR:g} x the median of the {SPIKE_WINDOW} finite "
                  f"losses logged before it (none in the first {SPIKE_MIN_HISTORY} logged steps); every step is logged",
    "diverged": f"NaN/Inf (event in metrics.jsonl, NaN loss in the trace, or stopped by TrainingDiverged), or "
                f"collapse: final model top-1 <= 100/num_classes + {COLLAPSE_MARGIN:g}",
    "ce_spikes": "the same on the cross-entropy term alone (comparable across methods: a large steady distillation "
                 "term in the total loss dilutes a CE blow-up)",
    "loss_peak_ratio": "largest total training loss over the first logged one (the early blow-up of fragile rates)",
    "ce_peak_ratio": "the same for the cross-entropy term (comparable across methods)",
    "loss_var_tail": f"population variance of the total training loss over the last {TAIL_FRACTION:.0%} of logged steps "
                     "(scale differs between methods)",
    "ce_var_tail": "the same for the cross-entropy term alone (comparable across methods)",
    "grad_cos_mean": "mean over logged steps of the batch-mean cosine between the CE and distillation logit gradients",
    "aggregates": "mean +- sample std over runs; every run counts, a run stopped on NaN/Inf with the accuracy of "
                  "its last evaluated epoch (the checkpoint it leaves), or at chance level (100 / classes) in final "
                  "top-1 where it stopped before its first evaluation; tail variances only over runs that trained "
                  "to the end",
    "final_top1": "val top-1 of the model after the last epoch; best_top1: best epoch; ema: the EMA weights",
    "best rate": "per method, the rate of the sweep with the highest mean final top-1 over the complete seeds "
                 "(every method at every rate; ties: the lower rate); the best-rate tables, the paired differences "
                 "and the decisions are over those seeds (over every run until one seed is complete)",
    "update norm": "mean over measured steps (every `grad_norms_every`-th: 50; 10 before 2026-12-06) of the L2 norm "
                   "of the student's parameter update; "
                   "grad / CE grad: of the total gradient's norm on the student over the CE term's alone",
    "paired difference": "final top-1 of the method minus the baseline's on the same seed (same initialisation, "
                         "data subset and order); mean and a 95 % Student-t interval over seeds; significant when "
                         "the interval excludes zero (no correction for the number of comparisons)",
}


# ---------------------------------------------------------------------------------------------------------------------
# Report

def fmt_num(x: float | None, digits: int = 1) -> str:
    """Fixed point, or scientific for the huge loss ratios of runs that blew up."""
    return "-" if x is None else f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.2e}"


def fmt_pm(s: dict, digits: int = 1) -> str:
    if s["mean"] is None:
        return "-"
    return fmt_num(s["mean"], digits) + (f" ± {fmt_num(s['std'], digits)}" if s["std"] is not None else "")


def _div(g: dict) -> str:
    return f"{g['diverged']} ({g['nonfinite']}, {g['collapsed']})"


def _g(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def build_report(cfg: CompareConfig, header: dict, data_info: dict, t_meta: dict, runs: Sequence[dict],
                 wall_s: float) -> dict:
    complete = len(runs) == len(cfg.methods) * len(cfg.lrs) * cfg.seeds
    records, runs = runs, scored(runs, data_info["num_classes"])  # (the records as they are; the runs as scored)
    summary = summarize(runs, cfg.methods, cfg.lrs)
    # Best rates, paired differences and decisions over the complete seeds only, so that every method and rate is
    # averaged over the same seeds (until one seed is complete: over every run, an interim look).
    done = complete_seeds(runs, cfg.methods, cfg.lrs)
    read = [r for r in runs if r["seed"] in done] or list(runs)
    read_lr = summarize(read, cfg.methods, cfg.lrs)["per_method_lr"] if done else summary["per_method_lr"]
    best = best_rates(read_lr)
    ran = {r["method"] for r in read}
    brackets = bracketing({m: lr for m, lr in best.items() if m in ran}, cfg.lrs)  # (a method not run yet: no end)
    return {
        "title": f"{cfg.student} <- {t_meta['model']} on {cfg.data}",
        "complete": complete,
        "config": header["config"],
        "img_size": header["img_size"],
        "seeds": cfg.seed_list(),
        "teacher": {"path": header["teacher_path"], "model": t_meta["model"], "top1": t_meta.get("top1"),
                    "source": t_meta.get("source")},
        "data": data_info,
        "machine": _machine(cfg.device if cfg.device != "auto" else _auto_device()),  # (the one writing the report)
        "runs_ran_on": dict(Counter(map(_ran_on, runs))),  # (each run's own device, CPU kernels and threads)
        "versions": versions(),
        "started": header["started"],
        "written": datetime.now().isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "definitions": DEFINITIONS,
        **summary,
        "best_rates": best,
        "seeds_complete": done,
        "at_best_rate": [g for g in read_lr if best.get(g["method"]) == g["lr"]],
        "paired": (paired := paired_comparisons(read, cfg.methods, cfg.lrs, best)),
        "decisions": decisions(paired, len(done), brackets["at_end"]),
        "bracketing": brackets,
        "transfer_note": _transfer_note(t_meta, read_lr, best),
        "runs": list(records),
        "plots": [],
    }


def _ran_on(run: dict) -> str:
    """Where a run trained, as far as its numbers depend on it: device, CPU kernels, CPU threads."""
    isa, threads = run.get("cpu_isa"), run.get("threads")
    device = run.get("device") or ("cpu" if isa else "device not recorded")
    return ", ".join([device, *([f"{isa} kernels"] if isa else []),
                      *([f"{threads} thread{'s' * (threads != 1)}"] if threads else [])])


def _transfer_note(t_meta: dict, per_method_lr: Sequence[dict], best: dict[str, float]) -> str | None:
    """`transfer_check`'s note for the compare: the teacher against the student alone at its best rate."""
    from spofa_deploy.accuracy import COMPARE_TEACHER_ADVICE, transfer_check

    alone = next((g for g in per_method_lr if g["method"] == "none" and best.get("none") == g["lr"]), None)
    if alone is None or alone["final_top1"]["mean"] is None:
        return None
    return transfer_check(None, t_meta.get("top1"), reference_top1=alone["final_top1"]["mean"],
                          reference="the student trained alone (mean final top-1 at its best rate)",
                          advice=COMPARE_TEACHER_ADVICE)["note"]


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _md_table(cols: Sequence[tuple[str, Callable[[dict], str]]], rows: Iterable[dict]) -> list[str]:
    """Markdown table lines: one column per (header, cell function)."""
    return ["| " + " | ".join(h for h, _ in cols) + " |", "|" + " --- |" * len(cols),
            *("| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows)]


# Columns of the report's tables: per method (pooled over rates), per method and rate, per run.
_METHOD_COLS = [
    ("method", lambda g: g["method"]), ("runs", lambda g: str(g["runs"])), ("diverged (NaN/Inf, collapse)", _div),
    ("final top-1", lambda g: fmt_pm(g["final_top1"])), ("best top-1", lambda g: fmt_pm(g["best_top1"])),
    ("final EMA", lambda g: fmt_pm(g["final_ema_top1"])), ("best EMA", lambda g: fmt_pm(g["best_ema_top1"])),
    ("worst-rate top-1", lambda g: f"{_g(g['worst_lr_final_top1'], '.1f')} (lr {g['worst_lr']:g})"),
]
_BEST_COLS = [
    ("method", lambda g: g["method"]), ("best lr", lambda g: f"{g['lr']:g}"), ("runs", lambda g: str(g["runs"])),
    ("diverged (NaN/Inf, collapse)", _div), ("final top-1", lambda g: fmt_pm(g["final_top1"])),
    ("best top-1", lambda g: fmt_pm(g["best_top1"])), ("final EMA", lambda g: fmt_pm(g["final_ema_top1"])),
    ("agreement with teacher", lambda g: fmt_pm(g["agreement"])),
    ("update norm", lambda g: fmt_pm(g["update_norm"], 3)), ("grad / CE grad", lambda g: fmt_pm(g["grad_over_ce"], 2)),
]
_PAIRED_COLS = [
    ("method", lambda p: p["method"]), ("vs", lambda p: p["baseline"]),
    ("at", lambda p: p["at"] + (f" ({p['lr']:g} vs {p['lr_baseline']:g})" if p["at"] == "best rates" else "")),
    ("seeds", lambda p: str(p["n"])), ("mean diff", lambda p: _g(p["mean"], "+.2f")),
    (f"{CONFIDENCE:.0%} interval", lambda p: fmt_interval(p["ci95"])),
    ("significant", lambda p: "-" if p["significant"] is None else "**yes**" if p["significant"] else "no"),
    ("per seed", lambda p: ", ".join(f"{d:+.1f}" for d in p["diffs"])),
]
_DECISION_COLS = [
    ("rule", lambda d: d["rule"]), ("comparison", lambda d: f"{d['comparison']} ({d['lr']:g} vs {d['lr_baseline']:g})"),
    ("seeds", lambda d: str(d["n"])), ("mean diff", lambda d: _g(d["mean"], "+.2f")),
    (f"{CONFIDENCE:.0%} interval", lambda d: fmt_interval(d["ci95"])),
    ("p", lambda d: _g(d["p"], ".3g")),
    ("holds", lambda d: "**yes**" if d["holds"] else fmt_holds(d)),
    ("note", lambda d: d["note"] or ""),
]
_METHOD_LR_COLS = [
    ("method", lambda g: g["method"]), ("lr", lambda g: f"{g['lr']:g}"), ("runs", lambda g: str(g["runs"])),
    ("diverged (NaN/Inf, collapse)", _div), ("final top-1", lambda g: fmt_pm(g["final_top1"])),
    ("best top-1", lambda g: fmt_pm(g["best_top1"])), ("final EMA", lambda g: fmt_pm(g["final_ema_top1"])),
    ("best EMA", lambda g: fmt_pm(g["best_ema_top1"])), ("loss var (tail)", lambda g: fmt_pm(g["loss_var_tail"], 4)),
]
_GROUP_COLS = [
    ("spikes/run", lambda g: fmt_pm(g["loss_spikes"])), ("CE spikes/run", lambda g: fmt_pm(g["ce_spikes"])),
    ("CE peak/first", lambda g: fmt_pm(g["ce_peak_ratio"])), ("CE var (tail)", lambda g: fmt_pm(g["ce_var_tail"], 4)),
    ("grad cos", lambda g: fmt_pm(g["grad_cos_mean"], 2)), ("s/run", lambda g: _g(g["wall_s"]["mean"], ".0f")),
    ("img/s", lambda g: _g(g["img_per_s"]["mean"], ",.0f")),
]
_RUN_COLS = [
    ("run", lambda r: r["name"]), ("status", lambda r: r["status"] + (" (resumed)" if r.get("resumed") else "")),
    ("final top-1", lambda r: _g(r["final_top1"], ".2f")), ("best top-1", lambda r: _g(r["best_top1"], ".2f")),
    ("final EMA", lambda r: _g(r["final_ema_top1"], ".2f")), ("best EMA", lambda r: _g(r["best_ema_top1"], ".2f")),
    ("spikes", lambda r: str(r["stability"]["loss_spikes"])), ("CE spikes", lambda r: _g(r["stability"].get("ce_spikes"), "d")),
    ("CE peak/first", lambda r: fmt_num(r["stability"].get("ce_peak_ratio"))),
    ("diverged", lambda r: ", ".join(r["stability"]["divergence"]) or "no"),
    ("loss var", lambda r: _g(r["stability"]["loss_var_tail"], ".3g")), ("CE var", lambda r: _g(r["stability"]["ce_var_tail"], ".3g")),
    ("grad cos", lambda r: _g(r["stability"]["grad_cos_mean"], ".2f")), ("wall s", lambda r: _g(r.get("wall_s"), ".0f")),
    ("img/s", lambda r: _g(r.get("img_per_s"), ",.0f")),
]


def render_markdown(report: dict) -> str:
    c, d, t = report["config"], report["data"], report["teacher"]
    m = report["machine"]
    lines = [
        f"# spofa compare: {report['title']}",
        "",
        *([] if report["complete"] else ["**Incomplete: runs are still missing (the compare was interrupted or is running).**", ""]),
        f"- student `{c['student']}`, teacher `{t['model']}` ({_g(t['top1'], '.2f')}% val top-1, `{t['path']}`)",
        f"- data `{c['data']}` at {report['img_size']}px: {d['train_images']} training images "
        f"({d['train_per_class_min']}-{d['train_per_class_max']} per class, train fraction {c['train_fraction']:g}), "
        f"{d['val_images']} validation images, {d['num_classes']} classes (chance {100 / d['num_classes']:.1f}%)",
        f"- {c['epochs']} epochs, batch {c['batch_size']}, {c['optimizer']} (weight decay {c['weight_decay']:g}), "
        f"warm-up {c['warmup_epochs']:g} epoch then cosine, peak rates {', '.join(f'{x:g}' for x in c['lrs'])}, "
        f"seeds {', '.join(map(str, report['seeds']))}, l_ofa {c['loss']['feat_weight']:g}, KD T {c['loss']['kd_temperature']:g}, label smoothing {c['loss']['label_smoothing']:g}, clip {c['clip_grad'] or 'none'}; "
        "identical for every method",
        f"- machine of this report: {m.get('gpu') or m['cpu']} ({m['device']}, {m['cpu_count']} cores{', ' + m['cpu_isa'] + ' kernels' if m.get('cpu_isa') else ''}), {m['platform']}; "
        f"total wall time {fmt_secs(report['wall_s'])}"
        + "; the runs ran on: " + "; ".join(f"{k} ({n} runs)" for k, n in report["runs_ran_on"].items()),
        "",
        *([f"**Note:** {report['transfer_note']}", ""] if report.get("transfer_note") else []),
        *(["## Pre-registered decisions (each method at its best rate, paired by seed)", "",
            *_md_table(_DECISION_COLS, report["decisions"]), "", *reading_lines(report), ""]
          if report.get("decisions") else []),
        "## Each method at its own best rate of the sweep (mean ± std over seeds)",
        "",
        "The literature's protocol: every method is tuned over the same rates and shown at its best one.",
        "",
        *_md_table(_BEST_COLS + _GROUP_COLS, report["at_best_rate"]),
        "",
        f"## Paired differences (same seeds; mean and {CONFIDENCE:.0%} t-interval of the per-seed differences)",
        "",
        "Final val top-1, method minus baseline, seed by seed. **yes**: the interval excludes zero.",
        "",
        *_md_table(_PAIRED_COLS, report["paired"]),
        "",
        "## Per method, pooled over the learning-rate sweep (mean ± std over every run)",
        "",
        *_md_table(_METHOD_COLS + _GROUP_COLS, report["per_method"]),
        "",
        "## Per method and learning rate (mean ± std over seeds)",
        "",
        *_md_table(_METHOD_LR_COLS + _GROUP_COLS, report["per_method_lr"]),
        "",
        "## Runs",
        "",
        *_md_table(_RUN_COLS, report["runs"]),
    ]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    if report["plots"]:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def fmt_interval(ci95: Sequence[float] | None) -> str:
    """A paired difference's 95 % interval as the report prints it ("-" where there is none)."""
    return f"[{ci95[0]:+.2f}, {ci95[1]:+.2f}]" if ci95 else "-"


def fmt_holds(decision: dict) -> str:
    """A decision row's outcome: yes, no, not shown (a secondary difference) or not read."""
    if decision["holds"] is None:
        return "not read"
    return "yes" if decision["holds"] else "not shown" if decision["kind"] == "secondary" else "no"


def reading_lines(report: dict) -> list[str]:
    """Under the decisions (Markdown): whether they may be read yet, and where a best rate is an end of the sweep,
    with the command that extends it."""
    n, b = len(report["seeds_complete"]), report["bracketing"]
    lines = []
    if n < MIN_SEEDS_TO_READ:
        lines.append(f"**Not read:** {n} complete seed{'s' * (n != 1)} (every method at every rate); the rules are read "
                     f"from {MIN_SEEDS_TO_READ}. The figures above are an interim look.")
    gate = next((d for d in report["decisions"] if d["kind"] == "gate"), None)
    if gate is not None and gate["holds"] is False:
        lines.append("**The gate is not shown:** plain KD is not above the student alone here, so this task does not "
                     "show transfer and no other comparison is read as evidence of it.")
    if b["at_end"]:
        where = {"lowest": "the lowest rate", "highest": "the highest rate", "only": "the only rate"}
        ends = ", ".join(f"{m} ({where[end]})" for m, end in b["at_end"].items())
        sweep = ",".join(f"{x:g}" for x in sorted({*report["config"]["lrs"], *b["extend"]}))
        out = shlex.quote(report["config"]["out"]) if report["config"].get("out") else "DIR"
        lines.append(f"**Best rate at an end of the sweep:** {ends}. The optimum may lie outside the sweep, so the "
                     f"primary rule is not read until the sweep is extended: `spofa compare --resume --out {out} "
                     f"--lr-sweep {sweep}` trains the added rate ({', '.join(f'{x:g}' for x in b['extend'])}) alone.")
    else:
        lines.append("Every method's best rate lies inside the sweep (its optimum is bracketed).")
    return lines


def write_report(out: Path, cfg: CompareConfig, header: dict, data_info: dict, t_meta: dict, runs: Sequence[dict],
                 wall_s: float, plots: bool = True) -> tuple[dict, list[Path]]:
    """report.json + report.md (+ the PNGs when `plots`); returns (report, plot paths)."""
    report = build_report(cfg, header, data_info, t_meta, runs, wall_s)
    paths: list[Path] = []
    if plots:
        from spofa_deploy.train.plots import plot_compare

        try:
            paths = plot_compare(out, report)
        except Exception as e:  # a missing plot must not lose the numbers
            _log.warning(f"could not draw the compare plots: {e}")
    report["plots"] = [p.name for p in paths]
    write_json(out / REPORT_JSON, report)
    with open(out / REPORT_MD, "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
    return report, paths


def fmt_secs(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_isa": cpu_isa(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
