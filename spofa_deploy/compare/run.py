"""`spofa compare`: every method trained the same way, side by side, with stability figures.

One teacher is trained (or found, or given) once and passed to every run as a
checkpoint. Every run is one `pipeline.distill()` call into

    <compare>/<method>-lr<lr>-seed<seed>/   (a normal run folder, plus done.json)

with the same student initialisation, data subset, data order, augmentation, schedule
and optimiser settings for every method at a given (lr, seed): only the loss differs.
Nothing is tuned per method. Seeds also draw the `train_fraction` subset, so the spread
over seeds covers the choice of the few training images as well as the initialisation.

Runs execute one after another, or `jobs` at a time, each in its own process (`run_compare`;
`auto_jobs` is the command's default: one single-threaded run per core on the CPU); a run
is a pure function of its (method, lr, seed), settings and CPU threads (float sums follow the thread
count; each record keeps its `threads`), so at equal threads per run the order and the number of jobs
do not change its numbers. A run is finished when its folder holds `done.json`
(its record, written after `distill()` returns or stops on NaN/Inf); an interrupted
compare started again with `resume=True` skips finished runs and resumes a half-done
run from its `checkpoint-last.pt`. The compare folder also holds `compare.json` (the
settings), `report.json`, `report.md` and the PNG plots.

Stability figures are defined in `spofa_deploy.train.stability`; the report (aggregation, paired
statistics, markdown) is `spofa_deploy.compare.report`; its plots are in `spofa_deploy.train.plots`.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from spofa_deploy.artifacts import RUNS_DIR, load_state, read_json, read_model_meta, sidecar_path, write_json
from spofa_deploy.console import console
from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.datasets import parse_data_spec
from spofa_deploy.models import Preprocessing
from spofa_deploy.method.distillers import DistillConfig
from spofa_deploy.errors import TrainingDiverged, UserError, check_choice
from spofa_deploy.compare.report import REPORT_JSON, _fmt_secs, fmt_num, write_report
from spofa_deploy.pipeline import DataOptions, TeacherCacheOptions, TeacherOptions, distill, find_teacher, recipe_teacher_path
from spofa_deploy.train.stability import accuracy_figures, read_metrics, read_trace, stability
from spofa_deploy.machine import available_memory_gb, cpu_isa, resolve_device, usable_cores
from spofa_deploy.parallel import map_in_processes
from spofa_deploy.teacher.cache_key import weights_digest
from spofa_deploy.run_files import CHECKPOINT, COMPARE, DONE, METRICS, RUN_LOG, STUDENT_FILE, TRACE
from spofa_deploy.train.loop import TrainConfig

TEACHER_CACHE = "teacher-cache"

# Method name -> (pipeline method, DistillConfig overrides). The ablations of SPOFA:
# without MEMA (LayerNorm heads, alpha = beta = 1), without the output-level weights
# (beta = 1, alpha from MEMA), two MEMA variants, and without the LayerNorm, which is exactly `ofa`.
VARIANTS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "kd": ("kd", {}),
    "ofa": ("ofa", {}),
    "spofa": ("spofa", {}),
    "spofa-nomema": ("spofa", {"mema": False}),
    "spofa-nobeta": ("spofa", {"sample_weights": False}),
    # MEMA variants beside the paper's formula: stage weights capped at 1 (damping only),
    # and a faster baseline (momentum 0.9 instead of 0.99).
    "spofa-damp": ("spofa", {"alpha_max": 1.0}),
    "spofa-m0.9": ("spofa", {"momentum": 0.9}),
    # The stage heads' weight of the OFA-KD authors' small-data runs (CIFAR-100: 0.1), beside the default 1.0.
    "ofa-fw0.1": ("ofa", {"feat_weight": 0.1}),
    "spofa-fw0.1": ("spofa", {"feat_weight": 0.1}),
}
METHOD_ALIASES = {"spofa-noln": "ofa"}
ABLATIONS = ("spofa", "spofa-nomema", "spofa-nobeta", "spofa-damp", "spofa-m0.9", "ofa")
# Peak SGD rates of the default sweep (the student's own optimiser; 0.02 is `spofa distill`'s
# default). Chosen from single-seed probes of `none` alone (so no method picked them), mobilenetv3
# <- the digits ViT-B teacher, 10% of the training split, batch 16, 25 epochs, 2-core CPU:
# 0.02 -> 56.3% val top-1, 0.1 -> 27.6% (fragile: trains, but badly), 0.5 -> NaN at step 11
# (simply too high: nothing to compare). An earlier AdamW probe had no informative fragile
# rate: at 0.05 both none and spofa collapsed to chance.
DEFAULT_LRS = (0.005, 0.02, 0.1)

# Settings that change the numbers: a resumed compare must keep them.
RESULT_FIELDS = ("teacher", "student", "data", "img_size", "epochs", "batch_size", "train_fraction", "optimizer",
                 "weight_decay", "warmup_epochs", "loss", "amp", "log_every", "on_nan", "clip_grad")


@dataclass
class CompareConfig:
    """What `spofa compare` trains. Defaults: an informative comparison on `digits` (low data, fragile rates)."""

    teacher: str = "vit_b"
    student: str = "mobilenetv3"
    data: str = "digits"
    methods: tuple[str, ...] = ("none", "kd", "ofa", "spofa")
    seeds: int = 5  # seeds 0 .. seeds-1: enough for a paired t-interval that can exclude zero
    lrs: tuple[float, ...] = DEFAULT_LRS
    # From the student-alone learning curve (docs/results.md, "Students trained to convergence"): at the best
    # rate, 25 epochs left the student at 76 % with training CE 0.98; 100 epochs reach 95 % (CE ~0.2),
    # where 150 add little. Earlier defaults (25) measured speed of fitting, not what distillation leaves.
    epochs: int = 100
    batch_size: int = 16  # 9 steps per epoch on 144 images: 900 steps in 100 epochs
    img_size: int | None = None  # None: the data's natural size (32 for digits / CIFAR)
    train_fraction: float = 0.1  # ~14 training images per class on digits
    optimizer: str = "sgd"
    # Measured (docs/results.md, "Student weight decay"): for the student alone at 100 epochs, 0.05 ended above
    # 0.005 and 0.0005 on each of 2 seeds (by 2-10 points; not significant with 2 seeds).
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # Distillation settings shared by every method (each variant changes only its own fields): the
    # same DistillConfig `spofa distill` takes, so every distill flag has its compare twin.
    loss: DistillConfig = field(default_factory=DistillConfig)
    amp: str = "auto"
    log_every: int = 1  # every step in the trace, so no spike is missed
    on_nan: str = "stop"
    clip_grad: float | None = None
    teacher_ckpt: str | None = None  # a teacher.safetensors; default: the teacher folder for this data
    teacher_epochs: int | None = None  # None: the teacher recipe's (`TeacherOptions`), within its CPU budget
    teacher_pretrained: bool = True
    device: str = "auto"
    workers: int | None = None
    download: bool = False
    out: str | None = None
    # Teacher outputs computed once per seed and read back by every method and rate (<out>/teacher-cache):
    # exact fp32 records, so the results are bitwise those of a compare without it (on CPU).
    teacher_cache: bool = True

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
        m = check_choice(METHOD_ALIASES.get(m, m), [*VARIANTS, *METHOD_ALIASES], "--methods", noun="method")
        if m not in out:
            out.append(m)
    if not out:
        raise UserError("--methods is empty")
    return out


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
    saved = dict(read_json(Path(out) / COMPARE)["config"])
    names = {f.name for f in fields(CompareConfig)}
    loss = saved.pop("loss", None) or {"feat_weight": saved.get("feat_weight", 1.0)}  # (compares before 0.2)
    cfg = CompareConfig(**{k: v for k, v in saved.items() if k in names})
    cfg.loss = DistillConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in loss.items()})
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

def _plain(v):
    """JSON's view of a value (tuples as lists), to compare saved settings with current ones."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def ensure_teacher(cfg: CompareConfig, img_size: int) -> Path:
    """The one teacher of the compare, through distill's resolver and with the teacher recipe."""
    opts = TeacherOptions(name=cfg.teacher, checkpoint=cfg.teacher_ckpt, pretrained=cfg.teacher_pretrained)
    # The teacher recipe: the folder is shared with later `spofa distill` runs. Epochs given are taken as given.
    opts.train = replace(opts.train, device=cfg.device, amp=cfg.amp, workers=cfg.workers)
    if cfg.teacher_epochs:
        opts.train, opts.cpu_budget = replace(opts.train, epochs=cfg.teacher_epochs), None
    return find_teacher(teacher=opts, data=DataOptions(cfg.data, img_size, download=cfg.download))


def _train_config(cfg: CompareConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, clip_grad=cfg.clip_grad,
                       amp=cfg.amp, device=cfg.device, seed=seed, workers=cfg.workers, log_every=cfg.log_every,
                       on_nan=cfg.on_nan)


def _loss_config(cfg: CompareConfig, method: str) -> DistillConfig:
    base, overrides = VARIANTS[method]
    return replace(cfg.loss, method=base, **overrides)


def run_record(run_dir: Path, method: str, lr: float, seed: int, num_classes: int, *, stopped: bool = False,
               error: str | None = None, wall_s: float | None = None, resumed: bool = False,
               threads: int | None = None, cpu_isa: str | None = None) -> dict:
    """The record of one run, read from its folder (metrics.jsonl, trace.csv, student.json); `threads` and
    `cpu_isa`: its CPU threads and the instruction set of its CPU kernels (both change its numbers)."""
    metrics, trace = read_metrics(run_dir / METRICS), read_trace(run_dir / TRACE)
    acc = accuracy_figures(metrics)
    saved = {}
    if sidecar_path(run_dir / STUDENT_FILE).is_file():  # (the metadata alone in an archived compare)
        meta = read_model_meta(run_dir / STUDENT_FILE)
        saved = {"saved_top1": meta.get("top1"), "saved": meta.get("saved"),
                 "agreement": (meta.get("transfer") or {}).get("agreement")}
    return {"name": run_dir.name, "method": method, "base_method": VARIANTS[method][0], "lr": lr, "seed": seed,
            "run_dir": str(run_dir), "status": "stopped" if stopped else "finished", "error": error,
            "resumed": resumed, **acc, **saved, "wall_s": wall_s, "threads": threads, "cpu_isa": cpu_isa,
            **_step_sizes(trace),
            "stability": stability(trace, metrics, num_classes, stopped=stopped)}


def _step_sizes(trace: list[dict]) -> dict:
    """Mean update norm and mean total / CE gradient-norm ratio over the measured steps: whether a method
    wins or loses only by taking larger steps at the same nominal rate."""
    def mean(key_fn):
        v = [x for x in map(key_fn, trace) if x is not None and math.isfinite(x)]
        return statistics.fmean(v) if v else None

    return {"update_norm": mean(lambda r: r.get("update_norm")),
            "grad_over_ce": mean(lambda r: r["gnorm_total"] / r["gnorm_ce"]
                                 if r.get("gnorm_total") is not None and r.get("gnorm_ce") else None)}


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


def _data_info(cfg: CompareConfig, img_size: int) -> dict:
    """Split sizes the student sees (seed 0's subset; every seed draws the same class counts)."""
    import numpy as np

    splits = load_splits(cfg.data, Preprocessing.identity(img_size), seed=0, train_fraction=cfg.train_fraction,
                         download=cfg.download)  # (sizes only: no image is transformed)
    counts = np.bincount(splits.train.labels, minlength=splits.num_classes)
    return {"num_classes": splits.num_classes, "train_images": len(splits.train), "val_images": len(splits.val),
            "train_per_class_min": int(counts.min()), "train_per_class_max": int(counts.max())}


# Resident memory of one job on the CPU, with headroom: 1.3 GB measured for ViT-B/16 -> MobileNetV3-L on digits
# (teacher, student, heads, optimiser state, data); bigger data or models take more, so jobs are capped by memory.
JOB_MEMORY_GB = 2.0


def auto_jobs(cfg: CompareConfig, threads: int | None, runs: int) -> int:
    """`spofa compare`'s default `--jobs`: one on a GPU; on the CPU one run per usable core (`threads` cores per
    run where given), no more than the memory holds (`JOB_MEMORY_GB` each) or the runs left. `run_compare` gives
    these jobs one thread each (unless `threads`), so the thread count of a run never depends on the memory free.

    Small students use threads poorly: on a 2-core CPU, two single-threaded jobs with the teacher cache finished a
    reduced compare 1.84x sooner than one process of two threads without it (docs/results.md, "Parallel jobs").
    """
    if resolve_device(cfg.device).type != "cpu":
        return 1
    memory = available_memory_gb()
    by_memory = int(memory // JOB_MEMORY_GB) if memory is not None else usable_cores()
    return max(1, min(usable_cores() // (threads or 1), by_memory, runs))


def run_compare(cfg: CompareConfig, resume: bool = False, jobs: int | None = 1, threads: int | None = None) -> CompareResult:
    """Train every (method, lr, seed) of `cfg` and write the report.

    Args:
        cfg: the settings (see `CompareConfig`).
        resume: continue the compare in `cfg.out` (default: the latest one): finished runs
            are skipped, a half-done run continues from its checkpoint. The settings in
            `RESULT_FIELDS` must match the saved ones; methods, seeds and rates may grow.
        jobs: runs trained at once, each in its own process (its output in `<run>/log.txt`);
            1: one after another in this process; None: `auto_jobs`.
        threads: PyTorch CPU threads of each job's process (default: the usable cores / `jobs`).

    Returns:
        `CompareResult` with the report dict (as in report.json).

    Raises:
        UserError: bad settings, an existing compare without `resume`, or mismatched settings on resume.
    """
    cfg.methods, cfg.lrs = tuple(parse_methods(cfg.methods)), tuple(cfg.lrs)
    cfg.validate()
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    spec = parse_data_spec(cfg.data)
    img_size = cfg.img_size or spec.natural_size
    plan = _plan(cfg)
    out, saved, finished = _open_compare(cfg, resume, plan)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data_info = _data_info(cfg, img_size)
    num_classes = data_info["num_classes"]
    records = _read_finished(out, plan, num_classes)
    if finished:  # every run finished: the report needs the teacher's record, not its weights (so a compare carried
        # without them reports again wherever its data is, even where the recipe cannot remake its teacher: docs/commands/compare.md)
        teacher_path, digest, t_meta = Path(saved["teacher_path"]), saved.get("teacher_sha256"), finished
    else:
        teacher_path = ensure_teacher(cfg, img_size)
        t_meta = read_model_meta(teacher_path)
        if int(t_meta["img_size"]) != img_size or int(t_meta["num_classes"]) != num_classes:
            raise UserError(f"teacher {teacher_path} was trained at {t_meta['img_size']}px for {t_meta['num_classes']} "
                            f"classes, not {img_size}px and {num_classes} classes ({cfg.data})")
        digest = weights_digest(load_state(teacher_path))
        if saved and saved.get("teacher_sha256", digest) != digest:
            hint = _isa_hint(cfg, saved) if _is_recipe_teacher(cfg, teacher_path) else ""
            raise UserError(f"--resume: the teacher {teacher_path} is not the one this compare started with (its weights "
                            f"differ from compare.json's teacher_sha256){hint}. Pass its teacher with --teacher-ckpt, "
                            "or start a new compare")
    teacher_isa = saved.get("cpu_isa") if saved else _cpu_kernels(cfg)  # (where the compare started: never rewritten)
    started = saved["started"] if saved else datetime.now().isoformat(timespec="seconds")
    header = {"config": {**asdict(cfg), "out": str(out)}, "img_size": img_size, "teacher_path": str(teacher_path),
              "teacher_sha256": digest, "teacher": {k: t_meta.get(k) for k in TEACHER_RECORD}, "cpu_isa": teacher_isa,
              "started": started, "previous_wall_s": (saved or {}).get("previous_wall_s", 0.0)}
    write_json(out / COMPARE, header)
    skipped = len(records)
    console.print(f"[bold]compare:[/] {len(plan)} runs ({len(cfg.methods)} methods x {len(cfg.lrs)} rates x "
                  f"{cfg.seeds} seeds) of {cfg.student} <- {t_meta['model']} on {spec}, "
                  f"{data_info['train_images']} train images (~{data_info['train_images'] // num_classes}/class), "
                  f"{cfg.epochs} epochs -> {out}" + (f"; {skipped} finished earlier" if skipped else ""))

    teacher = TeacherOptions(name=cfg.teacher, checkpoint=str(teacher_path))
    todo = [p for p in plan if run_name(*p) not in records]
    if jobs is None:  # the default: on the CPU single-threaded worker processes (even one), so every run of a
        in_process = resolve_device(cfg.device).type != "cpu"  # compare has the same threads whatever memory allows
        jobs, threads = auto_jobs(cfg, threads, len(todo)), threads or 1
    else:
        in_process = jobs <= 1
    job = _Job(cfg, out, teacher, img_size, num_classes)
    runner = _run_sequential(job, todo, records, len(plan)) if in_process else \
        _run_parallel(job, todo, records, len(plan), jobs, threads or max(1, usable_cores() // jobs))
    calls = 0
    for rec in runner:
        calls += 1
        records[rec["name"]] = rec
        wall = header["previous_wall_s"] + time.perf_counter() - t0
        write_json(out / COMPARE, {**header, "previous_wall_s": wall})  # an interrupted session still counts
        write_report(out, cfg, header, data_info, t_meta, [records[run_name(*p)] for p in plan if run_name(*p) in records],
                     wall_s=wall, plots=False)

    runs = [records[run_name(*p)] for p in plan]
    wall = header["previous_wall_s"] + (0.0 if finished else time.perf_counter() - t0)  # (re-reports: no compare time)
    report, plots = write_report(out, cfg, header, data_info, t_meta, runs, wall_s=wall, plots=True)
    write_json(out / COMPARE, {**header, "previous_wall_s": wall})
    return CompareResult(out, report, calls, skipped, plots)


def _plan(cfg: CompareConfig) -> list[tuple[str, float, int]]:
    """Every (method, lr, seed) of the compare, seed by seed, so that an interrupted compare has whole seeds."""
    return [(m, lr, s) for s in cfg.seed_list() for lr in cfg.lrs for m in cfg.methods]


# What compare.json keeps of the teacher's record, so that a finished compare reports without the teacher's weights.
TEACHER_RECORD = ("model", "top1", "source", "num_classes", "img_size")


def _saved_teacher(out: Path, saved: dict) -> dict | None:
    """The teacher's record as compare.json keeps it (or, for a compare from before it did, as its report.json does)."""
    if saved.get("teacher"):
        return saved["teacher"]
    return read_json(out / REPORT_JSON).get("teacher") if (out / REPORT_JSON).is_file() else None


def _cpu_kernels(cfg: CompareConfig) -> str | None:
    """The instruction set of the CPU kernels a compare on the CPU trains with (None on a GPU: not the CPU's)."""
    return cpu_isa() if resolve_device(cfg.device).type == "cpu" else None


def _is_recipe_teacher(cfg: CompareConfig, path: str | Path) -> bool:
    """Whether `path` is where the teacher recipe writes this compare's teacher (compared by
    teachers/<slug>/teacher.safetensors, so an absolute path or a moved checkout still counts)."""
    return Path(path).parts[-3:] == recipe_teacher_path(cfg.teacher, DataOptions(cfg.data, cfg.img_size)).parts[-3:]


def _isa_hint(cfg: CompareConfig, saved: dict) -> str:
    """Why a teacher retrained by the same recipe can differ: PyTorch's CPU kernels follow the instruction set
    (compare.json's `cpu_isa`: that of the machine the compare started on, when it ran on the CPU)."""
    here, there = _cpu_kernels(cfg), saved.get("cpu_isa")
    if there and there != here:
        where = f"this CPU's kernels are {here}" if here else "it would train on a GPU here"
        return (f": {where}, the compare started with {there} CPU kernels (a teacher trained on another kind of "
                f"machine has other weights), so resume on an {there} machine")
    return "" if there else (" (the same recipe on another kind of machine gives other weights: CPU kernels of "
                             "another instruction set, AVX2 vs AVX512, or another GPU)")


def _open_compare(cfg: CompareConfig, resume: bool, plan: list[tuple]) -> tuple[Path, dict | None, dict | None]:
    """The compare folder, its saved header (when it holds one) and, when every run of `plan` is finished, the
    saved teacher's record (then no teacher is needed); a new compare over an old one, a resume of nothing and a
    resume with other settings are refused (the teacher of the saved compare is kept)."""
    if resume and cfg.out is None:
        cfg.out = str(latest_compare())
    out = Path(cfg.out or RUNS_DIR / f"compare-{cfg.student}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    saved = read_json(out / COMPARE) if (out / COMPARE).is_file() else None
    if saved and not resume:
        raise UserError(f"{out} already holds a compare: pass --resume to continue it, or choose another --out")
    if resume and saved is None:
        raise UserError(f"--resume: {out} is not a compare folder (no {COMPARE})")
    if saved:
        now = asdict(cfg)
        diff = [f"{k}: {saved['config'].get(k)!r} -> {now[k]!r}" for k in RESULT_FIELDS
                if _plain(saved["config"].get(k)) != _plain(now[k])]
        if diff:
            raise UserError(f"--resume with other settings than {out / COMPARE} ({'; '.join(diff)}): "
                            "start a new compare with another --out")
        before = saved.get("teacher_path")
        given = cfg.teacher_ckpt if cfg.teacher_ckpt and Path(cfg.teacher_ckpt) != Path(before or "") else None
        finished = _saved_teacher(out, saved) if all((out / run_name(*p) / DONE).is_file() for p in plan) else None
        if finished:
            if given:
                console.print("note: every run of this compare is finished, so --teacher-ckpt is not used")
            cfg.teacher_ckpt = saved["config"].get("teacher_ckpt")
            return out, saved, finished
        if not saved.get("teacher_sha256"):  # (compares before teacher digests: the path is all there is)
            if given and before:
                raise UserError(f"--resume with another teacher than {before}: start a new compare")
        elif before and not Path(before).is_file():
            if not given and not _is_recipe_teacher(cfg, before):  # (no recipe can remake it)
                raise UserError(f"--resume: this compare's teacher {before} is missing: pass it with --teacher-ckpt "
                                "(it is checked against compare.json's teacher_sha256)")
            recipe = recipe_teacher_path(cfg.teacher, DataOptions(cfg.data, cfg.img_size))
            if not given and not recipe.is_file() and saved.get("cpu_isa") not in (None, _cpu_kernels(cfg)):
                # (a retrain here would take the teacher's whole stage and then be refused by the digest)
                raise UserError(f"--resume: this compare's teacher {before} is missing and retrained here it would be "
                                f"another teacher{_isa_hint(cfg, saved)}, or pass the teacher with --teacher-ckpt")
            before = None  # moved to another machine: found or retrained by the recipe, then checked by its digest
        cfg.teacher_ckpt = given or before
    return out, saved, None


def _read_finished(out: Path, plan: list[tuple], num_classes: int) -> dict[str, dict]:
    """The records of the runs of `plan` that finished earlier (those with a DONE file), by run name.

    Their figures are re-read from the run folders, so they follow this code's definitions.
    """
    records = {}
    for m, lr, s in plan:
        done = out / run_name(m, lr, s) / DONE
        if done.is_file():
            old = read_json(done)
            records[run_name(m, lr, s)] = run_record(
                done.parent, m, lr, s, num_classes, stopped=old.get("status") == "stopped", error=old.get("error"),
                wall_s=old.get("wall_s"), resumed=bool(old.get("resumed")), threads=old.get("threads"),
                cpu_isa=old.get("cpu_isa"))
    return records


@dataclass(frozen=True)
class _Job:
    """What every run of one compare shares (sent whole to each worker process)."""

    cfg: CompareConfig
    out: Path
    teacher: TeacherOptions
    img_size: int
    num_classes: int

    def run(self, point: tuple[str, float, int]) -> dict:
        return _run_one(self.cfg, self.out / run_name(*point), point, self.teacher, self.img_size, self.num_classes,
                        cache=self.out / TEACHER_CACHE)


def _run_sequential(job: _Job, todo: list[tuple], records: dict, total: int) -> Iterator[dict]:
    """The runs of `todo` one after another in this process, each introduced by a rule with the ETA."""
    for k, point in enumerate(todo):
        console.rule(f"[bold]run {total - len(todo) + k + 1}/{total}[/] {run_name(*point)} | {len(records)} done, "
                     f"{len(todo) - k} to go, ETA {_fmt_secs(_eta(records, todo[k:]))}")
        yield job.run(point)


def _run_parallel(job: _Job, todo: list[tuple], records: dict, total: int, jobs: int, threads: int) -> Iterator[dict]:
    """The runs of `todo`, `jobs` at a time in worker processes, one line per run started and finished.

    Runs start in plan order (seed-major), so the first run of a seed is well ahead when the next
    ones read its teacher outputs from the cache; a run that gets there first computes and writes
    the same records itself. A failing run stops the compare (a diverged one is a result).
    """
    console.print(f"{len(todo)} runs, {jobs} at a time, {threads} CPU thread(s) each; each run's output in <run>/{RUN_LOG}")
    if job.cfg.workers is None:  # the jobs are the parallelism: loader processes would only compete (measured: they
        job = replace(job, cfg=replace(job.cfg, workers=0))  # added ~10 s a run there; augmentation is seeded per sample)
    done = dict(records)
    left = list(todo)
    for point, rec in map_in_processes(job.run, todo, jobs=jobs, threads=threads,
                                       log_path=lambda p: job.out / run_name(*p) / RUN_LOG,
                                       on_start=lambda p: console.print(f"  start {run_name(*p)}")):
        done[rec["name"]] = rec
        left.remove(point)
        eta = f", ETA {_fmt_secs(_eta(done, left) / min(jobs, len(left)))}" if left else ""
        console.print(f"  {'done' if rec['status'] == 'finished' else '[red]stop[/]'}  {rec['name']} in "
                      f"{_fmt_secs(rec['wall_s'])}: top-1 {fmt_num(rec.get('final_top1'))}% | {len(done)}/{total} done{eta}")
        yield rec


def _run_one(cfg: CompareConfig, run_dir: Path, point: tuple[str, float, int], teacher: TeacherOptions,
             img_size: int, num_classes: int, *, cache: Path) -> dict:
    """Train one (method, rate, seed) of the plan (resuming its checkpoint if one is there); its DONE record.

    A diverged run is a result (status "stopped"), not a failure of the compare.
    """
    m, lr, s = point
    resumed = (run_dir / CHECKPOINT).is_file()
    stopped, error, t_run = False, None, time.perf_counter()
    try:
        distill(student=cfg.student, teacher=teacher, method=VARIANTS[m][0],
                data=DataOptions(cfg.data, img_size, train_fraction=cfg.train_fraction, download=cfg.download),
                loss=_loss_config(cfg, m), train=_train_config(cfg, lr, s), out=run_dir, resume=resumed,
                latest=False, cache=TeacherCacheOptions(cache, format="fp32") if cfg.teacher_cache else None)
    except TrainingDiverged as e:
        stopped, error = True, str(e)
        console.print(f"[red]{run_dir.name} diverged:[/] {e}")
    import torch

    rec = run_record(run_dir, m, lr, s, num_classes, stopped=stopped, error=error,
                     wall_s=time.perf_counter() - t_run, resumed=resumed, threads=torch.get_num_threads(),
                     cpu_isa=_cpu_kernels(cfg))
    write_json(run_dir / DONE, rec)
    return rec
