"""Quantization-aware distillation: INT8 fake quantization in the student, its FP32 teacher as the target.

`qat(run)` takes a distilled student and
  1. inserts INT8 fake quantization with NVIDIA ModelOpt (`modelopt.torch.quantization`,
     `INT8_DEFAULT_CFG`): weights per output channel, activations per tensor, both symmetric,
     so the ONNX it exports is the symmetric Q/DQ graph `spofa export --precision int8` writes
     for TensorRT; the first conv and the classifier stay in float like that export's
     `--keep-ends` default;
  2. calibrates the activation ranges (max) on the same seeded, stratified training images
     that export's INT8 calibration draws;
  3. fine-tunes it a few epochs at a low rate through the project's training loop (`fit`:
     checkpoint every epoch, `--resume` after a kill, EMA, best-of kept) with the KD loss of
     the distillers against the run's FP32 teacher plus the labels (labels only, said once,
     where no teacher is found), on the student's own training split (its `train_fraction`);
     with a teacher cache the teacher's logits are read from it where its key matches
     (`open_teacher_cache`);
  4. writes `student.qat.safetensors` + `student.qat.json` (`qat: true` and the settings) into
     the run folder; its fine-tuning files go to `RUN/qat/`.

Why ModelOpt and not PyTorch PT2E (measured by `benchmarks/qat_backends.py`, docs/results.md):
PT2E left torch core in 2.6 for torchao (not a dependency here), its presets quantize
activations asymmetrically (non-zero zero points, which TensorRT refuses), and its graph is a
`torch.export` program; ModelOpt is already the project's INT8 quantizer, runs on the CPU, and
its TorchScript ONNX export is a symmetric Q/DQ graph that ONNX Runtime runs to 1e-7 of the
fake-quant model.

Why the KD loss on the final logits whatever the run's method: the OFA/SPOFA stage heads are
training-only modules that are not in the student file; a short low-rate fine-tuning only has
to pull the quantized logits back to the teacher's, which the logit KD term does.

Why the distillation's teacher cache can serve QAT: the loop seeds each training view from
(seed, epoch, sample index), so QAT's epoch e with the distillation's seed, batch size, device and
data feeds the teacher exactly the images the distillation's epoch e did; the cache key names all
of these, so a QAT run with other settings is another key (a miss, said once) and never reads
logits of other images.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from calibration.dataset import calibration_set
from calibration.quantize import _quiet
from spofa_deploy.artifacts import load_model, load_state, read_model_meta, save_model, verify_artifact
from spofa_deploy.data.splits import load_splits
from spofa_deploy.method.distillers import KD, DistillConfig, Supervised
from spofa_deploy.errors import MissingDependency, UserError
from spofa_deploy.train.hooks import Hooks
from spofa_deploy.models import Preprocessing, create_model
from spofa_deploy.run_dirs import latest_run, release_run
from spofa_deploy.run_files import CHECKPOINT, STUDENT_FILE, TEACHER_FILE
from spofa_deploy.train.loop import FitResult, TrainConfig, evaluate, fit, resumed_config

_log = logging.getLogger(__name__)

QAT_FILE = "student.qat.safetensors"  # (+ student.qat.json) beside the student
QAT_FOLDER = "qat"  # the fine-tuning's checkpoint, metrics and trace, inside the run
INSTALL = "pip install 'nvidia-modelopt[onnx]==0.47.*' requests"  # (its torch quantiser imports requests, undeclared)
CALIB_BATCH = 64


def default_train() -> TrainConfig:
    """The fine-tuning recipe: 3 epochs of SGD at a tenth of the student recipe's rate, no warm-up.

    A low rate keeps the calibrated ranges valid while the weights adapt to the rounding.
    """
    return TrainConfig(epochs=3, lr=0.002, warmup_epochs=0.0, ema_decay=0.99)


@dataclass
class QatResult:
    """What `qat` wrote and measured (val top-1 in PyTorch, percent)."""

    path: Path
    meta: dict
    fp32_top1: float
    ptq_top1: float  # after calibration alone: the fake-quant model before any fine-tuning
    fit: FitResult
    teacher: str | None  # the teacher's model name; None: labels only
    seconds: float
    notes: list[str] = field(default_factory=list)


def require_modelopt():
    """`modelopt.torch.quantization`, or a one-line MissingDependency naming the install command."""
    try:
        import modelopt.torch.quantization as mtq
    except Exception as e:  # ImportError, or a broken install raising anything at import
        raise MissingDependency(f"spofa qat needs NVIDIA ModelOpt's torch quantization "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {INSTALL}") from e
    return mtq


def end_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the first and the last Conv/Linear module to run (stem conv, classifier), in that order.

    By execution order, not registration order, like `quantize.boundary_nodes` on the ONNX graph.
    """
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return sorted({order[0], order[-1]}, key=order.index) if order else []


def quant_config(keep: list[str], per_channel: bool = True) -> dict:
    """ModelOpt's INT8 config (per-channel weights, per-tensor activations, max calibration), `keep` left float.

    `per_channel=False` gives per-tensor weights: coarser (a study knob that makes the INT8 loss visible).
    """
    mtq = require_modelopt()
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if not per_channel:
        cfg["quant_cfg"].append({"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    for name in keep:  # quantizer names are "<module>.<input|weight|output>_quantizer"; later entries win
        cfg["quant_cfg"].append({"quantizer_name": f"{name}.*", "enable": False})
    return cfg


def quantizers(model: nn.Module) -> list[str]:
    """Names of the enabled fake quantizers in `model`."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled]


def insert_fake_quant(model: nn.Module, calib: torch.Tensor, *, keep_ends: bool = True,
                      per_channel: bool = True) -> nn.Module:
    """Insert INT8 fake quantization into `model` (in place) and calibrate it on `calib` (N, C, H, W).

    Raises:
        MissingDependency: ModelOpt's torch quantization is not importable.
        UserError: the model has no layer ModelOpt quantizes, or ModelOpt refuses it.
    """
    mtq = require_modelopt()
    if not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in model.modules()):
        raise UserError(f"{type(model).__name__} has no layer INT8 fake quantization applies to (Conv, Linear): "
                        "nothing to fine-tune for INT8")
    keep = end_layers(model, calib[:1]) if keep_ends else []

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(calib), CALIB_BATCH):
                m(calib[i:i + CALIB_BATCH])

    try:
        with _quiet():  # ModelOpt prints "Inserted N quantizers"
            model = mtq.quantize(model.eval(), quant_config(keep, per_channel), forward_loop)
    except (RuntimeError, NotImplementedError) as e:  # a layer ModelOpt cannot handle
        raise UserError(f"ModelOpt cannot quantize {type(model).__name__}: {str(e).splitlines()[0]}") from e
    if not quantizers(model):  # (e.g. its only layers are the ends kept in float)
        raise UserError(f"no layer of {type(model).__name__} is left to quantize (--quantize-ends quantizes its "
                        "first and last layers too)")
    return model


def load_qat_model(path: str | Path, trust: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a QAT student from `student.qat.safetensors` + its sidecar (fake quantizers with their ranges).

    Returns:
        (model in eval mode, metadata)
    """
    meta = read_model_meta(path, written_by="spofa qat")
    if not meta.get("qat"):
        raise UserError(f"{path} is not a QAT student (its sidecar has no `qat: true`): make one with `spofa qat`")
    verify_artifact(path, meta, trust=trust)
    size, chans = int(meta["img_size"]), int(meta.get("in_chans", 3))
    model = create_model(meta["model"], int(meta["num_classes"]), img_size=size, exportable=True)
    # One calibration pass creates the range buffers; the file's values replace them.
    settings = meta["qat_settings"]
    model = insert_fake_quant(model, torch.zeros(1, chans, size, size), keep_ends=bool(settings["keep_ends"]),
                              per_channel=bool(settings.get("per_channel", True)))
    try:
        model.load_state_dict(load_state(path))
    except RuntimeError as e:
        raise UserError(f"{path} does not fit a fake-quant {meta['model']}: {str(e).splitlines()[-1].strip()}") from e
    return model.eval(), meta


def resolve_student(source: str | Path | None) -> Path:
    """The student file of a run folder, a `.safetensors` file, or `runs/latest` (None)."""
    path = latest_run() / STUDENT_FILE if source is None else Path(source)
    if path.is_dir():
        path = path / STUDENT_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"spofa qat takes a run folder or a student .safetensors; {path} is neither")
    return path


def find_teacher(student: Path, meta: dict) -> Path | None:
    """The run's teacher beside the student (the file its metadata names), or None."""
    path = student.parent / (meta.get("teacher_file") or TEACHER_FILE)
    return path if meta.get("role") != "teacher" and path.is_file() else None


def _save_hook(path: Path, meta: dict):
    """`on_best`: the best of model and EMA, with its figures, as the QAT student."""

    def save(net: nn.Module, best: dict) -> None:
        save_model(path, net, {**meta, "top1": best["top1"], "saved": best["source"], "epoch": best["epoch"],
                               "model_top1": best["model_top1"], "ema_top1": best["ema_top1"]})

    return save


def qat(source: str | Path | None = None, *, train: TrainConfig | None = None, calib_samples: int = 512,
        keep_ends: bool = True, labels_only: bool = False, resume: bool = False,
        per_channel: bool = True, teacher_cache: str | Path | None = None) -> QatResult:
    """Quantization-aware fine-tuning of a distilled student with its FP32 teacher (see the module docstring).

    Args:
        source: a run folder or student `.safetensors` (None: `runs/latest`).
        train: the fine-tuning settings (default `default_train()`).
        calib_samples: training images that calibrate the activation ranges (seeded, stratified).
        keep_ends: keep the first conv and the classifier in float (as `spofa export --keep-ends`).
        labels_only: fine-tune on the labels alone, even where the run has a teacher.
        resume: continue the fine-tuning in `RUN/qat/` from its last checkpoint.
        per_channel: per-channel weight scales (TensorRT's default); False: per tensor.
        teacher_cache: the distillation's `--teacher-cache` folder: the teacher's logits are read from
            it where its key matches QAT's views (else the teacher runs and they are added to it).

    Raises:
        UserError: bad input (no student, a non-quantizable model, a fine-tuning already there without `resume`).
        MissingDependency: ModelOpt's torch quantization is not installed.
    """
    from spofa_deploy.run_dirs import new_run_dir

    start = time.perf_counter()
    require_modelopt()
    train = train or default_train()
    train.validate()
    student = resolve_student(source)
    model, meta = load_model(student, exportable=True)
    work = student.parent / QAT_FOLDER
    if not resume and (work / CHECKPOINT).is_file():
        raise UserError(f"{work} holds a QAT fine-tuning already: pass --resume to continue it, or remove that "
                        "folder to start over")
    work = new_run_dir(work, "qat", resume=resume, writer="spofa qat")
    notes: list[str] = []
    tpath = None if labels_only else find_teacher(student, meta)
    if tpath is None and not labels_only:
        notes.append(f"no teacher beside {student.name} ({meta.get('teacher_file') or TEACHER_FILE}): "
                     "QAT fine-tunes on the labels only")
        _log.info("note: %s", notes[-1])
    torch.manual_seed(train.seed)
    calib = calibration_set(meta, n=calib_samples, seed=train.seed)
    # The student's own training split: its image-folder split and `train_fraction` subset are drawn
    # with the distillation's seed, so QAT neither trains on its validation images nor on other data.
    splits = load_splits(meta["data"], Preprocessing.from_meta(meta), seed=int(meta.get("train", {}).get("seed", 0)),
                         train_fraction=float(meta.get("train_fraction") or 1.0))
    device = torch.device("cpu")
    fp32_top1 = evaluate(model, _val_loader(splits, train), device)["top1"]
    images = torch.from_numpy(calib.images)
    kept = end_layers(model, images[:1]) if keep_ends else []
    model = insert_fake_quant(model, images, keep_ends=keep_ends, per_channel=per_channel)
    ptq_top1 = evaluate(model, _val_loader(splits, train), device)["top1"]
    task, teacher = _task(model, tpath, meta)
    tcache = None
    if teacher_cache is not None and teacher is not None:
        tcache = open_teacher_cache(teacher_cache, task, splits, meta, _resumed_config(work, train) if resume else train)
        notes.append(tcache.note)
    settings = {"keep_ends": keep_ends, "kept_float": kept, "per_channel": per_channel, "calib_samples": len(calib),
                "calib_data": calib.spec, "method": "kd" if teacher else "none", "teacher": teacher,
                "backend": "modelopt", "config": f"INT8_DEFAULT_CFG: symmetric, max calibration, weights per "
                                                 f"{'channel' if per_channel else 'tensor'}, activations per tensor",
                "train": asdict(train), "fp32_top1": fp32_top1, "ptq_top1": ptq_top1,
                "teacher_cache": None if tcache is None else {"folder": str(tcache.folder),
                                                               "epochs_cached_at_start": tcache.cached_epochs()}}
    out = student.with_name(QAT_FILE)
    qmeta = {**{k: v for k, v in meta.items() if k not in ("sha256", "size_bytes", "versions", "saved_at")},
             "qat": True, "qat_settings": settings, "source": student.name}
    _log.info(f"qat: {meta['model']} INT8 fake quant ({len(quantizers(model))} quantizers), "
              f"fp32 {fp32_top1:.2f}% -> calibrated {ptq_top1:.2f}%, fine-tuning with "
              f"{'the teacher ' + teacher if teacher else 'the labels only'} -> {out}")
    result = fit(task, splits, train, work, resume=resume, label="qat", hooks=Hooks(on_best=_save_hook(out, qmeta)),
                 run_info={"qat": settings}, teacher_cache=tcache)
    release_run(work)
    return QatResult(out, read_model_meta(out), fp32_top1, ptq_top1, result, teacher,
                     time.perf_counter() - start, notes)


def open_teacher_cache(folder: str | Path, task: KD, splits, meta: dict, train: TrainConfig):
    """The teacher cache of QAT's training views in `folder`, keyed as the distillation keys its own.

    Every key part is computed from what QAT itself feeds the teacher (its teacher's weights, its
    split, transform, seed, batch, device), in the same form as `spofa distill --teacher-cache`
    writes it, so the distillation's records are read exactly when the images are the same ones.
    A full-logit record of this key already in the folder is read in its own format (fp32 or fp16,
    as the distillation chose); otherwise the format is the one QAT's KD temperature picks
    (`default_format`), so a distillation's top-k record (> 100 classes at T = 1) is not read by KD
    at T = 4, whose softened targets need the tail that top-k drops.
    It logs the cache's note once (e.g. "teacher cache miss: ... holds outputs of another seed").

    Returns:
        the open `TeacherCache`; `fit(..., teacher_cache=)` reads and writes it.
    """
    from spofa_deploy.pipeline import teacher_cache_key
    from spofa_deploy.teacher.cache import TeacherCache

    # QAT reads image files without --skip-corrupt (a distillation with it is another key)
    key = teacher_cache_key(task.teacher, splits, img_size=int(meta["img_size"]), prep=Preprocessing.from_meta(meta),
                            train=train, skip_corrupt=False, train_fraction=float(meta.get("train_fraction") or 1.0))
    tcache = TeacherCache.open(folder, key, num_classes=splits.num_classes, fmt=_full_record_format(Path(folder), key),
                               temperature=task.cfg.kd_temperature)
    cached = sorted(set(tcache.cached_epochs()) & set(range(train.epochs)))
    _log.info(f"{tcache.note} ({len(cached)} of the {train.epochs} QAT epochs cached)")
    return tcache


def _full_record_format(folder: Path, key) -> str | None:
    """The format of a full-logit (fp32/fp16) record of `key` already in `folder`, else None (the default)."""
    from spofa_deploy.artifacts import read_json

    for manifest in sorted(folder.glob("*/manifest.json")) if folder.is_dir() else ():
        try:
            saved = read_json(manifest)
            if saved["key"] == key.to_dict() and saved["record"]["format"] in ("fp32", "fp16"):
                return saved["record"]["format"]
        except (UserError, KeyError, TypeError):
            continue  # damaged or foreign: the cache itself says so
    return None


def _resumed_config(work: Path, train: TrainConfig) -> TrainConfig:
    """The settings a resumed fine-tuning trains with (its checkpoint's), so the cache is keyed by them."""
    from spofa_deploy.run_files import load_checkpoint

    return resumed_config(train, load_checkpoint(work / CHECKPOINT)["config"])


def _val_loader(splits, train: TrainConfig):
    from spofa_deploy.data.loaders import make_loader

    return make_loader(splits.val, train.batch_size * 2, train=False, workers=0)


def _task(model: nn.Module, teacher_path: Path | None, meta: dict):
    """The KD task with the run's loss settings and its teacher, or plain cross-entropy without one."""
    loss = DistillConfig(**{k: v for k, v in (meta.get("loss") or {}).items()
                            if k in DistillConfig.__dataclass_fields__ and k != "stage_eps"})
    if teacher_path is None:
        return Supervised(model, loss.label_smoothing), None
    t_model, t_meta = load_model(teacher_path)
    if t_meta.get("classes") != meta.get("classes"):
        raise UserError(f"teacher {teacher_path} has other classes than the student: pass --labels-only")
    return KD(model, t_model, replace(loss, method="kd")), t_meta["model"]

