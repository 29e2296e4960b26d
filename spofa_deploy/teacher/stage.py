"""The teacher stage (what `spofa teacher` runs) and the one "find or train the teacher" of distill and compare.

`find_teacher` returns a `teacher.safetensors` in this order: a teacher made elsewhere, adopted as it is
or fine-tuned (`spofa_deploy.teacher.foreign`); a checkpoint of ours; the teacher trained earlier for
(model, data, size) when its stage finished; else the teacher stage with the teacher recipe
(`TeacherOptions.train`), into a folder shared by every run on this data and size:

    runs/teachers/<teacher>-<data>-<size>px/teacher.safetensors + teacher.json, checkpoint-last.pt, ...
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from spofa_deploy.artifacts import load_model, read_model_meta, save_model, sidecar_path, write_json
from spofa_deploy.data.datasets import Splits, parse_data_spec
from spofa_deploy.data.loaders import make_loader
from spofa_deploy.data.splits import DataOptions, load_data
from spofa_deploy.errors import UserError
from spofa_deploy.limits import check_img_size, check_model_input, check_workers
from spofa_deploy.machine import resolve_device
from spofa_deploy.method.distillers import DistillConfig, Supervised
from spofa_deploy.models import Preprocessing, count_params, create_model, create_teacher_pretrained, data_config, resolve_model_name
from spofa_deploy.run_dirs import RUNS_DIR, new_run_dir, release_run
from spofa_deploy.run_files import CHECKPOINT, TEACHER_FILE, load_checkpoint
from spofa_deploy.teacher import foreign
from spofa_deploy.train import distributed
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.train.loop import TrainConfig, evaluate, fit

_log = logging.getLogger(__name__)

# The teacher stage's bound on the CPU, in parameters x training images x epochs: a ViT-B (86 M parameters) on the
# 1,438 digits images gets 4 epochs (about 4.5 minutes on a 2-core CPU, so the main command stays within 15), a
# teacher of up to 11.6 M parameters (ResNet-18, DeiT-Tiny) there the recipe's 30 (docs/results.md, "The teacher recipe").
TEACHER_CPU_BUDGET = 0.5e12


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


def default_teacher_dir(teacher: str, data: str, img_size: int) -> Path:
    """Deterministic folder of the teacher trained for (model, data, size), shared by runs."""
    return _teachers_folder(f"{resolve_model_name(teacher)}-{data}-{img_size}px")


def _teachers_folder(name: str) -> Path:
    """`runs/teachers/<name>`, the name made safe for a folder."""
    return RUNS_DIR / "teachers" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _stage_data(data: DataOptions) -> DataOptions:
    """The data of a teacher stage: every training image at the data's size, decoded on the CPU."""
    return replace(data, img_size=data.img_size or parse_data_spec(data.spec).natural_size, train_fraction=1.0,
                   gpu_decode=False)


def recipe_teacher_path(teacher: str, data: DataOptions) -> Path:
    """The `teacher.safetensors` that the teacher stage writes for (model, data, size) when no checkpoint is given."""
    spec = parse_data_spec(data.spec)
    return default_teacher_dir(teacher, str(spec), data.img_size or spec.natural_size) / TEACHER_FILE


def model_meta(model: torch.nn.Module, name: str, splits: Splits, img_size: int, cfg: dict, role: str, **extra) -> dict:
    """The JSON sidecar of a run's model file: role, architecture, classes, input size, preprocessing `cfg`, data,
    parameters, and `extra`."""
    return {"role": role, "model": foreign.architecture(name), "num_classes": splits.num_classes,
            "classes": splits.classes, "img_size": img_size, **cfg, "data": str(splits.spec),
            "params": count_params(model), **extra}


def check_settings(*cfgs: TrainConfig) -> None:
    """Refuse, before any work, training settings that cannot run (values, loader workers, device)."""
    for cfg in cfgs:
        cfg.validate()
        check_workers(cfg.workers)
        resolve_device(cfg.device)


def train_teacher(*, teacher: TeacherOptions, data: DataOptions, out: str | Path | None = None,
                  resume: bool = False) -> Path:
    """Fine-tune (or train from scratch) the teacher on `data`; returns its `teacher.safetensors`.

    Writes `teacher.safetensors` + `teacher.json` into `out` (default: `default_teacher_dir`).
    """
    spec = parse_data_spec(data.spec)
    img_size = data.img_size or spec.natural_size
    check_settings(teacher.train)
    resolve_model_name(teacher.name)
    check_img_size(data.img_size)
    check_model_input(teacher.name, img_size, "teacher")
    distributed.init_from_env(teacher.train.device)
    run = new_run_dir(out or default_teacher_dir(teacher.name, str(spec), img_size), "teacher", resume=resume,
                      writer="spofa teacher")
    probe = create_model(teacher.name, 2, img_size)  # classes are unknown until the data is read
    prep = Preprocessing.from_meta(data_config(probe), img_size)
    splits = load_data(data, prep, seed=teacher.train.seed, device=teacher.train.device)
    torch.manual_seed(teacher.train.seed)
    if teacher.weights:
        model = create_model(teacher.name, splits.num_classes, img_size, weights=teacher.weights)
        source = f"weights file {teacher.weights}"
    elif teacher.pretrained and (m := create_teacher_pretrained(teacher.name, splits.num_classes, img_size)) is not None:
        model, source = m, "timm pretrained weights"
    else:
        model, source = create_model(teacher.name, splits.num_classes, img_size), "random init"
        if teacher.pretrained:  # (asked for and not there; with --no-pretrained random init is what was asked)
            _log.warning(f"no pretrained weights for {resolve_model_name(teacher.name)} could be "
                         f"loaded (offline?): the teacher is trained from scratch on {spec}.")
    epochs = stage_epochs(teacher, count_params(model), len(splits.train))
    if epochs < teacher.train.epochs:
        _log.info(f"teacher stage: {epochs} of the recipe's {teacher.train.epochs} epochs, the CPU budget for "
                  f"{count_params(model) / 1e6:.0f}M parameters on {len(splits.train)} images (--teacher-epochs "
                  "sets them; the teacher decides what distillation can give)")
    _log.info(f"teacher stage: {resolve_model_name(teacher.name)} from {source} on {spec} "
              f"({len(splits.train)} train / {len(splits.val)} val images, {img_size}px) -> {run}")
    path = run / TEACHER_FILE

    def save(net, best):
        save_model(path, net, model_meta(net, teacher.name, splits, img_size, prep.meta(), "teacher", source=source,
                                         top1=best["top1"], top5=best["ema_top5" if best["source"] == "ema" else "model_top5"],
                                         saved=best["source"], teacher_stage=True, split_seed=teacher.train.seed))

    result = fit(Supervised(model, teacher.label_smoothing), splits, replace(teacher.train, epochs=epochs), run,
                 resume=resume, label="teacher",
                 hooks=Hooks(on_best=save), run_info={"label_smoothing": teacher.label_smoothing})
    _log.info(f"teacher val top-1 {result.best_top1:.2f}% ({result.best_source}), {result.seconds:.0f}s")
    if distributed.info().is_main:
        soft = soft_target_entropy(load_model(path)[0], splits.train, DistillConfig().kd_temperature,
                                   seed=teacher.train.seed)
        write_json(sidecar_path(path), {**read_model_meta(path), "label_smoothing": teacher.label_smoothing,
                                        "soft_targets": soft})
        _log.info(f"teacher soft targets at T={soft['temperature']:g}: entropy {soft['entropy_nats']:.2f} of "
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
        if teacher.finetune or teacher.weights:
            flag = "--teacher-finetune" if teacher.finetune else "--teacher-weights"
            raise UserError(f"{flag} does not apply to --teacher-ckpt {teacher.checkpoint}, a teacher of spofa's own "
                            "used as it is: drop one of them (to train on from it: `spofa teacher --teacher-weights "
                            f"{teacher.checkpoint} --out DIR`, then --teacher-ckpt DIR/{TEACHER_FILE})")
        return Path(teacher.checkpoint)
    return _finished_or_trained(teacher, data, recipe_teacher_path(teacher.name, data))


def _finished_or_trained(teacher: TeacherOptions, data: DataOptions, path: Path) -> Path:
    """The teacher at `path` when its stage finished, else the teacher stage into its folder (resumed if begun)."""
    data = _stage_data(data)
    ckpt = path.parent / CHECKPOINT
    state = load_checkpoint(ckpt) if ckpt.is_file() else None
    # teacher.safetensors appears at the stage's first best epoch: only a finished stage counts.
    unfinished = state is not None and state["epoch"] < state["config"]["epochs"]
    # No checkpoint beside it: the stage was killed before its first one (the file comes at the first best).
    if path.is_file() and state is not None and not unfinished:
        _check_weights_used(teacher, path)
        _check_epochs_asked(teacher, state["config"]["epochs"], path)
        _log.info(f"using the teacher trained earlier for this data: {path}")
        return path
    if path.is_file() and state is None:  # killed in its first epoch, or a teacher file copied in by hand
        _log.warning(f"{path} has no teacher-stage checkpoint beside it: the stage trains again and replaces it "
                     f"(to use that file as it is, pass --teacher-ckpt {path})")
    what = f"resuming its unfinished stage ({state['epoch']}/{state['config']['epochs']} epochs)" if unfinished \
        else "running the teacher stage first"
    _log.info(f"no finished teacher for {resolve_model_name(teacher.name)} on {parse_data_spec(data.spec)} at "
              f"{data.img_size}px yet: {what}")
    path = train_teacher(teacher=teacher, data=data, out=path.parent, resume=state is not None)
    distributed.barrier()  # rank 0 wrote the teacher file; the others read it next
    return path


def _foreign_teacher(teacher: TeacherOptions, data: DataOptions) -> Path:
    """A teacher made elsewhere: used as it is when it was trained for the data's classes (evaluated once on the
    validation split and recorded; no stage), else, with `teacher.finetune`, fine-tuned from its weights by the
    teacher stage. Either way it is kept under `runs/teachers/` by a digest of where it came from."""
    stage_data = _stage_data(data)
    spec, img_size = parse_data_spec(data.spec), stage_data.img_size
    origin = foreign.Origin.read(teacher.name, teacher.checkpoint)  # its hub / folder config, read once
    folder = _teachers_folder(f"{foreign.source_slug(origin)}-{spec}-{img_size}px")
    ckpt = teacher.checkpoint
    if teacher.finetune:  # its weights, its classifier re-initialised where the data's classes differ
        tuned = replace(teacher, name=origin.architecture if ckpt else teacher.name, checkpoint=None, weights=ckpt)
        return _finished_or_trained(tuned, stage_data, folder / TEACHER_FILE)
    path = folder / TEACHER_FILE
    if path.is_file():
        _log.info(f"using the teacher adopted earlier for this data: {path}")
        return path
    found = foreign.trained_for(origin)
    model = foreign.build(origin, found.num_classes, img_size)
    prep = Preprocessing.from_meta(data_config(model), img_size)
    splits = load_data(stage_data, prep, seed=teacher.train.seed, device=teacher.train.device)
    how = foreign.check_classes(found, splits.classes, ckpt or teacher.name)
    device = resolve_device(teacher.train.device)
    val = evaluate(model.to(device), make_loader(splits.val, 64, train=False, workers=teacher.train.workers), device)
    source = f"checkpoint {ckpt}" if ckpt else teacher.name
    if distributed.info().is_main:
        soft = soft_target_entropy(model.cpu(), splits.train, DistillConfig().kd_temperature, seed=teacher.train.seed)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(path, model, model_meta(model, origin.architecture, splits, img_size, prep.meta(), "teacher",
                                           source=source, top1=val["top1"], top5=val["top5"], saved="model",
                                           adopted=True, classes_checked=how, soft_targets=soft,
                                           split_seed=teacher.train.seed))
    distributed.barrier()
    _log.info(f"teacher {source}: used as it is (classes checked by {how}); val top-1 {val['top1']:.2f}% on {spec}")
    return path


def _check_epochs_asked(teacher: TeacherOptions, ran: int, path: Path) -> None:
    """A teacher trained earlier serves `--teacher-epochs N` only when its stage ran N epochs (without the flag it
    serves whatever the recipe and the CPU budget gave it)."""
    if teacher.cpu_budget is not None or ran == teacher.train.epochs:
        return
    raise UserError(f"--teacher-epochs {teacher.train.epochs}: the teacher trained earlier for this data ({path}) ran "
                    f"{ran} epochs: drop --teacher-epochs to use it, or train another with `spofa teacher --teacher "
                    f"{teacher.name} --epochs {teacher.train.epochs} --out DIR` and pass --teacher-ckpt "
                    f"DIR/{TEACHER_FILE}")


def _check_weights_used(teacher: TeacherOptions, path: Path) -> None:
    """A teacher trained earlier serves `--teacher-weights FILE` only when it was trained from that file."""
    if not teacher.weights:
        return
    source = read_model_meta(path).get("source")
    started = source.removeprefix("weights file ") if isinstance(source, str) and source.startswith("weights file ") \
        else None
    if started is None or Path(started).resolve() != Path(teacher.weights).resolve():  # (the same file by any path)
        raise UserError(f"--teacher-weights {teacher.weights}: the teacher trained earlier for this data "
                        f"({path}) started from {source or 'other weights'}, not from this file: drop "
                        f"--teacher-weights to use it, or train one from the file with `spofa teacher "
                        f"--teacher-weights {teacher.weights} --out DIR` and pass --teacher-ckpt DIR/{TEACHER_FILE}")
