"""The statistics of a compare's report: aggregation over seeds, each method's best rate, paired differences.

Methods share seeds (the same initialisation, data subset and order), so per-seed differences against a
baseline cancel each seed's luck: `paired_difference` gives their mean and a t-interval, `decisions` the
study's pre-registered rules on them (Holm-corrected for the secondary comparisons).
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

from spofa_deploy.train.stability import chance_top1

CONFIDENCE = 0.95


def _stats(values: Iterable[float | None]) -> dict:
    """mean, std (sample, ddof = 1; None for one value), min, max and n of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v)}


ACC_KEYS = ("final_top1", "best_top1", "final_ema_top1", "best_ema_top1")


STAB_KEYS = ("loss_spikes", "ce_spikes", "loss_peak_ratio", "ce_peak_ratio", "loss_var_tail", "ce_var_tail", "grad_cos_mean")


def _group(runs: Sequence[dict]) -> dict:
    """Figures of a group of runs. Tail variances: runs that trained to the end; everything else: every run,
    a run stopped on NaN/Inf with the accuracy of its last evaluated epoch (the checkpoint it leaves), so a
    method whose runs blow up is not averaged over its survivors only. `diverged` counts runs with any
    divergence reason."""
    finished = [r for r in runs if r["status"] == "finished"]
    out = {"runs": len(runs), "finished": len(finished), "stopped": len(runs) - len(finished),
           "diverged": sum(r["stability"]["diverged"] for r in runs),
           "nonfinite": sum("nonfinite" in r["stability"]["divergence"] for r in runs),
           "collapsed": sum("collapse" in r["stability"]["divergence"] for r in runs)}
    for k in ACC_KEYS:
        out[k] = _stats(r[k] for r in runs)
    for k in STAB_KEYS:
        out[k] = _stats(r["stability"].get(k) for r in (finished if k.endswith("_tail") else runs))
    out["loss_spikes_total"] = sum(r["stability"]["loss_spikes"] for r in runs)
    out["update_norm"] = _stats(r.get("update_norm") for r in runs)
    out["grad_over_ce"] = _stats(r.get("grad_over_ce") for r in runs)
    out["agreement"] = _stats(r.get("agreement") for r in runs)
    out["wall_s"] = _stats(r.get("wall_s") for r in runs)
    out["img_per_s"] = _stats(r.get("img_per_s") for r in runs)
    return out


def summarize(runs: Sequence[dict], methods: Sequence[str], lrs: Sequence[float]) -> dict:
    """`per_method_lr` (mean +- std over seeds) and `per_method` (pooled over the sweep, plus the worst rate)."""
    per_lr, per_method = [], []
    for m in methods:
        groups = []
        for lr in lrs:
            g = {"method": m, "lr": lr, **_group([r for r in runs if r["method"] == m and r["lr"] == lr])}
            groups.append(g)
            per_lr.append(g)
        pooled = {"method": m, **_group([r for r in runs if r["method"] == m])}
        means = [(g["final_top1"]["mean"], g["lr"]) for g in groups]
        worst = min(((v if v is not None else -1.0), lr) for v, lr in means)  # a rate where every run stopped is worst
        pooled["worst_lr"] = worst[1]
        pooled["worst_lr_final_top1"] = worst[0] if worst[0] >= 0 else None
        per_method.append(pooled)
    return {"per_method": per_method, "per_method_lr": per_lr}


def best_rates(per_method_lr: Sequence[dict]) -> dict[str, float]:
    """Each method's rate with the highest mean final top-1 over seeds (ties: the lower rate)."""
    best: dict[str, tuple[float, float]] = {}
    for g in per_method_lr:
        mean = g["final_top1"]["mean"]
        score = -1.0 if mean is None else mean  # a rate where every run stopped before an epoch is worst
        key = (score, -g["lr"])  # ties: the lower rate, whatever the sweep's order
        if g["method"] not in best or key > best[g["method"]]:
            best[g["method"]] = key
    return {m: -neg_lr for m, (_, neg_lr) in best.items()}


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy, a dependency of scikit-learn)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(runs: Sequence[dict], method: str, baseline: str, lr: float, lr_baseline: float,
                      key: str = "final_top1") -> dict:
    """Per-seed differences `method` minus `baseline` (same seed), their mean and a 95 % t-interval.

    A seed counts when both runs have the figure (a stopped run has the top-1 of its last
    evaluated epoch). `significant` is None below two seeds (no interval), else whether the
    interval excludes zero.
    """
    a = {r["seed"]: r[key] for r in runs if r["method"] == method and r["lr"] == lr}
    b = {r["seed"]: r[key] for r in runs if r["method"] == baseline and r["lr"] == lr_baseline}
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"method": method, "baseline": baseline, "lr": lr, "lr_baseline": lr_baseline, "key": key,
           "seeds": seeds, "diffs": diffs, "n": len(diffs), "mean": statistics.fmean(diffs) if diffs else None,
           "ci95": None, "significant": None, "p": None}
    if len(diffs) >= 2:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        half = t_quantile(0.5 + CONFIDENCE / 2, len(diffs) - 1) * se
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
        out["significant"] = not out["ci95"][0] <= 0.0 <= out["ci95"][1]
        out["p"] = _t_two_sided_p(out["mean"] / se, len(diffs) - 1) if se > 0 else (1.0 if out["mean"] == 0 else 0.0)
    return out


def _t_two_sided_p(t_stat: float, df: int) -> float:
    from scipy.stats import t

    return float(2 * t.sf(abs(t_stat), df))


# The study's decision rules, fixed before its runs (docs/results.md, "Does the knowledge transfer?"): each
# method at its own best rate, paired by seed against its baseline.
PRIMARY_MIN_GAIN = 1.0  # points of top-1: "SPOFA helps" needs at least this mean gain over the student alone
# No reading before this many complete seeds (every method at every rate): a decision on fewer is an interim look.
MIN_SEEDS_TO_READ = 5


SECONDARY = (("ofa", "none"), ("spofa", "ofa"), ("spofa-fw0.1", "spofa"), ("ofa-fw0.1", "ofa"))


def holm(pvalues: Sequence[float | None], alpha: float = 1 - CONFIDENCE) -> list[bool | None]:
    """Holm's step-down rejections of a family of p-values (None: not tested, not counted)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[bool | None] = [None] * len(pvalues)
    rejecting = True
    for k, (p, i) in enumerate(order):
        rejecting = rejecting and p <= alpha / (len(order) - k)
        out[i] = rejecting
    return out


def complete_seeds(runs: Sequence[dict], methods: Sequence[str], lrs: Sequence[float]) -> list[int]:
    """The seeds with a run of every method at every rate."""
    have: dict[int, set] = {}
    for r in runs:
        have.setdefault(r["seed"], set()).add((r["method"], r["lr"]))
    need = {(m, lr) for m in methods for lr in lrs}
    return sorted(s for s, got in have.items() if need <= got)


def bracketing(best: dict[str, float], lrs: Sequence[float]) -> dict:
    """Whether each method's best rate lies inside the sweep, so that its optimum is bracketed.

    Returns:
        `at_end`: {method: "lowest" | "highest" | "only"} for each method whose best rate is an end of the sweep;
        `extend`: the rates that would bracket them (half the lowest rate, twice the highest), where needed.
    """
    lo, hi = min(lrs), max(lrs)
    at_end = {m: "only" if lo == hi else "lowest" if lr == lo else "highest" for m, lr in best.items() if lr in (lo, hi)}
    extend = {x for m, lr in at_end.items() for x in (lo / 2 if best[m] == lo else None, hi * 2 if best[m] == hi else None)}
    return {"at_end": at_end, "extend": sorted(extend - {None})}


def decisions(paired: Sequence[dict], seeds_complete: int, at_end: dict[str, str]) -> list[dict]:
    """The pre-registered rules applied to the best-rate paired differences, in order: the gate (plain KD must beat
    the student alone, or the task cannot show transfer), the primary claim (SPOFA at least `PRIMARY_MIN_GAIN`
    points above the student alone, interval above zero), the secondary comparisons, Holm-corrected, and the
    stage-head weight's default (0.1 only if `spofa-fw0.1 - spofa` is positive and Holm-significant).

    Args:
        paired: `paired_comparisons` over the complete seeds.
        seeds_complete: how many seeds have every method at every rate; below `MIN_SEEDS_TO_READ` no rule is read
            (each row's `holds` is None, its figures are still given).
        at_end: the methods whose best rate is an end of the sweep (`bracketing`); the primary rule is not read
            (`holds` None) until the sweep is extended.

    Returns:
        Rows with the rule, the figures, `holds` (None: not read) and `note` (why a row is not read). A row is not
        read over fewer than `MIN_SEEDS_TO_READ` seeds (rule 6), the primary while a best rate is an end of the
        sweep (rule 5), the primary and secondary rows while the gate is not shown (rule 1).
    """
    best = {(p["method"], p["baseline"]): p for p in paired if p["at"] == "best rates"}
    out = []
    gate = best.get(("kd", "none"))
    shown = gate is not None and bool(gate["ci95"]) and gate["ci95"][0] > 0
    if gate is not None:
        out.append(_row("gate", "gate: kd - none, 95 % interval above zero", gate, shown))
    # Rule 1: without the gate no comparison is read as evidence of transfer (their figures are still given).
    unshown = None if shown else ("not read as evidence of transfer: the gate is not shown" if gate is not None
                                  else "not read as evidence of transfer: no gate (kd was not run)")
    primary = best.get(("spofa", "none"))
    if primary is not None:
        holds = bool(primary["ci95"]) and primary["ci95"][0] > 0 and primary["mean"] >= PRIMARY_MIN_GAIN
        # Rule 5: an optimum not bracketed may lie outside the sweep, so the primary waits for the extended sweep.
        ends = (f"best rate at an end of the sweep ({', '.join(at_end)}): not read until the sweep is extended"
                if at_end else None)
        out.append(_row("primary", f"primary: spofa - none >= +{PRIMARY_MIN_GAIN:g} with the 95 % interval above zero",
                        primary, None if ends or unshown else holds, "; ".join(n for n in (ends, unshown) if n) or None))
    tested = [p for p in (best.get(pair) for pair in SECONDARY) if p is not None and p["p"] is not None]
    for p, rejected in zip(tested, holm([p["p"] for p in tested])):
        out.append(_row("secondary", f"secondary (Holm over {len(tested)}): differs from zero", p,
                        None if unshown else rejected, unshown))
        if (p["method"], p["baseline"]) == ("spofa-fw0.1", "spofa"):
            out.append(_row("default", "stage-head weight: 0.1 becomes the default if spofa-fw0.1 - spofa is "
                                       "positive and significant after Holm", p, rejected and p["mean"] > 0))
    # Rule 6, row by row: a row is read over at least MIN_SEEDS_TO_READ seeds.
    return [{**d, "holds": None} if min(seeds_complete, d["n"]) < MIN_SEEDS_TO_READ else d for d in out]


def scored(runs: Sequence[dict], num_classes: int) -> list[dict]:
    """The runs as the decisions score them: a run stopped before its first evaluation has no top-1, and counts
    at chance level (100 / classes) rather than dropping out, so that a rate is never averaged, nor a method
    paired, over the seeds that survived it."""
    chance = chance_top1(num_classes)
    return [{**r, "final_top1": chance, "scored_at_chance": True} if r["final_top1"] is None else r for r in runs]


def _row(kind: str, rule: str, p: dict, holds: bool, note: str | None = None) -> dict:
    return {"kind": kind, "rule": rule, "comparison": f"{p['method']} - {p['baseline']}", **_fig(p), "holds": holds,
            "note": note}


def _fig(p: dict) -> dict:
    return {"n": p["n"], "mean": p["mean"], "ci95": p["ci95"], "p": p["p"], "lr": p["lr"], "lr_baseline": p["lr_baseline"]}


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def paired_comparisons(runs: Sequence[dict], methods: Sequence[str], lrs: Sequence[float],
                       best: dict[str, float]) -> list[dict]:
    """Every method against `none`, the feature methods against `ofa`, and SPOFA's variants (the ablations) against
    `spofa`, each where present: at each method's own best rate, then per rate."""
    against = {"none": lambda m: True, "ofa": lambda m: m not in ("none", "kd"), "spofa": lambda m: m.startswith("spofa-")}
    out = []
    for base, compared in against.items():
        if base not in methods:
            continue
        for m in methods:
            if m == base or not compared(m):
                continue
            out.append({**paired_difference(runs, m, base, best[m], best[base]), "at": "best rates"})
            out.extend({**paired_difference(runs, m, base, lr, lr), "at": f"lr {lr:g}"} for lr in lrs)
    return out
