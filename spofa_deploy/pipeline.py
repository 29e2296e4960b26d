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

from spofa_deploy.teacher import foreign
from spofa_deploy.train import distributed
from spofa_deploy.artifacts import (RUNS_DIR, latest_run, load_model, mark_latest, new_run_dir, read_model_meta, release_run,
                        save_model, sidecar_path, write_json)
from spofa_deploy.limits import check_img_size, check_model_input, check_workers
from spofa_deploy.console import console
from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.datasets import Splits, parse_data_spec
from spofa_deploy.method.distillers import METHODS, DistillConfig, Supervised, create_task
from spofa_deploy.errors import UserError, check_choice, os_error
from spofa_deploy.models import Preprocessing, count_params, create_model, create_teacher_pretrained, data_config, resolve_model_name
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.run_files import CHECKPOINT, STUDENT_FILE, TEACHER_FILE, TRACE, TRACE_PLOT, load_checkpoint
from spofa_deploy.data.loaders import make_loader
from spofa_deploy.train.loop import FitResult, TrainConfig, evaluate, fit, resolve_amp
from spofa_deploy.machine import resolve_device



# The teacher stage's bound on the CPU, in parameters x training images x epochs: a ViT-B (86 M parameters) on the
# 1,438 digits images gets 8 epochs (about 7 minutes on a 2-core CPU, so the main command stays within 15), a
# teacher of up to 23 M parameters there the recipe's 30 (docs/results.md, "The teacher recipe").
TEACHER_CPU_BUDGET = 1.0e12


@dataclass
class TeacherOptions:
    """Where the teacher comes from and how its stage trains."""

    name: str = "vit_b"
    checkpoint: str | None = None  # a teacher.safetensors written by `spofa teacher`
    weights: str | None = None  # a local weights file (timm / torchvision format)
    pretrained: bool = True  # try timm's pretrained weights (needs a network or a warm cache)
    # AdamW, batch 32 (96.4 % vs 85.0 % at batch 128 for a ViT on digits), 30 epochs: on digits from scratch a
    # DeiT-Tiny and a ResNet-18 end above the student trained alone (docs/results.md, "The teacher recipe").
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=5e-4, batch_size=32, optimizer="adamw"))
    # On the CPU the stage's epochs are cut to this budget (None: `train.epochs` as given, e.g. by --teacher-epochs).
    cpu_budget: float | None = TEACHER_CPU_BUDGET
    # A teacher made elsewhere (`foreign`) is used as it is; with `finetune` the teacher stage fine-tunes it from
    # its weights (its classifier re-initialised where the data's classes differ).
    finetune: bool = False
    # No label smoothing by default: a smoothed teacher's soft targets at KD's temperature are nearly
    # uniform (entropy 2.21 of 2.30 nats on digits with 0.1), and such teachers distil poorly
    # (Muller et al., NeurIPS 2019). teacher.json records the entropy the teacher ends with.
    label_smoothing: float = 0.0


@dataclass
class DataOptions:
    """What a stage trains on and how it is read: the `--data` options of `spofa teacher` and `spofa distill`."""

    spec: str = "digits"  # digits | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR
    img_size: int | None = None  # None: the teacher's size (distill), else the data's natural size
    train_fraction: float = 1.0  # train on this stratified fraction of the training split
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of failing
    download: bool = False  # let torchvision fetch CIFAR (needs a network)
    gpu_decode: bool = False  # decode and augment training images on the training device (nvJPEG on a GPU)


@dataclass
class TeacherCacheOptions:
    """The teacher-output cache of a distillation (`spofa_deploy.teacher.cache`)."""

    folder: str | Path  # the teacher's logits of every training view, stored once, read by later runs and epochs
    max_gb: float | None = None  # bound on the folder
    format: str | None = None  # fp32 (exact) | fp16 | topk; None: fp16, top-k beyond 100 classes at temperature 1


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


def recipe_teacher_path(teacher: str, data: DataOptions) -> Path:
    """The `teacher.safetensors` that the teacher stage writes for (model, data, size) when no checkpoint is given."""
    spec = parse_data_spec(data.spec)
    return default_teacher_dir(teacher, str(spec), data.img_size or spec.natural_size) / TEACHER_FILE


def _model_meta(model, name: str, splits: Splits, img_size: int, cfg: dict, role: str, **extra) -> dict:
    return {"role": role, "model": foreign.architecture(name), "num_classes": splits.num_classes,
            "classes": splits.classes, "img_size": img_size, **cfg, "data": str(splits.spec),
            "params": count_params(model), **extra}


def _splits(data: DataOptions, prep: Preprocessing, train: TrainConfig) -> Splits:
    """The splits of `data` with a model's preprocessing (`gpu_decode`: training images decode on `train.device`)."""
    return load_splits(data.spec, prep, download=data.download, seed=train.seed, train_fraction=data.train_fraction,
                       skip_corrupt=data.skip_corrupt,
                       decode_device=resolve_device(train.device).type if data.gpu_decode else None)


def train_teacher(*, teacher: TeacherOptions, data: DataOptions, out: str | Path | None = None,
                  resume: bool = False) -> Path:
    """Fine-tune (or train from scratch) the teacher on `data`; returns its `teacher.safetensors`.

    Writes `teacher.safetensors` + `teacher.json` into `out` (default: `default_teacher_dir`).
    """
    spec = parse_data_spec(data.spec)
    img_size = data.img_size or spec.natural_size
    _check_settings(teacher.train)
    resolve_model_name(teacher.name)
    check_img_size(data.img_size)
    check_model_input(teacher.name, img_size, "teacher")
    distributed.init_from_env(teacher.train.device)
    run = new_run_dir(out or default_teacher_dir(teacher.name, str(spec), img_size), "teacher", resume=resume,
                      writer="spofa teacher")
    probe = create_model(teacher.name, 2, img_size)  # classes are unknown until the data is read
    prep = Preprocessing.from_meta(data_config(probe), img_size)
    splits = _splits(data, prep, teacher.train)
    torch.manual_seed(teacher.train.seed)
    if teacher.weights:
        model = create_model(teacher.name, splits.num_classes, img_size, weights=teacher.weights)
        source = f"weights file {teacher.weights}"
    elif teacher.pretrained and (m := create_teacher_pretrained(teacher.name, splits.num_classes, img_size)) is not None:
        model, source = m, "timm pretrained weights"
    else:
        model, source = create_model(teacher.name, splits.num_classes, img_size), "random init"
        if teacher.pretrained:  # (asked for and not there; with --no-pretrained random init is what was asked)
            console.print(f"[yellow]warning:[/] no pretrained weights for {resolve_model_name(teacher.name)} could be "
                          f"loaded (offline?): the teacher is trained from scratch on {spec}.")
    epochs = stage_epochs(teacher, count_params(model), len(splits.train))
    if epochs < teacher.train.epochs:
        console.print(f"teacher stage: {epochs} of the recipe's {teacher.train.epochs} epochs, the CPU budget for "
                      f"{count_params(model) / 1e6:.0f}M parameters on {len(splits.train)} images (--teacher-epochs "
                      "sets them; the teacher decides what distillation can give)")
    console.print(f"[bold]teacher stage:[/] {resolve_model_name(teacher.name)} from {source} on {spec} "
                  f"({len(splits.train)} train / {len(splits.val)} val images, {img_size}px) -> {run}")
    path = run / TEACHER_FILE

    def save(net, best):
        save_model(path, net, _model_meta(net, teacher.name, splits, img_size, prep.meta(), "teacher", source=source,
                                          top1=best["top1"], top5=best["ema_top5" if best["source"] == "ema" else "model_top5"],
                                          saved=best["source"], teacher_stage=True))

    result = fit(Supervised(model, teacher.label_smoothing), splits, replace(teacher.train, epochs=epochs), run,
                 resume=resume, label="teacher",
                 hooks=Hooks(on_best=save), run_info={"label_smoothing": teacher.label_smoothing})
    console.print(f"teacher val top-1 {result.best_top1:.2f}% ({result.best_source}), {result.seconds:.0f}s")
    if distributed.info().is_main:
        soft = soft_target_entropy(load_model(path)[0], splits.train, DistillConfig().kd_temperature,
                                   seed=teacher.train.seed)
        write_json(sidecar_path(path), {**read_model_meta(path), "label_smoothing": teacher.label_smoothing,
                                        "soft_targets": soft})
        console.print(f"teacher soft targets at T={soft['temperature']:g}: entropy {soft['entropy_nats']:.2f} of "
                      f"at most {soft['max_nats']:.2f} nats ({soft['images']} training views)")
        release_run(run)
    distributed.barrier()
    return path


def stage_epochs(teacher: TeacherOptions, params: int, images: int) -> int:
    """The teacher stage's epochs: the recipe's, cut on the CPU to `teacher.cpu_budget` (at least one)."""
    if teacher.cpu_budget is None or resolve_device(teacher.train.device).type != "cpu":
        return teacher.train.epochs
    return max(1, min(teacher.train.epochs, int(teacher.cpu_budget // (params * images))))


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


def find_teacher(*, teacher: TeacherOptions, data: DataOptions) -> Path:
    """The one "find or train the teacher" of distill and compare; returns its `teacher.safetensors`.

    In order: a teacher made elsewhere (a timm checkpoint as `teacher.checkpoint`, or an
    `hf-hub:` / `local-dir:` name), used as it is (`_foreign_teacher`); a checkpoint of ours
    (`teacher.checkpoint`); the teacher trained earlier for (model, data, size) when its stage
    finished; else the teacher stage with `teacher.train` (the teacher recipe), resuming an
    unfinished stage. The stage's folder is shared by every run on this data and size: it trains
    on the whole training split, decoded on the CPU.
    """
    if teacher.checkpoint and not Path(teacher.checkpoint).is_file():
        raise UserError(f"teacher checkpoint not found: {teacher.checkpoint}")
    if foreign.is_foreign(teacher.name, teacher.checkpoint):
        return _foreign_teacher(teacher, data)
    if teacher.checkpoint:
        return Path(teacher.checkpoint)
    return _finished_or_trained(teacher, data, recipe_teacher_path(teacher.name, data))


def _finished_or_trained(teacher: TeacherOptions, data: DataOptions, path: Path) -> Path:
    """The teacher at `path` when its stage finished, else the teacher stage into its folder (resumed if begun)."""
    spec = parse_data_spec(data.spec)
    img_size = data.img_size or spec.natural_size
    ckpt = path.parent / CHECKPOINT
    state = load_checkpoint(ckpt) if ckpt.is_file() else None
    # teacher.safetensors appears at the stage's first best epoch: only a finished stage counts.
    unfinished = state is not None and state["epoch"] < state["config"]["epochs"]
    # No checkpoint beside it: the stage was killed before its first one (the file comes at the first best).
    if path.is_file() and state is not None and not unfinished:
        _check_weights_used(teacher, path)
        console.print(f"using the teacher trained earlier for this data: {path}")
        return path
    what = f"resuming its unfinished stage ({state['epoch']}/{state['config']['epochs']} epochs)" if unfinished \
        else "running the teacher stage first"
    console.print(f"[bold]no finished teacher for {resolve_model_name(teacher.name)} on {spec} at {img_size}px yet: "
                  f"{what}[/]")
    stage_data = replace(data, img_size=img_size, train_fraction=1.0, gpu_decode=False)
    path = train_teacher(teacher=teacher, data=stage_data, out=path.parent, resume=state is not None)
    distributed.barrier()  # rank 0 wrote the teacher file; the others read it next
    return path


def _foreign_teacher(teacher: TeacherOptions, data: DataOptions) -> Path:
    """A teacher made elsewhere: used as it is when it was trained for the data's classes (evaluated once on the
    validation split and recorded; no stage), else, with `teacher.finetune`, fine-tuned from its weights by the
    teacher stage. Either way it is kept under `runs/teachers/` by a digest of where it came from."""
    spec = parse_data_spec(data.spec)
    img_size = data.img_size or spec.natural_size
    name, ckpt = teacher.name, teacher.checkpoint
    folder = RUNS_DIR / "teachers" / re.sub(r"[^A-Za-z0-9._-]+", "_",
                                            f"{foreign.source_slug(name, ckpt)}-{spec}-{img_size}px")
    stage_data = replace(data, img_size=img_size, train_fraction=1.0, gpu_decode=False)
    if teacher.finetune:  # its weights, its classifier re-initialised where the data's classes differ
        tuned = replace(teacher, name=foreign.architecture(name) if ckpt else name, checkpoint=None, weights=ckpt)
        return _finished_or_trained(tuned, stage_data, folder / TEACHER_FILE)
    path = folder / TEACHER_FILE
    if path.is_file():
        console.print(f"using the teacher adopted earlier for this data: {path}")
        return path
    found = foreign.trained_for(name, ckpt)
    model = foreign.build(name, ckpt, found.num_classes, img_size)
    prep = Preprocessing.from_meta(data_config(model), img_size)
    splits = _splits(stage_data, prep, teacher.train)
    how = foreign.check_classes(found, splits.classes, ckpt or name)
    device = resolve_device(teacher.train.device)
    val = evaluate(model.to(device), make_loader(splits.val, 64, train=False, workers=teacher.train.workers), device)
    source = f"checkpoint {ckpt}" if ckpt else name
    if distributed.info().is_main:
        soft = soft_target_entropy(model.cpu(), splits.train, DistillConfig().kd_temperature, seed=teacher.train.seed)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(path, model, _model_meta(model, foreign.architecture(name), splits, img_size, prep.meta(), "teacher",
                                            source=source, top1=val["top1"], top5=val["top5"], saved="model",
                                            adopted=True, classes_checked=how, soft_targets=soft))
    distributed.barrier()
    console.print(f"teacher {source}: used as it is (classes checked by {how}); val top-1 {val['top1']:.2f}% on {spec}")
    return path


def _check_weights_used(teacher: TeacherOptions, path: Path) -> None:
    """A teacher trained earlier serves `--teacher-weights FILE` only when it was trained from that file."""
    if not teacher.weights:
        return
    source = read_model_meta(path).get("source")
    if source != f"weights file {teacher.weights}":
        raise UserError(f"--teacher-weights {teacher.weights}: the teacher trained earlier for this data "
                        f"({path}) started from {source or 'other weights'}, not from this file: drop "
                        f"--teacher-weights to use it, or train one from the file with `spofa teacher "
                        f"--teacher-weights {teacher.weights} --out DIR` and pass --teacher-ckpt DIR/{TEACHER_FILE}")


def _check_settings(*cfgs: TrainConfig) -> None:
    for cfg in cfgs:
        cfg.validate()
        check_workers(cfg.workers)
        resolve_device(cfg.device)


def _check_inputs(student: str, teacher: TeacherOptions, data: DataOptions, train: TrainConfig):
    """Everything cheap to check, before any folder is made or any training starts; returns the parsed data spec."""
    resolve_model_name(student)
    resolve_model_name(teacher.name)
    _check_settings(train, teacher.train)
    if check_img_size(data.img_size) is not None:  # (None: the teacher's own size)
        check_model_input(student, data.img_size, "student")
        if not teacher.checkpoint:  # (a checkpoint's size is checked against it when it is read)
            check_model_input(teacher.name, data.img_size, "teacher")
    spec = parse_data_spec(data.spec)
    # Read the data once (cheap: no transforms run) so a bad --data fails before any work.
    load_splits(spec, Preprocessing.identity(), download=data.download, skip_corrupt=data.skip_corrupt)
    return spec


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
    from spofa_deploy.artifacts import read_json

    m = read_json(meta_path)
    return {"method": m.get("method"), "loss": m.get("loss") or {}}


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
    console.print(f"[bold]distill:[/] {resolve_model_name(student)} <- {t_meta['model']} ({method}) on {spec}, "
                  f"{img_size}px, {len(splits.train)} train / {len(splits.val)} val -> {run}")
    spath = run / STUDENT_FILE
    meta = _model_meta(s_model, student, splits, img_size, prep.meta(), "student", method=method, teacher=t_meta["model"],
                       teacher_file=TEACHER_FILE, teacher_top1=t_meta.get("top1"), teacher_source=t_meta.get("source"), loss=loss.to_dict(),
                       train=dict(train.__dict__), train_fraction=data.train_fraction)
    if dist.is_main and latest:  # (`spofa compare` keeps its runs out of runs/latest)
        mark_latest(run)
    tcache = None
    if cache is not None and method != "none":
        tcache = _open_teacher_cache(cache, t_model=t_model, data=data, splits=splits, img_size=img_size, prep=prep,
                                     train=train, loss=loss, resumed_config=saved["config"] if saved is not None else None)
    result = fit(task, splits, train, run, resume=resume, label=method,
                 hooks=replace(hooks or Hooks(), on_best=_save_student(spath, meta)),
                 run_info={**run_info, "img_size": img_size}, teacher_cache=tcache)
    _finish(run, splits, is_main=dist.is_main)
    if dist.is_main and spath.is_file():
        _record_transfer(spath, t_model, t_meta, splits, train, distilled=method != "none")
    distributed.barrier()
    return DistillResult(run, spath, run / TEACHER_FILE, read_model_meta(spath), t_meta, result, head_params,
                         count_params(s_model))


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


def _resolve_teacher(run: Path, teacher: TeacherOptions, data: DataOptions, *, resume: bool):
    """The run's teacher (path, model, metadata): its own copy on resume, else found or trained for this data."""
    tpath = run / TEACHER_FILE
    if not (resume and tpath.is_file()):
        tpath = find_teacher(teacher=teacher, data=data)
    t_model, t_meta = load_model(tpath)
    if data.img_size and int(t_meta["img_size"]) != data.img_size:
        raise UserError(f"teacher {tpath} was trained at {t_meta['img_size']}px, not {data.img_size}px")
    if teacher.checkpoint and resolve_model_name(teacher.name) != t_meta["model"]:
        console.print(f"note: the teacher is {t_meta['model']} from --teacher-ckpt {tpath}; --teacher "
                      f"{teacher.name} is not used")
    return tpath, t_model, t_meta


def _load_data(data: DataOptions, prep: Preprocessing, train: TrainConfig, tpath: Path, t_meta: dict) -> Splits:
    """The splits with the teacher's preprocessing; refused when the teacher knows other classes."""
    splits = _splits(data, prep, train)
    if t_meta.get("classes") != splits.classes:
        theirs = f"{splits.num_classes}" if splits.num_classes != t_meta["num_classes"] else "other class names:"
        raise UserError(f"teacher {tpath} has {t_meta['num_classes']} classes {t_meta.get('classes', [])[:5]}..., "
                        f"but {splits.spec} has {theirs} {splits.classes[:5]}...: train a teacher on this data "
                        "(`spofa teacher`)")
    return splits


def _save_student(path: Path, meta: dict):
    """The `on_best` hook of a distillation: the best of model and EMA, with its figures."""

    def save(net, best):
        save_model(path, net, {**meta, "top1": best["top1"], "top5": best["ema_top5" if best["source"] == "ema" else "model_top5"],
                               "model_top1": best["model_top1"], "ema_top1": best["ema_top1"], "saved": best["source"],
                               "epoch": best["epoch"]})

    return save


def _finish(run: Path, splits: Splits, *, is_main: bool) -> None:
    """After training: the trace plot and the count of skipped unreadable images (rank 0), then every rank waits."""
    if is_main:
        _plot_trace(run)
        bad = sorted(set(getattr(splits.train, "corrupt", ())) | set(getattr(splits.val, "corrupt", ())))
        if bad:  # (counted in this process: with --workers > 0 the loader workers hold their own counts)
            console.print(f"[yellow]warning:[/] skipped {len(bad)} unreadable image(s) (--skip-corrupt), e.g. {bad[0]}")
        # Trained: another writer is now refused by the run's checkpoint, so the folder's lock can go.
        release_run(run)
    distributed.barrier()


def _open_teacher_cache(cache: TeacherCacheOptions, *, t_model, data: DataOptions, splits: Splits, img_size: int,
                        prep: Preprocessing, train: TrainConfig, loss: DistillConfig, resumed_config: dict | None):
    """The teacher cache of this run's training views, keyed by everything the logits depend on."""
    from spofa_deploy.teacher.cache import TeacherCache
    from spofa_deploy.teacher.cache_key import CacheKey, split_digest, weights_digest

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
    key = CacheKey(teacher=weights_digest(t_model.state_dict()), data=str(splits.spec),
                   split=split_digest(ds.labels, members), num_samples=len(ds), img_size=img_size, mean=prep.mean,
                   std=prep.std, interpolation=prep.interpolation, crop_pct=prep.crop_pct,
                   augmentation=f"{ds.transform!r} skip_corrupt={data.skip_corrupt}", seed=train.seed,
                   train_fraction=data.train_fraction, compute=compute)
    temperature = loss.kd_temperature if loss.method == "kd" else loss.temperature
    tcache = TeacherCache.open(cache.folder, key, num_classes=splits.num_classes, fmt=cache.format,
                               temperature=temperature, max_gb=cache.max_gb)
    if dist.is_main:
        if tcache.note:
            console.print(tcache.note)
        console.print(tcache.describe(train.epochs))
    return tcache


def _plot_trace(run: Path) -> None:
    from spofa_deploy.train.plots import plot_trace

    try:
        plot_trace(run / TRACE, run / TRACE_PLOT)
    except Exception as e:  # a missing plot must never fail a finished training run
        console.print(f"[yellow]warning:[/] could not plot the trace: {e}")
