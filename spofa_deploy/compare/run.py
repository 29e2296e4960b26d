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

The settings and methods are `compare.config`'s; the plan, the compare folder and its resume
`compare.plan`'s; a run's record `compare.record`'s. Stability figures are defined in
`spofa_deploy.train.stability`; the report's statistics are in `compare.stats`, the report itself
(report.json, report.md) in `compare.report`, its plots in `spofa_deploy.train.plots`.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from spofa_deploy.artifacts import write_json
from spofa_deploy.compare.config import TEACHER_CACHE, VARIANTS, CompareConfig, CompareResult, parse_methods, run_name
from spofa_deploy.compare.plan import (compare_header, compare_teacher, cpu_kernels, data_info, open_compare,
                                       plan_runs, read_finished)
from spofa_deploy.compare.record import run_record
from spofa_deploy.compare.report import fmt_num, fmt_secs, write_report
from spofa_deploy.data.datasets import parse_data_spec
from spofa_deploy.data.splits import DataOptions
from spofa_deploy.errors import TrainingDiverged, UserError
from spofa_deploy.machine import available_memory_gb, resolve_device, set_threads, usable_cores
from spofa_deploy.method.distillers import DistillConfig
from spofa_deploy.parallel import map_in_processes
from spofa_deploy.pipeline import distill
from spofa_deploy.run_files import CHECKPOINT, COMPARE, DONE, METRICS, RUN_LOG
from spofa_deploy.train.stability import accuracy_figures, read_metrics
from spofa_deploy.teacher.cache import TeacherCacheOptions
from spofa_deploy.teacher.stage import TeacherOptions
from spofa_deploy.train.loop import TrainConfig

_log = logging.getLogger(__name__)


def run_compare(cfg: CompareConfig, resume: bool = False, jobs: int | None = 1, threads: int | None = None,
                report_only: bool = False) -> CompareResult:
    """Train every (method, lr, seed) of `cfg` and write the report.

    Args:
        cfg: the settings (see `CompareConfig`).
        resume: continue the compare in `cfg.out` (default: the latest one): finished runs
            are skipped, a half-done run continues from its checkpoint. The settings in
            `RESULT_FIELDS` must match the saved ones; methods, seeds and rates may grow.
        jobs: runs trained at once, each in its own process (its output in `<run>/log.txt`);
            1: one after another in this process; None: `auto_jobs`.
        threads: PyTorch CPU threads of each job's process (default: the usable cores / `jobs`).
        report_only: with `resume`, write the report of the runs finished so far and train nothing (no teacher
            needed).

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
    if report_only and not resume:
        raise UserError("--report-only reports a compare that exists: pass --resume (and --out)")
    plan = plan_runs(cfg)
    out, saved, finished = open_compare(cfg, resume, plan, report_only)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data = data_info(cfg, img_size)
    num_classes = data["num_classes"]
    records = read_finished(out, plan, num_classes)
    teacher_path, digest, t_meta = compare_teacher(cfg, saved, finished, img_size, num_classes)
    header = compare_header(cfg, out, saved, img_size, teacher_path, digest, t_meta)
    if not report_only:  # (a report changes no plan: the saved settings stay)
        write_json(out / COMPARE, header)
    skipped = len(records)
    _log.info(f"compare: {len(plan)} runs ({len(cfg.methods)} methods x {len(cfg.lrs)} rates x "
              f"{cfg.seeds} seeds) of {cfg.student} <- {t_meta['model']} on {spec}, "
              f"{data['train_images']} train images (~{data['train_images'] // num_classes}/class), "
              f"{cfg.epochs} epochs -> {out}" + (f"; {skipped} finished earlier" if skipped else ""))

    job = _Job(cfg, out, TeacherOptions(name=cfg.teacher, checkpoint=str(teacher_path)), img_size, num_classes)
    calls = 0
    todo = [] if report_only else [p for p in plan if run_name(*p) not in records]
    for rec in _runs(job, todo, records, len(plan), jobs, threads) if todo else ():
        calls += 1
        records[rec["name"]] = rec
        wall = header["previous_wall_s"] + time.perf_counter() - t0
        write_json(out / COMPARE, {**header, "previous_wall_s": wall})  # an interrupted session still counts
        write_report(out, cfg, header, data, t_meta, [records[run_name(*p)] for p in plan if run_name(*p) in records],
                     wall_s=wall, plots=False)

    runs = [records[run_name(*p)] for p in plan if run_name(*p) in records]
    wall = header["previous_wall_s"] + (0.0 if finished else time.perf_counter() - t0)  # (re-reports: no compare time)
    report, plots = write_report(out, cfg, header, data, t_meta, runs, wall_s=wall, plots=True)
    if not report_only:
        write_json(out / COMPARE, {**header, "previous_wall_s": wall})
    return CompareResult(out, report, calls, skipped, plots)


def _runs(job: _Job, todo: list[tuple], records: dict, total: int, jobs: int | None,
          threads: int | None) -> Iterator[dict]:
    """The records of the runs of `todo` as they finish: `jobs` at a time in worker processes, or one after
    another in this process."""
    given = threads
    if jobs is None:  # the default: on the CPU single-threaded worker processes (even one), so every run of a
        in_process = resolve_device(job.cfg.device).type != "cpu"  # compare has the same threads whatever memory allows
        jobs, threads = auto_jobs(job.cfg, threads, len(todo)), threads or 1
    else:
        in_process = jobs <= 1
    if in_process:
        import torch

        if given:  # (otherwise the process's own threads, as `spofa distill`)
            set_threads(given)
        _check_threads(job.cfg, records, torch.get_num_threads())
        return _run_sequential(job, todo, records, total)
    threads = threads or max(1, usable_cores() // jobs)
    _check_threads(job.cfg, records, threads)
    return _run_parallel(job, todo, records, total, jobs, threads)


def _check_threads(cfg: CompareConfig, records: dict, threads: int) -> None:
    """Warn when the runs about to train on the CPU get other thread counts than the finished ones: float sums
    follow the thread count, so their students would not be those of the compare as it started."""
    if resolve_device(cfg.device).type != "cpu":
        return
    earlier = sorted({r["threads"] for r in records.values() if r.get("device") == "cpu" and r.get("threads")})
    if earlier and earlier != [threads]:
        was = " or ".join(map(str, earlier))
        _log.warning(f"the runs finished earlier trained with {was} CPU thread{'s' * (earlier != [1])} each, these "
                     f"get {threads}: float sums follow the thread count, so the students differ from what "
                     f"{was} would give; pass --threads {earlier[-1]} to keep them alike")


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
    """The runs of `todo` one after another in this process, each introduced by a line with the ETA."""
    for k, point in enumerate(todo):
        _log.info(f"run {total - len(todo) + k + 1}/{total} {run_name(*point)} | {len(records)} done, "
                  f"{len(todo) - k} to go, ETA {fmt_secs(_eta(records, todo[k:]))}")
        yield job.run(point)


def _run_parallel(job: _Job, todo: list[tuple], records: dict, total: int, jobs: int, threads: int) -> Iterator[dict]:
    """The runs of `todo`, `jobs` at a time in worker processes, one line per run started and finished.

    Runs start in plan order (seed-major), so the first run of a seed is well ahead when the next
    ones read its teacher outputs from the cache; a run that gets there first computes and writes
    the same records itself. A failing run stops the compare (a diverged one is a result).
    """
    _log.info(f"{len(todo)} runs, {jobs} at a time, {threads} CPU thread(s) each; each run's output in <run>/{RUN_LOG}")
    if job.cfg.workers is None:  # the jobs are the parallelism: loader processes would only compete (measured: they
        job = replace(job, cfg=replace(job.cfg, workers=0))  # added ~10 s a run there; augmentation is seeded per sample)
    done = dict(records)
    left = list(todo)
    for point, rec in map_in_processes(job.run, todo, jobs=jobs, threads=threads,
                                       log_path=lambda p: job.out / run_name(*p) / RUN_LOG,
                                       on_start=lambda p: _log.info(f"  start {run_name(*p)}")):
        done[rec["name"]] = rec
        left.remove(point)
        eta = f", ETA {fmt_secs(_eta(done, left) / min(jobs, len(left)))}" if left else ""
        _log.info(f"  {'done' if rec['status'] == 'finished' else 'stop'}  {rec['name']} in "
                  f"{fmt_secs(rec['wall_s'])}: top-1 {fmt_num(rec.get('final_top1'))}% | {len(done)}/{total} done{eta}")
        yield rec


def _run_one(cfg: CompareConfig, run_dir: Path, point: tuple[str, float, int], teacher: TeacherOptions,
             img_size: int, num_classes: int, *, cache: Path) -> dict:
    """Train one (method, rate, seed) of the plan (resuming its checkpoint if one is there); its DONE record.

    A diverged run is a result (status "stopped"), not a failure of the compare.
    """
    m, lr, s = point
    resumed = (run_dir / CHECKPOINT).is_file()
    # A resumed run's earlier sessions: the epochs its checkpoint keeps (metrics.jsonl is their history).
    earlier = (accuracy_figures(read_metrics(run_dir / METRICS))["train_s"] or 0.0) if resumed else 0.0
    stopped, error, t_run = False, None, time.perf_counter()
    try:
        distill(student=cfg.student, teacher=teacher, method=VARIANTS[m][0],
                data=DataOptions(cfg.data, img_size, train_fraction=cfg.train_fraction, download=cfg.download),
                loss=_loss_config(cfg, m), train=_train_config(cfg, lr, s), out=run_dir, resume=resumed,
                latest=False, cache=TeacherCacheOptions(cache, format="fp32") if cfg.teacher_cache else None)
    except TrainingDiverged as e:
        stopped, error = True, str(e)
        _log.warning(f"{run_dir.name} diverged: {e}")
    import torch

    rec = run_record(run_dir, m, lr, s, num_classes, stopped=stopped, error=error,
                     wall_s=earlier + time.perf_counter() - t_run, resumed=resumed, threads=torch.get_num_threads(),
                     cpu_isa=cpu_kernels(cfg), device=resolve_device(cfg.device).type)
    write_json(run_dir / DONE, rec)
    return rec


def _train_config(cfg: CompareConfig, lr: float, seed: int) -> TrainConfig:
    """The training settings of one run: the compare's, at its rate and seed."""
    return TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, clip_grad=cfg.clip_grad,
                       amp=cfg.amp, device=cfg.device, seed=seed, workers=cfg.workers, log_every=cfg.log_every,
                       on_nan=cfg.on_nan)


def _loss_config(cfg: CompareConfig, method: str) -> DistillConfig:
    """The loss settings of one method of the compare: the shared ones with its variant's changes."""
    base, overrides = VARIANTS[method]
    return replace(cfg.loss, method=base, **overrides)


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
