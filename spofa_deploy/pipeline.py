"""The two training commands as library functions: the teacher stage and distillation.

`distill()` is what `spofa distill` runs: find or train the teacher for this data,
build the student and the method's training task, train, and write the run folder:

    runs/<name>/teacher.safetensors + teacher.json   (the frozen teacher it used)
    runs/<name>/student.safetensors + student.json   (plain timm student: no heads)
    runs/<name>/checkpoint-last.pt, metrics.jsonl, trace.csv (+ trace.png)
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .artifacts import (RUNS_DIR, latest_run, load_model, mark_latest, new_run_dir, read_model_meta, save_model,
                        sidecar_path, write_json)
from .console import console
from .data import Splits, load_splits, parse_data_spec
from .distillers import METHODS, DistillConfig, Supervised, create_task
from .errors import UserError
from .models import Preprocessing, count_params, create_model, create_teacher_pretrained, data_config, resolve_model_name
from .train import CHECKPOINT, FitResult, Hooks, TrainConfig, fit, load_checkpoint, resolve_amp
from .machine import resolve_device

TEACHER_FILE = "teacher.safetensors"
STUDENT_FILE = "student.safetensors"


@dataclass
class TeacherOptions:
    """Where the teacher comes from and how its stage trains."""

    name: str = "vit_b"
    checkpoint: str | None = None  # a teacher.safetensors written by `spofa teacher`
    weights: str | None = None  # a local weights file (timm / torchvision format)
    pretrained: bool = True  # try timm's pretrained weights (needs a network or a warm cache)
    # ViT from scratch or fine-tuned: AdamW; batch 32 gave 96.4 % vs 85.0 % at batch 128 on digits.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, lr=5e-4, batch_size=32, optimizer="adamw"))
    # No label smoothing by default: a smoothed teacher's soft targets at KD's temperature are nearly
    # uniform (entropy 2.21 of 2.30 nats on digits with 0.1), and such teachers distil poorly
    # (Muller et al., NeurIPS 2019). teacher.json records the entropy the teacher ends with.
    label_smoothing: float = 0.0


@dataclass
class DistillResult:
    run_dir: Path
    student_path: Path
    teacher_path: Path
    student: dict
    teacher: dict
    fit: FitResult
    head_params: int
    student_params: int


def default_teacher_dir(teacher: str, data: str, img_size: int) -> Path:
    """Deterministic folder of the teacher trained for (model, data, size), shared by runs."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{resolve_model_name(teacher)}-{data}-{img_size}px")
    return RUNS_DIR / "teachers" / slug


def _model_meta(model, name: str, splits: Splits, img_size: int, cfg: dict, role: str, **extra) -> dict:
    return {"role": role, "model": resolve_model_name(name), "num_classes": splits.num_classes,
            "classes": splits.classes, "img_size": img_size, **cfg, "data": str(splits.spec),
            "params": count_params(model), **extra}


def _splits(data: str, prep: Preprocessing, seed: int, download: bool, train_fraction: float = 1.0,
            skip_corrupt: bool = False, decode_device: str | None = None) -> Splits:
    return load_splits(data, prep, download=download, seed=seed, train_fraction=train_fraction,
                       skip_corrupt=skip_corrupt, decode_device=decode_device)


def train_teacher(opts: TeacherOptions, data: str = "digits", img_size: int | None = None,
                  out: str | Path | None = None, resume: bool = False, download: bool = False,
                  skip_corrupt: bool = False) -> Path:
    """Fine-tune (or train from scratch) the teacher on `data`; returns its `teacher.safetensors`."""
    spec = parse_data_spec(data)
    img_size = img_size or spec.natural_size
    _check_settings(opts.train)
    resolve_model_name(opts.name)
    distributed.init_from_env(opts.train.device)
    run = new_run_dir(out or default_teacher_dir(opts.name, str(spec), img_size), "teacher")
    probe = create_model(opts.name, 2, img_size)  # classes are unknown until the data is read
    prep = Preprocessing.from_meta(data_config(probe), img_size)
    splits = _splits(data, prep, opts.train.seed, download, skip_corrupt=skip_corrupt)
    torch.manual_seed(opts.train.seed)
    if opts.weights:
        model, source = create_model(opts.name, splits.num_classes, img_size, weights=opts.weights), f"weights file {opts.weights}"
    elif opts.pretrained and (m := create_teacher_pretrained(opts.name, splits.num_classes, img_size))[1]:
        model, source = m[0], "timm pretrained weights"
    else:
        model, source = create_model(opts.name, splits.num_classes, img_size), "random init"
        console.print(f"[yellow]warning:[/] no pretrained weights for {resolve_model_name(opts.name)} could be "
                      f"loaded (offline?): the teacher is trained from scratch on {spec}.")
    console.print(f"[bold]teacher stage:[/] {resolve_model_name(opts.name)} from {source} on {spec} "
                  f"({len(splits.train)} train / {len(splits.val)} val images, {img_size}px) -> {run}")
    path = run / TEACHER_FILE

    def save(net, best):
        save_model(path, net, _model_meta(net, opts.name, splits, img_size, prep.meta(), "teacher", source=source,
                                          top1=best["top1"], top5=best["ema_top5" if best["source"] == "ema" else "model_top5"],
                                          saved=best["source"], teacher_stage=True))

    result = fit(Supervised(model, opts.label_smoothing), splits, opts.train, run, resume=resume, label="teacher",
                 hooks=Hooks(on_best=save), run_info={"label_smoothing": opts.label_smoothing})
    console.print(f"teacher val top-1 {result.best_top1:.2f}% ({result.best_source}), {result.seconds:.0f}s")
    if distributed.info().is_main:
        soft = soft_target_entropy(load_model(path)[0], splits.train, DistillConfig().kd_temperature,
                                   seed=opts.train.seed)
        write_json(sidecar_path(path), {**read_model_meta(path), "label_smoothing": opts.label_smoothing,
                                        "soft_targets": soft})
        console.print(f"teacher soft targets at T={soft['temperature']:g}: entropy {soft['entropy_nats']:.2f} of "
                      f"at most {soft['max_nats']:.2f} nats ({soft['images']} training views)")
    distributed.barrier()
    return path


@torch.no_grad()
def soft_target_entropy(model: torch.nn.Module, train_set, temperature: float, *, n: int = 512,
                        seed: int = 0) -> dict:
    """Mean entropy (nats) of the teacher's softmax(logits / T) over `n` augmented training views.

    Near the maximum log(classes), the soft targets carry little beyond the label: KD has
    little to teach. Drawn with a private RNG: the global random state is left as it was.
    """
    import math

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_set), generator=g)[:n].tolist()
    from .data import make_loader

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would also reseed CUDA, which fork_rng(devices=[]) leaves)
        # Through the loader: with GPU decoding the items are undecoded bytes that the loader decodes.
        images = next(iter(make_loader(torch.utils.data.Subset(train_set, idx), len(idx), train=False, workers=0)))[0].cpu()
    model = model.eval().float()
    logits = torch.cat([model(images[i:i + 128]).float() for i in range(0, len(images), 128)])
    logp = torch.log_softmax(logits / temperature, dim=1)
    entropy = float(-(logp.exp() * logp).sum(1).mean())
    return {"temperature": temperature, "entropy_nats": round(entropy, 4),
            "max_nats": round(math.log(logits.shape[1]), 4), "images": len(idx)}


def find_teacher(opts: TeacherOptions, data: str, img_size: int, *, download: bool = False,
                 skip_corrupt: bool = False) -> Path:
    """The one "find or train the teacher" of distill and compare; returns its `teacher.safetensors`.

    In order: an explicit checkpoint (`opts.checkpoint`); the teacher trained earlier for
    (model, data, size) when its stage finished; else the teacher stage with `opts.train`
    (the teacher recipe), resuming an unfinished stage.
    """
    if opts.checkpoint:
        path = Path(opts.checkpoint)
        if not path.is_file():
            raise UserError(f"teacher checkpoint not found: {path}")
        return path
    path = default_teacher_dir(opts.name, data, img_size) / TEACHER_FILE
    ckpt = path.parent / CHECKPOINT
    state = load_checkpoint(ckpt) if ckpt.is_file() else None
    # teacher.safetensors appears at the stage's first best epoch: only a finished stage counts.
    unfinished = state is not None and state["epoch"] < state["config"]["epochs"]
    # No checkpoint beside it: the stage was killed before its first one (the file comes at the first best).
    if path.is_file() and state is not None and not unfinished:
        console.print(f"using the teacher trained earlier for this data: {path}")
        return path
    what = f"resuming its unfinished stage ({state['epoch']}/{state['config']['epochs']} epochs)" if unfinished \
        else "running the teacher stage first"
    console.print(f"[bold]no finished teacher for {resolve_model_name(opts.name)} on {data} at {img_size}px yet: "
                  f"{what}[/]")
    path = train_teacher(opts, data, img_size, out=path.parent, resume=state is not None, download=download,
                         skip_corrupt=skip_corrupt)
    distributed.barrier()  # rank 0 wrote the teacher file; the others read it next
    return path


def _check_settings(*cfgs: TrainConfig) -> None:
    for cfg in cfgs:
        cfg.validate()
        resolve_device(cfg.device)


def _check_data(spec, download: bool, skip_corrupt: bool) -> None:
    """Read the data spec once (cheap: no transforms run) so a bad --data fails before any work."""
    load_splits(spec, Preprocessing(32, (0.0,) * 3, (1.0,) * 3), download=download, skip_corrupt=skip_corrupt)


def _flag(key: str, value) -> str:
    if isinstance(value, bool):
        return f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}"
    if isinstance(value, (list, tuple)):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"--{key.replace('_', '-')} {value}"


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


def _legacy_run_info(run: Path) -> dict | None:
    """Checkpoints written before run settings were saved in them: the student.json of the run, if any."""
    meta_path = run / "student.json"
    if not meta_path.is_file():
        return None
    from .artifacts import read_json

    m = read_json(meta_path)
    return {"method": m.get("method"), "loss": m.get("loss") or {}}


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):  # (also a hard link made earlier: nothing to do)
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)  # same file system: no copy of a large teacher
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def distill(student: str = "mobilenetv3", teacher: TeacherOptions | None = None, *, data: str = "digits",
            method: str = "spofa", img_size: int | None = None, loss: DistillConfig | None = None,
            train: TrainConfig | None = None, out: str | Path | None = None, resume: bool = False,
            download: bool = False, train_fraction: float = 1.0, skip_corrupt: bool = False,
            latest: bool = True, hooks: Hooks | None = None, teacher_cache: str | Path | None = None,
            teacher_cache_max_gb: float | None = None, teacher_cache_format: str | None = None,
            gpu_decode: bool = False) -> DistillResult:
    """Distil `teacher` into `student` on `data` with `method`; see the module docstring for outputs.

    `teacher_cache` (a folder) stores the teacher's logits of every training view once and reads
    them back in later runs and epochs with the same key (`spofa_deploy.teacher_cache`).
    """
    teacher = teacher or TeacherOptions()
    loss = loss or DistillConfig(method=method)
    loss.method = method
    train = train or TrainConfig()
    if method not in METHODS:
        raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    # Everything cheap to check is checked before any folder is made or any training starts.
    resolve_model_name(student)
    resolve_model_name(teacher.name)
    _check_settings(train, teacher.train)
    spec = parse_data_spec(data)
    _check_data(spec, download, skip_corrupt)
    dist = distributed.init_from_env(train.device)
    if resume and out is None:
        out = latest_run()
    # Every rank must write to (and read from) the folder rank 0 named.
    run = distributed.broadcast_object(new_run_dir(out, f"{resolve_model_name(student)}-{method}") if dist.is_main else None)
    if resume and not (run / CHECKPOINT).is_file():
        raise UserError(f"--resume: no {CHECKPOINT} in {run}")
    run_info = {"student": resolve_model_name(student), "method": method, "loss": loss.to_dict(), "data": str(spec),
                "img_size": img_size, "train_fraction": train_fraction}
    saved = load_checkpoint(run / CHECKPOINT) if resume else None
    if saved is not None:  # an unreadable checkpoint, or one of other settings, is refused before runs/latest moves
        _check_resume(saved.get("run") or _legacy_run_info(run), run_info)
    if not resume and (run / CHECKPOINT).is_file():
        raise UserError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")

    # Teacher: reuse the run's own copy on resume, else find or train one for this data.
    run_teacher = run / TEACHER_FILE
    if resume and run_teacher.is_file():
        tpath = run_teacher
    else:
        tpath = find_teacher(teacher, str(spec), img_size or spec.natural_size, download=download,
                             skip_corrupt=skip_corrupt)
    t_model, t_meta = load_model(tpath)
    img_size = img_size or int(t_meta["img_size"])
    if int(t_meta["img_size"]) != img_size:
        raise UserError(f"teacher {tpath} was trained at {t_meta['img_size']}px, not {img_size}px")
    prep = Preprocessing.from_meta(t_meta, img_size)
    splits = _splits(data, prep, train.seed, download, train_fraction, skip_corrupt,
                     decode_device=resolve_device(train.device).type if gpu_decode else None)
    if t_meta.get("classes") != splits.classes:
        raise UserError(f"teacher {tpath} has {t_meta['num_classes']} classes {t_meta.get('classes', [])[:5]}..., "
                        f"but {spec} has {splits.num_classes}: train a teacher on this data (`spofa teacher`)")
    if dist.is_main and tpath != run_teacher:
        _link_or_copy(tpath, run_teacher)
        write_json(run / "teacher.json", {**t_meta, "copied_from": str(tpath)})

    torch.manual_seed(train.seed)
    s_model = create_model(student, splits.num_classes, img_size)
    task = create_task(method, s_model, t_model, loss, splits.num_classes,
                       sync=distributed.all_reduce_mean if dist.enabled else None)
    head_params = count_params(task.extra_state()) if task.extra_state() is not None else 0
    s_params = count_params(s_model)
    console.print(f"[bold]distill:[/] {resolve_model_name(student)} <- {t_meta['model']} ({method}) on {spec}, "
                  f"{img_size}px, {len(splits.train)} train / {len(splits.val)} val -> {run}")
    spath = run / STUDENT_FILE
    meta = _model_meta(s_model, student, splits, img_size, prep.meta(), "student", method=method, teacher=t_meta["model"],
                       teacher_file=TEACHER_FILE, teacher_top1=t_meta.get("top1"), loss=loss.to_dict(),
                       train=dict(train.__dict__), train_fraction=train_fraction)

    def save(net, best):
        save_model(spath, net, {**meta, "top1": best["top1"], "top5": best["ema_top5" if best["source"] == "ema" else "model_top5"],
                                "model_top1": best["model_top1"], "ema_top1": best["ema_top1"], "saved": best["source"],
                                "epoch": best["epoch"]})

    if dist.is_main and latest:  # (`spofa compare` keeps its runs out of runs/latest)
        mark_latest(run)
    hooks = replace(hooks or Hooks(), on_best=save)
    cache = None
    if teacher_cache is not None and method != "none":
        cache = _open_teacher_cache(teacher_cache, t_model=t_model, spec=spec, splits=splits, img_size=img_size,
                                    prep=prep, train=train, train_fraction=train_fraction, skip_corrupt=skip_corrupt,
                                    loss=loss, method=method, max_gb=teacher_cache_max_gb, fmt=teacher_cache_format,
                                    resumed_config=saved["config"] if saved is not None else None)
    result = fit(task, splits, train, run, resume=resume, label=method, hooks=hooks,
                 run_info={**run_info, "img_size": img_size}, teacher_cache=cache)
    if dist.is_main:
        _plot_trace(run)
        bad = sorted(set(getattr(splits.train, "corrupt", ())) | set(getattr(splits.val, "corrupt", ())))
        if bad:  # (counted in this process: with --workers > 0 the loader workers hold their own counts)
            console.print(f"[yellow]warning:[/] skipped {len(bad)} unreadable image(s) (--skip-corrupt), e.g. {bad[0]}")
    distributed.barrier()
    return DistillResult(run, spath, run_teacher, read_model_meta(spath), t_meta, result, head_params, s_params)


def _open_teacher_cache(folder, *, t_model, spec, splits: Splits, img_size: int, prep: Preprocessing, train: TrainConfig,
                        train_fraction: float, skip_corrupt: bool, loss: DistillConfig, method: str,
                        max_gb: float | None, fmt: str | None, resumed_config: dict | None):
    """The teacher cache of this run's training views, keyed by everything the logits depend on."""
    from .teacher_cache import CacheKey, TeacherCache, split_digest, weights_digest

    if resumed_config is not None:  # the loop trains with the checkpoint's settings: key the cache by them
        train = TrainConfig(**{**train.__dict__, **resumed_config})
    ds, dist = splits.train, distributed.info()
    if isinstance(getattr(ds, "images", None), np.ndarray):
        members = ds.images
    else:  # image files: path, size and mtime, so a replaced file changes the key
        members = [f"{p}|{st.st_size}|{st.st_mtime_ns}" for p, st in ((p, os.stat(p)) for p in ds.paths)]
    device = resolve_device(train.device)
    compute = (f"{device.type}/{resolve_amp(train.amp, device)}/batch{train.batch_size // dist.world}/"
               f"rank{dist.rank}of{dist.world}/torch{torch.__version__}")
    key = CacheKey(teacher=weights_digest(t_model.state_dict()), data=str(spec), split=split_digest(ds.labels, members),
                   num_samples=len(ds), img_size=img_size, mean=prep.mean, std=prep.std,
                   interpolation=prep.interpolation, crop_pct=prep.crop_pct,
                   augmentation=f"{ds.transform!r} skip_corrupt={skip_corrupt}", seed=train.seed,
                   train_fraction=train_fraction, compute=compute)
    temperature = loss.kd_temperature if method == "kd" else loss.temperature
    cache = TeacherCache.open(folder, key, num_classes=splits.num_classes, fmt=fmt, temperature=temperature,
                              max_gb=max_gb)
    if dist.is_main:
        if cache.note:
            console.print(cache.note)
        console.print(cache.describe(train.epochs))
    return cache


def _plot_trace(run: Path) -> None:
    from .plots import plot_trace

    try:
        plot_trace(run / "trace.csv", run / "trace.png")
    except Exception as e:  # a missing plot must never fail a finished training run
        console.print(f"[yellow]warning:[/] could not plot the trace: {e}")
