"""`spofa compare`: every method trained the same way, side by side, with stability figures.

One teacher is trained (or found, or given) once and passed to every run as a
checkpoint. Every run is one `pipeline.distill()` call into

    <compare>/<method>-lr<lr>-seed<seed>/   (a normal run folder, plus done.json)

with the same student initialisation, data subset, data order, augmentation, schedule
and optimiser settings for every method at a given (lr, seed): only the loss differs.
Nothing is tuned per method. Seeds also draw the `train_fraction` subset, so the spread
over seeds covers the choice of the few training images as well as the initialisation.

Runs execute one after another. A run is finished when its folder holds `done.json`
(its record, written after `distill()` returns or stops on NaN/Inf); an interrupted
compare started again with `resume=True` skips finished runs and resumes a half-done
run from its `checkpoint-last.pt`. The compare folder also holds `compare.json` (the
settings), `report.json`, `report.md` and the PNG plots.

Stability figures are defined in `spofa_deploy.stability`.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .artifacts import RUNS_DIR, read_json, read_model_meta, versions, write_json
from .console import console
from .data import load_splits, parse_data_spec
from .distillers import DistillConfig
from .errors import TrainingDiverged, UserError
from .pipeline import STUDENT_FILE, TeacherOptions, distill, find_teacher
from .stability import (SPIKE_FACTOR, SPIKE_MIN_HISTORY, SPIKE_WINDOW, TAIL_FRACTION, COLLAPSE_MARGIN,
                        accuracy_figures, read_metrics, read_trace, stability)
from .train import CHECKPOINT, METRICS, TRACE, TrainConfig

DONE = "done.json"
COMPARE = "compare.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_TOP1 = "plot_val_top1.png"
PLOT_LOSS = "plot_train_loss.png"
PLOT_MEMA = "plot_mema_weights.png"

# Method name -> (pipeline method, DistillConfig overrides). The ablations of SPOFA:
# without MEMA (LayerNorm heads, alpha = beta = 1), without the output-level weights
# (beta = 1, alpha from MEMA), and without the LayerNorm, which is exactly `ofa`.
VARIANTS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "kd": ("kd", {}),
    "ofa": ("ofa", {}),
    "spofa": ("spofa", {}),
    "spofa-nomema": ("spofa", {"mema": False}),
    "spofa-nobeta": ("spofa", {"sample_weights": False}),
}
METHOD_ALIASES = {"spofa-noln": "ofa"}
ABLATIONS = ("spofa", "spofa-nomema", "spofa-nobeta", "ofa")
# Peak SGD rates of the default sweep (the student's own optimiser; 0.02 is `spofa distill`'s
# default). Chosen from single-seed probes of `none` alone (so no method picked them), mobilenetv3
# <- the digits ViT-B teacher, 10% of the training split, batch 16, 25 epochs, 2-core CPU:
# 0.02 -> 56.3% val top-1, 0.1 -> 27.6% (fragile: trains, but badly), 0.5 -> NaN at step 11
# (simply too high: nothing to compare). An earlier AdamW probe had no informative fragile
# rate: at 0.05 both none and spofa collapsed to chance.
DEFAULT_LRS = (0.005, 0.02, 0.1)

# Settings that change the numbers: a resumed compare must keep them.
RESULT_FIELDS = ("teacher", "student", "data", "img_size", "epochs", "batch_size", "train_fraction", "optimizer",
                 "weight_decay", "warmup_epochs", "feat_weight", "amp", "log_every", "on_nan", "clip_grad")


@dataclass
class CompareConfig:
    """What `spofa compare` trains. Defaults: an informative comparison on `digits` (low data, fragile rates)."""

    teacher: str = "vit_b"
    student: str = "mobilenetv3"
    data: str = "digits"
    methods: tuple[str, ...] = ("none", "kd", "ofa", "spofa")
    seeds: int = 3  # seeds 0 .. seeds-1
    lrs: tuple[float, ...] = DEFAULT_LRS
    epochs: int = 25
    batch_size: int = 16  # 9 steps per epoch on 144 images: 225 steps in 25 epochs
    img_size: int | None = None  # None: the data's natural size (32 for digits / CIFAR)
    train_fraction: float = 0.1  # ~14 training images per class on digits
    optimizer: str = "sgd"
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    feat_weight: float = 1.0
    amp: str = "auto"
    log_every: int = 1  # every step in the trace, so no spike is missed
    on_nan: str = "stop"
    clip_grad: float | None = None
    teacher_ckpt: str | None = None  # a teacher.safetensors; default: the teacher folder for this data
    teacher_epochs: int = 8
    teacher_pretrained: bool = True
    device: str = "auto"
    workers: int | None = None
    download: bool = False
    out: str | None = None

    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    def validate(self) -> None:
        if self.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {self.seeds}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise UserError(f"--lr-sweep needs positive rates, got {list(self.lrs)}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise UserError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be >= 1")
        parse_methods(self.methods)


@dataclass
class CompareResult:
    out: Path
    report: dict
    runs_done: int  # distill() calls made by this invocation
    runs_skipped: int  # finished earlier, read from done.json
    plots: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing helpers (used by the CLI)

def parse_methods(value: str | Iterable[str], ablations: bool = False) -> list[str]:
    """`"none,kd,ofa,spofa"` -> names, aliases resolved, duplicates dropped; `ablations` adds the SPOFA ablations."""
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    items += list(ABLATIONS) if ablations else []
    out: list[str] = []
    for m in items:
        m = METHOD_ALIASES.get(m, m)
        if m not in VARIANTS:
            raise UserError(f"unknown method '{m}': use {', '.join([*VARIANTS, *METHOD_ALIASES])}")
        if m not in out:
            out.append(m)
    if not out:
        raise UserError("--methods is empty")
    return out


def parse_lrs(value: str) -> tuple[float, ...]:
    """`"0.002,0.01,0.05"` -> (0.002, 0.01, 0.05)."""
    try:
        lrs = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--lr-sweep must be comma-separated numbers, got '{value}'") from None
    if not lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
        raise UserError(f"--lr-sweep needs positive rates, got '{value}'")
    return lrs


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-seed{seed}"


def latest_compare(root: str | Path = RUNS_DIR) -> Path:
    """The most recently started compare folder under `root` (for `--resume` without `--out`)."""
    found = sorted(Path(root).glob(f"*/{COMPARE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"--resume: no compare folder ({COMPARE}) under {root}/: pass --out")
    return found[-1].parent


def load_config(out: str | Path) -> CompareConfig:
    """The settings a compare folder was started with."""
    saved = read_json(Path(out) / COMPARE)["config"]
    names = {f.name for f in fields(CompareConfig)}
    cfg = CompareConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.methods, cfg.lrs = tuple(cfg.methods), tuple(cfg.lrs)
    return cfg


def resume_config(out: str | Path | None, **explicit) -> CompareConfig:
    """Saved settings of a compare folder, with the options given on the command line (not None) on top."""
    out = Path(out) if out else latest_compare()
    if not (out / COMPARE).is_file():
        raise UserError(f"--resume: {out} is not a compare folder (no {COMPARE})")
    return replace(load_config(out), out=str(out), **{k: v for k, v in explicit.items() if v is not None})


# ---------------------------------------------------------------------------------------------------------------------
# The compare

def ensure_teacher(cfg: CompareConfig, img_size: int) -> Path:
    """The one teacher of the compare, through distill's resolver and with the teacher recipe."""
    opts = TeacherOptions(name=cfg.teacher, checkpoint=cfg.teacher_ckpt, pretrained=cfg.teacher_pretrained)
    # The teacher recipe (AdamW, batch 32, lr 5e-4): the folder is shared with later `spofa distill` runs.
    opts.train = replace(opts.train, epochs=cfg.teacher_epochs, device=cfg.device, amp=cfg.amp, workers=cfg.workers)
    return find_teacher(opts, str(parse_data_spec(cfg.data)), img_size, download=cfg.download)


def _train_config(cfg: CompareConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, clip_grad=cfg.clip_grad,
                       amp=cfg.amp, device=cfg.device, seed=seed, workers=cfg.workers, log_every=cfg.log_every,
                       on_nan=cfg.on_nan)


def _loss_config(cfg: CompareConfig, method: str) -> DistillConfig:
    base, overrides = VARIANTS[method]
    return DistillConfig(method=base, feat_weight=cfg.feat_weight, **overrides)


def run_record(run_dir: Path, method: str, lr: float, seed: int, num_classes: int, *, stopped: bool = False,
               error: str | None = None, wall_s: float | None = None, resumed: bool = False) -> dict:
    """The record of one run, read from its folder (metrics.jsonl, trace.csv, student.json)."""
    metrics, trace = read_metrics(run_dir / METRICS), read_trace(run_dir / TRACE)
    acc = accuracy_figures(metrics)
    saved = {}
    if (run_dir / STUDENT_FILE).is_file():
        meta = read_model_meta(run_dir / STUDENT_FILE)
        saved = {"saved_top1": meta.get("top1"), "saved": meta.get("saved")}
    return {"name": run_dir.name, "method": method, "base_method": VARIANTS[method][0], "lr": lr, "seed": seed,
            "run_dir": str(run_dir), "status": "stopped" if stopped else "finished", "error": error,
            "resumed": resumed, **acc, **saved, "wall_s": wall_s,
            "stability": stability(trace, metrics, num_classes, stopped=stopped)}


def _fmt_secs(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _eta(done: dict[str, dict], remaining: list[tuple[str, float, int]]) -> float | None:
    """Seconds left: each remaining run costs the mean wall time of finished runs of its method (else of all runs)."""
    walls = [r["wall_s"] for r in done.values() if r.get("wall_s")]
    if not walls:
        return None
    by_method: dict[str, list[float]] = {}
    for r in done.values():
        if r.get("wall_s"):
            by_method.setdefault(r["method"], []).append(r["wall_s"])
    overall = statistics.fmean(walls)
    return sum(statistics.fmean(by_method[m]) if m in by_method else overall for m, _, _ in remaining)


def _machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU's model name is more use in a report than "x86_64"
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _data_info(cfg: CompareConfig, img_size: int, t_meta: dict) -> dict:
    """Split sizes the student sees (seed 0's subset; every seed draws the same class counts)."""
    import numpy as np

    splits = load_splits(cfg.data, img_size, t_meta["mean"], t_meta["std"], t_meta.get("interpolation", "bilinear"),
                         t_meta.get("crop_pct", 0.875), seed=0, train_fraction=cfg.train_fraction)
    counts = np.bincount(splits.train.labels, minlength=splits.num_classes)
    return {"num_classes": splits.num_classes, "train_images": len(splits.train), "val_images": len(splits.val),
            "train_per_class_min": int(counts.min()), "train_per_class_max": int(counts.max())}


def run_compare(cfg: CompareConfig, resume: bool = False) -> CompareResult:
    """Train every (method, lr, seed) of `cfg` one after another and write the report.

    Args:
        cfg: the settings (see `CompareConfig`).
        resume: continue the compare in `cfg.out` (default: the latest one): finished runs
            are skipped, a half-done run continues from its checkpoint. The settings in
            `RESULT_FIELDS` must match the saved ones; methods, seeds and rates may grow.

    Returns:
        `CompareResult` with the report dict (as in report.json).

    Raises:
        UserError: bad settings, an existing compare without `resume`, or mismatched settings on resume.
    """
    cfg.methods, cfg.lrs = tuple(parse_methods(cfg.methods)), tuple(cfg.lrs)
    cfg.validate()
    spec = parse_data_spec(cfg.data)
    img_size = cfg.img_size or spec.natural_size
    if resume and cfg.out is None:
        cfg.out = str(latest_compare())
    out = Path(cfg.out or RUNS_DIR / f"compare-{cfg.student}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    saved = read_json(out / COMPARE) if (out / COMPARE).is_file() else None
    if saved and not resume:
        raise UserError(f"{out} already holds a compare: pass --resume to continue it, or choose another --out")
    if resume and saved is None:
        raise UserError(f"--resume: {out} is not a compare folder (no {COMPARE})")
    if saved:
        diff = [f"{k}: {saved['config'].get(k)!r} -> {getattr(cfg, k)!r}" for k in RESULT_FIELDS
                if saved["config"].get(k) != getattr(cfg, k)]
        if diff:
            raise UserError(f"--resume with other settings than {out / COMPARE} ({'; '.join(diff)}): "
                            "start a new compare with another --out")
        if cfg.teacher_ckpt and saved.get("teacher_path") and Path(cfg.teacher_ckpt) != Path(saved["teacher_path"]):
            raise UserError(f"--resume with another teacher than {saved['teacher_path']}: start a new compare")
        cfg.teacher_ckpt = cfg.teacher_ckpt or saved.get("teacher_path")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    teacher_path = ensure_teacher(cfg, img_size)
    t_meta = read_model_meta(teacher_path)
    if int(t_meta["img_size"]) != img_size:
        raise UserError(f"teacher {teacher_path} was trained at {t_meta['img_size']}px, not {img_size}px")
    num_classes = int(t_meta["num_classes"])
    started = saved["started"] if saved else datetime.now().isoformat(timespec="seconds")
    header = {"config": {**asdict(cfg), "out": str(out)}, "img_size": img_size, "teacher_path": str(teacher_path),
              "started": started, "previous_wall_s": (saved or {}).get("previous_wall_s", 0.0)}
    write_json(out / COMPARE, header)
    data_info = _data_info(cfg, img_size, t_meta)

    plan = [(m, lr, s) for s in cfg.seed_list() for lr in cfg.lrs for m in cfg.methods]
    records: dict[str, dict] = {}
    for m, lr, s in plan:
        done = out / run_name(m, lr, s) / DONE
        if done.is_file():  # finished earlier: figures re-read from its folder, so they follow this code's definitions
            old = read_json(done)
            records[run_name(m, lr, s)] = run_record(
                done.parent, m, lr, s, num_classes, stopped=old.get("status") == "stopped", error=old.get("error"),
                wall_s=old.get("wall_s"), resumed=bool(old.get("resumed")))
    skipped = len(records)
    console.print(f"[bold]compare:[/] {len(plan)} runs ({len(cfg.methods)} methods x {len(cfg.lrs)} rates x "
                  f"{cfg.seeds} seeds) of {cfg.student} <- {t_meta['model']} on {spec}, "
                  f"{data_info['train_images']} train images (~{data_info['train_images'] // num_classes}/class), "
                  f"{cfg.epochs} epochs -> {out}" + (f"; {skipped} finished earlier" if skipped else ""))

    calls = 0
    teacher = TeacherOptions(name=cfg.teacher, checkpoint=str(teacher_path))
    for i, (m, lr, s) in enumerate(plan, 1):
        name = run_name(m, lr, s)
        if name in records:
            continue
        remaining = [p for p in plan if run_name(*p) not in records]
        console.rule(f"[bold]run {i}/{len(plan)}[/] {name} | {len(records)} done, {len(remaining)} to go, "
                     f"ETA {_fmt_secs(_eta(records, remaining))}")
        run_dir = out / name
        resumed = (run_dir / CHECKPOINT).is_file()
        stopped, error, t_run = False, None, time.perf_counter()
        calls += 1
        try:
            distill(cfg.student, teacher, cfg.data, VARIANTS[m][0], img_size, loss=_loss_config(cfg, m),
                    train=_train_config(cfg, lr, s), out=run_dir, resume=resumed, download=cfg.download,
                    train_fraction=cfg.train_fraction, latest=False)
        except TrainingDiverged as e:  # a result, not a failure of the compare
            stopped, error = True, str(e)
            console.print(f"[red]{name} diverged:[/] {e}")
        rec = run_record(run_dir, m, lr, s, num_classes, stopped=stopped, error=error,
                         wall_s=time.perf_counter() - t_run, resumed=resumed)
        write_json(run_dir / DONE, rec)
        records[name] = rec
        wall = header["previous_wall_s"] + time.perf_counter() - t0
        write_json(out / COMPARE, {**header, "previous_wall_s": wall})  # an interrupted session still counts
        write_report(out, cfg, header, data_info, t_meta, [records[run_name(*p)] for p in plan if run_name(*p) in records],
                     wall_s=wall, plots=False)

    runs = [records[run_name(*p)] for p in plan]
    wall = header["previous_wall_s"] + time.perf_counter() - t0
    report, plots = write_report(out, cfg, header, data_info, t_meta, runs, wall_s=wall, plots=True)
    write_json(out / COMPARE, {**header, "previous_wall_s": wall})
    return CompareResult(out, report, calls, skipped, plots)


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation

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
                  "its last evaluated epoch (the checkpoint it leaves); tail variances only over runs that trained "
                  "to the end",
    "final_top1": "val top-1 of the model after the last epoch; best_top1: best epoch; ema: the EMA weights",
}


# ---------------------------------------------------------------------------------------------------------------------
# Report

def _num(x: float | None, digits: int = 1) -> str:
    """Fixed point, or scientific for the huge loss ratios of runs that blew up."""
    return "-" if x is None else f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.2e}"


def _pm(s: dict, digits: int = 1) -> str:
    if s["mean"] is None:
        return "-"
    return _num(s["mean"], digits) + (f" ± {_num(s['std'], digits)}" if s["std"] is not None else "")


def _div(g: dict) -> str:
    return f"{g['diverged']} ({g['nonfinite']}, {g['collapsed']})"


def _g(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def build_report(cfg: CompareConfig, header: dict, data_info: dict, t_meta: dict, runs: Sequence[dict],
                 wall_s: float) -> dict:
    complete = len(runs) == len(cfg.methods) * len(cfg.lrs) * cfg.seeds
    return {
        "title": f"{cfg.student} <- {t_meta['model']} on {cfg.data}",
        "complete": complete,
        "config": header["config"],
        "img_size": header["img_size"],
        "seeds": cfg.seed_list(),
        "teacher": {"path": header["teacher_path"], "model": t_meta["model"], "top1": t_meta.get("top1"),
                    "source": t_meta.get("source")},
        "data": data_info,
        "machine": _machine(cfg.device if cfg.device != "auto" else _auto_device()),
        "versions": versions(),
        "started": header["started"],
        "written": datetime.now().isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "definitions": DEFINITIONS,
        **summarize(runs, cfg.methods, cfg.lrs),
        "runs": list(runs),
        "plots": [],
    }


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
    ("final top-1", lambda g: _pm(g["final_top1"])), ("best top-1", lambda g: _pm(g["best_top1"])),
    ("final EMA", lambda g: _pm(g["final_ema_top1"])), ("best EMA", lambda g: _pm(g["best_ema_top1"])),
    ("worst-rate top-1", lambda g: f"{_g(g['worst_lr_final_top1'], '.1f')} (lr {g['worst_lr']:g})"),
]
_METHOD_LR_COLS = [
    ("method", lambda g: g["method"]), ("lr", lambda g: f"{g['lr']:g}"), ("runs", lambda g: str(g["runs"])),
    ("diverged (NaN/Inf, collapse)", _div), ("final top-1", lambda g: _pm(g["final_top1"])),
    ("best top-1", lambda g: _pm(g["best_top1"])), ("final EMA", lambda g: _pm(g["final_ema_top1"])),
    ("best EMA", lambda g: _pm(g["best_ema_top1"])), ("loss var (tail)", lambda g: _pm(g["loss_var_tail"], 4)),
]
_GROUP_COLS = [
    ("spikes/run", lambda g: _pm(g["loss_spikes"])), ("CE spikes/run", lambda g: _pm(g["ce_spikes"])),
    ("CE peak/first", lambda g: _pm(g["ce_peak_ratio"])), ("CE var (tail)", lambda g: _pm(g["ce_var_tail"], 4)),
    ("grad cos", lambda g: _pm(g["grad_cos_mean"], 2)), ("s/run", lambda g: _g(g["wall_s"]["mean"], ".0f")),
    ("img/s", lambda g: _g(g["img_per_s"]["mean"], ",.0f")),
]
_RUN_COLS = [
    ("run", lambda r: r["name"]), ("status", lambda r: r["status"] + (" (resumed)" if r.get("resumed") else "")),
    ("final top-1", lambda r: _g(r["final_top1"], ".2f")), ("best top-1", lambda r: _g(r["best_top1"], ".2f")),
    ("final EMA", lambda r: _g(r["final_ema_top1"], ".2f")), ("best EMA", lambda r: _g(r["best_ema_top1"], ".2f")),
    ("spikes", lambda r: str(r["stability"]["loss_spikes"])), ("CE spikes", lambda r: _g(r["stability"].get("ce_spikes"), "d")),
    ("CE peak/first", lambda r: _num(r["stability"].get("ce_peak_ratio"))),
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
        f"seeds {', '.join(map(str, report['seeds']))}, l_ofa {c['feat_weight']:g}, clip {c['clip_grad'] or 'none'}; "
        "identical for every method",
        f"- machine: {m.get('gpu') or m['cpu']} ({m['device']}, {m['cpu_count']} cores), {m['platform']}; "
        f"total wall time {_fmt_secs(report['wall_s'])}",
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


def write_report(out: Path, cfg: CompareConfig, header: dict, data_info: dict, t_meta: dict, runs: Sequence[dict],
                 wall_s: float, plots: bool = True) -> tuple[dict, list[Path]]:
    """report.json + report.md (+ the PNGs when `plots`); returns (report, plot paths)."""
    report = build_report(cfg, header, data_info, t_meta, runs, wall_s)
    paths: list[Path] = []
    if plots:
        try:
            paths = plot_compare(out, report)
        except Exception as e:  # a missing plot must not lose the numbers
            console.print(f"[yellow]warning:[/] could not draw the compare plots: {e}")
    report["plots"] = [p.name for p in paths]
    write_json(out / REPORT_JSON, report)
    with open(out / REPORT_MD, "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
    return report, paths


# ---------------------------------------------------------------------------------------------------------------------
# Plots

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
    """Val top-1 over epochs per method, training loss over steps, MEMA weights of `spofa`: one column per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    runs, lrs, methods = report["runs"], report["config"]["lrs"], report["config"]["methods"]
    epochs = int(report["config"]["epochs"])
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    chance = 100.0 / report["data"]["num_classes"]
    sel = lambda m, lr: [r for r in runs if r["method"] == m and r["lr"] == lr]  # noqa: E731
    n = len(lrs)
    paths = []

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for m in methods:
            series = []
            for r in sel(m, lr):
                s = {float(e["epoch"]): float(e["val_top1"]) for e in read_metrics(Path(r["run_dir"]) / METRICS)
                     if "val_top1" in e}
                if r["status"] == "stopped" and s:  # it holds what it left, as in the tables; x marks the stop
                    last = max(s)
                    ax.plot([last], [s[last]], "x", ms=7, mew=1.5, color=colors[m])
                    s.update({float(e): s[last] for e in range(int(last) + 1, epochs + 1)})
                series.append(s)
            x, mean, lo, hi = _mean_curve(series)
            if x:
                ax.plot(x, mean, "o-", ms=3, lw=1.4, color=colors[m], label=m)
                ax.fill_between(x, lo, hi, color=colors[m], alpha=0.15)
        ax.axhline(chance, color="grey", ls=":", lw=1)
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("val top-1 (%) (mean, min-max over seeds)")
    _legend(axes[0, 0], fontsize=7)
    fig.suptitle(f"validation top-1: {report['title']}\n(x: a run stopped on NaN/Inf; it counts with its last "
                 "evaluated top-1 from there on)", fontsize=10)
    fig.tight_layout()
    paths.append(out / PLOT_TOP1)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.6), squeeze=False, sharex="col")
    for j, lr in enumerate(lrs):
        for row, (key, title) in enumerate((("loss", "total training loss"), ("loss_gt", "cross-entropy term"))):
            ax = axes[row, j]
            for m in methods:
                x, mean, _, _ = _mean_curve(_trace_series(sel(m, lr), key))
                if x:
                    ax.plot(x, mean, lw=1.0, color=colors[m], label=m)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_title(f"{title}, lr {lr:g}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1, j].set_xlabel("step")
    _legend(axes[0, 0], fontsize=7)
    fig.suptitle("training loss over steps (mean over seeds)", fontsize=10)
    fig.tight_layout()
    paths.append(out / PLOT_LOSS)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    spofa = [r for r in runs if r["method"] == "spofa"]
    if spofa:
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
        for ax, lr in zip(axes[0], lrs):
            rows = read_trace(Path(sel("spofa", lr)[0]["run_dir"]) / TRACE) if sel("spofa", lr) else []
            keys = [k for k in (rows[0] if rows else {}) if k.startswith("alpha_")] + \
                   [k for k in ("beta_mean", "beta_min") if rows and k in rows[0]]
            for k in keys:
                x, mean, _, _ = _mean_curve(_trace_series(sel("spofa", lr), k))
                ax.plot(x, mean, lw=1.0, ls="--" if k.startswith("beta") else "-", label=k)
            ax.set_title(f"spofa MEMA weights, lr {lr:g}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("weight (mean over seeds)")
        _legend(axes[0, 0], fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / PLOT_MEMA)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Terminal table

def summary_table(report: dict):
    """A compact rich table per (method, lr) that fits 80 columns: final top-1 as mean±std over seeds, the rest
    as means (best epochs and the other figures are in report.md)."""
    from rich import box
    from rich.table import Table

    mean = lambda st, d=1: _num(st["mean"], d)  # noqa: E731
    t = Table(title=f"spofa compare: {report['title']}\n{len(report['seeds'])} seeds, {report['config']['epochs']} epochs, "
                    f"{report['data']['train_images']} train images; top-1 %: mean±std over seeds, others: means",
              box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("method", "lr", "div.", "top-1", "EMA", "CE spk", "CE peak", "cos"):
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True, min_width=4)
    for g in report["per_method_lr"]:
        div = f"{g['diverged']}/{g['runs']}"
        t.add_row(g["method"], f"{g['lr']:g}", f"[red]{div}[/]" if g["diverged"] else div,
                  _pm(g["final_top1"]).replace(" ± ", "±"), mean(g["final_ema_top1"]),
                  mean(g["ce_spikes"]), mean(g["ce_peak_ratio"]), mean(g["grad_cos_mean"], 2))
    t.caption = ("div.: diverged runs (NaN/Inf or collapse to chance); CE spk: CE spikes per run; CE peak: largest "
                 "CE loss / first; cos: CE-vs-distillation gradient cosine")
    return t
