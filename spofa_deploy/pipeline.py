"""Distillation as a library function: what `spofa distill` runs.

`distill()` finds or trains the teacher for this data (`spofa_deploy.teacher.stage.find_teacher`),
builds the student and the method's training task, trains, and writes the run folder:

    runs/<name>/teacher.safetensors + teacher.json   (the frozen teacher it used)
    runs/<name>/student.safetensors + student.json   (plain timm student: no heads)
    runs/<name>/checkpoint-last.pt, metrics.jsonl, trace.csv (+ trace.png)

Its option groups live beside the code that reads them and are importable from here too: `DataOptions`
(`data.splits`), `TeacherOptions` (`teacher.stage`), `TeacherCacheOptions` (`teacher.cache`).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from spofa_deploy.artifacts import load_model, read_json, read_model_meta, save_model, sidecar_path, write_json
from spofa_deploy.data.datasets import Splits, parse_data_spec
from spofa_deploy.data.loaders import make_loader
from spofa_deploy.data.splits import DataOptions, load_data, load_splits
from spofa_deploy.errors import UserError, check_choice, os_error
from spofa_deploy.limits import check_img_size, check_model_input
from spofa_deploy.machine import resolve_device
from spofa_deploy.method.distillers import METHODS, DistillConfig, create_task
from spofa_deploy.models import Preprocessing, count_params, create_model, resolve_model_name
from spofa_deploy.run_dirs import latest_run, mark_latest, new_run_dir, release_run
from spofa_deploy.run_files import CHECKPOINT, STUDENT_FILE, TEACHER_FILE, TRACE, TRACE_PLOT, load_checkpoint
from spofa_deploy.teacher.cache import TeacherCacheOptions
from spofa_deploy.teacher.stage import TeacherOptions, check_settings, find_teacher, model_meta
from spofa_deploy.train import distributed
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.train.loop import FitResult, TrainConfig, fit, resolve_amp, resumed_config

_log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What a distillation made: its run folder, the student and teacher files with their metadata, the training."""

    run_dir: Path
    student_path: Path
    teacher_path: Path
    student: dict
    teacher: dict
    fit: FitResult
    head_params: int
    student_params: int


def distill(*, student: str = "mobilenetv3", teacher: TeacherOptions | None = None, method: str = "spofa",
            data: DataOptions | None = None, loss: DistillConfig | None = None, train: TrainConfig | None = None,
            cache: TeacherCacheOptions | None = None, out: str | Path | None = None, resume: bool = False,
            latest: bool = True, hooks: Hooks | None = None) -> DistillResult:
    """Distil `teacher` into `student` on `data` with `method`; see the module docstring for outputs.

    Args:
        student: timm name or alias of the student CNN.
        teacher: where the teacher comes from (and its stage's recipe, if it must be trained).
        method: spofa | ofa | kd | none.
        data, loss, train: the data options, loss settings and optimisation settings (defaults if None).
        cache: the teacher-output cache (None: the teacher runs on every training view).
        out, resume: the run folder (default `runs/<name>-<time>`; with `resume`, `runs/latest`), and whether
            to continue it from its checkpoint (refused when the run was trained with other settings).
        latest: point `runs/latest` at this run (`spofa compare` keeps its runs out of it).
        hooks: the training loop's hooks (`on_best` is distill's own).
    """
    teacher, data, train = teacher or TeacherOptions(), data or DataOptions(), train or TrainConfig()
    method = check_choice(method, METHODS, "--method")
    loss = replace(loss or DistillConfig(), method=method)
    spec = _check_inputs(student, teacher, data, train)
    dist = distributed.init_from_env(train.device)
    run_info = {"student": resolve_model_name(student), "method": method, "loss": loss.to_dict(), "data": str(spec),
                "img_size": data.img_size, "train_fraction": data.train_fraction}
    run, saved = _open_run(out, resume, run_info, is_main=dist.is_main)
    tpath, t_model, t_meta = _resolve_teacher(run, teacher, data, resume=resume)
    img_size = int(t_meta["img_size"])
    prep = Preprocessing.from_meta(t_meta, img_size)
    splits = _load_data(data, prep, train, tpath, t_meta)
    if dist.is_main and tpath != run / TEACHER_FILE:
        _link_or_copy(tpath, run / TEACHER_FILE)
        write_json(run / "teacher.json", {**t_meta, "copied_from": str(tpath)})

    torch.manual_seed(train.seed)
    s_model = create_model(student, splits.num_classes, img_size)
    task = create_task(method, s_model, t_model, loss, splits.num_classes,
                       sync=distributed.all_reduce_mean if dist.enabled else None)
    head_params = count_params(task.extra_state()) if task.extra_state() is not None else 0
    _log.info(f"distill: {resolve_model_name(student)} <- {t_meta['model']} ({method}) on {spec}, "
              f"{img_size}px, {len(splits.train)} train / {len(splits.val)} val -> {run}")
    spath = run / STUDENT_FILE
    meta = model_meta(s_model, student, splits, img_size, prep.meta(), "student", method=method, teacher=t_meta["model"],
                       teacher_file=TEACHER_FILE, teacher_top1=t_meta.get("top1"), teacher_source=t_meta.get("source"), loss=loss.to_dict(),
                       train=dict(train.__dict__), train_fraction=data.train_fraction)
    if dist.is_main and latest:  # (`spofa compare` keeps its runs out of runs/latest)
        mark_latest(run)
    tcache = None
    if cache is not None and method != "none":
        tcache = _open_teacher_cache(cache, t_model=t_model, data=data, splits=splits, img_size=img_size, prep=prep,
                                     train=train, loss=loss, saved_config=saved["config"] if saved is not None else None)
    result = fit(task, splits, train, run, resume=resume, label=method,
                 hooks=replace(hooks or Hooks(), on_best=_save_student(spath, meta)),
                 run_info={**run_info, "img_size": img_size}, teacher_cache=tcache)
    _finish(run, splits, is_main=dist.is_main)
    if dist.is_main and spath.is_file():
        _record_transfer(spath, t_model, t_meta, splits, train, distilled=method != "none")
    distributed.barrier()
    return DistillResult(run, spath, run / TEACHER_FILE, read_model_meta(spath), t_meta, result, head_params,
                         count_params(s_model))


def _check_inputs(student: str, teacher: TeacherOptions, data: DataOptions, train: TrainConfig):
    """Everything cheap to check, before any folder is made or any training starts; returns the parsed data spec."""
    resolve_model_name(student)
    resolve_model_name(teacher.name)
    check_settings(train, teacher.train)
    if check_img_size(data.img_size) is not None:  # (None: the teacher's own size)
        check_model_input(student, data.img_size, "student")
        if not teacher.checkpoint:  # (a checkpoint's size is checked against it when it is read)
            check_model_input(teacher.name, data.img_size, "teacher")
    spec = parse_data_spec(data.spec)
    # Read the data once (cheap: no transforms run) so a bad --data fails before any work.
    load_splits(spec, Preprocessing.identity(), download=data.download, skip_corrupt=data.skip_corrupt)
    return spec


def _open_run(out: str | Path | None, resume: bool, run_info: dict, *, is_main: bool) -> tuple[Path, dict | None]:
    """The run folder (rank 0 names it, every rank uses it) and, with `resume`, its checkpoint.

    A resume of a run trained with other settings, and a new run over an existing one, are refused
    before anything is written.
    """
    if resume and out is None:
        out = latest_run()
    run = distributed.broadcast_object(new_run_dir(out, f"{run_info['student']}-{run_info['method']}", resume=resume,
                                               writer="spofa distill") if is_main else None)
    if resume and not (run / CHECKPOINT).is_file():
        raise UserError(f"--resume: no {CHECKPOINT} in {run}")
    saved = load_checkpoint(run / CHECKPOINT) if resume else None
    if saved is not None:  # an unreadable checkpoint, or one of other settings, is refused before runs/latest moves
        _check_resume(saved.get("run") or _legacy_run_info(run), run_info)
    if not resume and (run / CHECKPOINT).is_file():
        raise UserError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    return run, saved


def _check_resume(saved: dict | None, given: dict) -> None:
    """Refuse a --resume whose method, loss or data settings differ from the run's, naming both values."""
    if not saved:
        return
    flat_saved = {**{k: v for k, v in saved.items() if k != "loss"}, **saved.get("loss", {})}
    flat_given = {**{k: v for k, v in given.items() if k != "loss"}, **given.get("loss", {})}
    for key, was in flat_saved.items():
        now = flat_given.get(key)
        if key not in flat_given or now is None or was is None:
            continue  # (img_size None: taken from the teacher, as the run did)
        if (list(was) if isinstance(was, (list, tuple)) else was) != (list(now) if isinstance(now, (list, tuple)) else now):
            name = {"student": "student", "data": "data", "img_size": "img-size"}.get(key)
            flag_now = f"--{name} {now}" if name else _flag(key, now)
            flag_was = f"--{name} {was}" if name else _flag(key, was)
            raise UserError(f"--resume: this run was trained with {flag_was}, but the command gives {flag_now}: "
                            f"repeat the run's settings, or start a new run without --resume")


def _flag(key: str, value) -> str:
    """A setting as its flag on the command line, for the message of a refused resume."""
    if isinstance(value, bool):
        return f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}"
    if isinstance(value, (list, tuple)):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"--{key.replace('_', '-')} {value}"


def _legacy_run_info(run: Path) -> dict | None:
    """Checkpoints written before run settings were saved in them: the student.json of the run, if any."""
    meta_path = run / "student.json"
    if not meta_path.is_file():
        return None
    m = read_json(meta_path)
    return {"method": m.get("method"), "loss": m.get("loss") or {}}


def _resolve_teacher(run: Path, teacher: TeacherOptions, data: DataOptions, *, resume: bool):
    """The run's teacher (path, model, metadata): its own copy on resume, else found or trained for this data."""
    tpath = run / TEACHER_FILE
    if not (resume and tpath.is_file()):
        tpath = find_teacher(teacher=teacher, data=data)
    t_model, t_meta = load_model(tpath)
    if data.img_size and int(t_meta["img_size"]) != data.img_size:
        raise UserError(f"teacher {tpath} was trained at {t_meta['img_size']}px, not {data.img_size}px")
    if teacher.checkpoint and resolve_model_name(teacher.name) != t_meta["model"]:
        _log.info(f"note: the teacher is {t_meta['model']} from --teacher-ckpt {tpath}; --teacher "
                  f"{teacher.name} is not used")
    return tpath, t_model, t_meta


def _load_data(data: DataOptions, prep: Preprocessing, train: TrainConfig, tpath: Path, t_meta: dict) -> Splits:
    """The splits with the teacher's preprocessing; refused when the teacher knows other classes."""
    splits = load_data(data, prep, seed=train.seed, device=train.device)
    if t_meta.get("classes") != splits.classes:
        theirs = f"{splits.num_classes}" if splits.num_classes != t_meta["num_classes"] else "other class names:"
        raise UserError(f"teacher {tpath} has {t_meta['num_classes']} classes {t_meta.get('classes', [])[:5]}..., "
                        f"but {splits.spec} has {theirs} {splits.classes[:5]}...: train a teacher on this data "
                        "(`spofa teacher`)")
    return splits


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):  # (also a hard link made earlier: nothing to do)
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)  # same file system: no copy of a large teacher
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:  # a full or read-only disk: no partial copy left behind
        tmp.unlink(missing_ok=True)
        raise (os_error(e, dst) or e) from e


def _save_student(path: Path, meta: dict):
    """The `on_best` hook of a distillation: the best of model and EMA, with its figures."""

    def save(net, best):
        save_model(path, net, {**meta, "top1": best["top1"], "top5": best["ema_top5" if best["source"] == "ema" else "model_top5"],
                               "model_top1": best["model_top1"], "ema_top1": best["ema_top1"], "saved": best["source"],
                               "epoch": best["epoch"]})

    return save


def teacher_cache_key(t_model: torch.nn.Module, splits: Splits, *, img_size: int, prep: Preprocessing,
                      train: TrainConfig, skip_corrupt: bool, train_fraction):
    """The teacher cache's key of a run's training views: everything the teacher's logits depend on.

    Distillation and QAT both key their caches here, so a record is shared exactly when the views are the same.
    """
    from spofa_deploy.teacher.cache_key import CacheKey, split_digest, weights_digest

    ds, dist = splits.train, distributed.info()
    if isinstance(getattr(ds, "images", None), np.ndarray):
        members = ds.images
    else:  # image files: path, size and mtime, so a replaced file changes the key
        members = [f"{p}|{st.st_size}|{st.st_mtime_ns}" for p, st in ((p, os.stat(p)) for p in ds.paths)]
    device = resolve_device(train.device)
    compute = (f"{device.type}/{resolve_amp(train.amp, device)}/batch{train.batch_size // dist.world}/"
               f"rank{dist.rank}of{dist.world}/torch{torch.__version__}")
    return CacheKey(teacher=weights_digest(t_model.state_dict()), data=str(splits.spec),
                    split=split_digest(ds.labels, members), num_samples=len(ds), img_size=img_size, mean=prep.mean,
                    std=prep.std, interpolation=prep.interpolation, crop_pct=prep.crop_pct,
                    augmentation=f"{ds.transform!r} skip_corrupt={skip_corrupt}", seed=train.seed,
                    train_fraction=train_fraction, compute=compute)


def _open_teacher_cache(cache: TeacherCacheOptions, *, t_model, data: DataOptions, splits: Splits, img_size: int,
                        prep: Preprocessing, train: TrainConfig, loss: DistillConfig, saved_config: dict | None):
    """The teacher cache of this run's training views, keyed by everything the logits depend on."""
    from spofa_deploy.teacher.cache import TeacherCache

    if saved_config is not None:  # the loop trains with the checkpoint's settings: key the cache by them
        train = resumed_config(train, saved_config)
    key = teacher_cache_key(t_model, splits, img_size=img_size, prep=prep, train=train,
                            skip_corrupt=data.skip_corrupt, train_fraction=data.train_fraction)
    dist = distributed.info()
    temperature = loss.kd_temperature if loss.method == "kd" else loss.temperature
    tcache = TeacherCache.open(cache.folder, key, num_classes=splits.num_classes, fmt=cache.format,
                               temperature=temperature, max_gb=cache.max_gb)
    if dist.is_main:
        if tcache.note:
            _log.info(tcache.note)
        _log.info(tcache.describe(train.epochs))
    return tcache


def _finish(run: Path, splits: Splits, *, is_main: bool) -> None:
    """After training: the trace plot and the count of skipped unreadable images (rank 0), then every rank waits."""
    if is_main:
        _plot_trace(run)
        bad = sorted(set(getattr(splits.train, "corrupt", ())) | set(getattr(splits.val, "corrupt", ())))
        if bad:  # (counted in this process: with --workers > 0 the loader workers hold their own counts)
            _log.warning(f"skipped {len(bad)} unreadable image(s) (--skip-corrupt), e.g. {bad[0]}")
        # Trained: another writer is now refused by the run's checkpoint, so the folder's lock can go.
        release_run(run)
    distributed.barrier()


def _plot_trace(run: Path) -> None:
    from spofa_deploy.train.plots import plot_trace

    try:
        plot_trace(run / TRACE, run / TRACE_PLOT)
    except Exception as e:  # a missing plot must never fail a finished training run
        _log.warning(f"could not plot the trace: {e}")


def _record_transfer(spath: Path, t_model: torch.nn.Module, t_meta: dict, splits: Splits, train: TrainConfig, *,
                     distilled: bool) -> None:
    """`student.json`'s `transfer`: the student's top-1 agreement with its teacher on the validation split, and
    (distilled students) whether the teacher could have taught it anything (`transfer_check`)."""
    from spofa_deploy.accuracy import agreement, transfer_check

    s_meta = read_model_meta(spath)
    device = next(t_model.parameters()).device
    fidelity = agreement(load_model(spath)[0].to(device), t_model, make_loader(splits.val, train.batch_size * 2,
                                                                              train=False, workers=0), device)
    check = transfer_check(s_meta["top1"], t_meta.get("top1")) if distilled else {"note": None}
    write_json(sidecar_path(spath), {**s_meta, "transfer": {**check, "agreement": round(fidelity, 4)}})
