"""The teacher cache's key: what the teacher's logits depend on, the record format, the fingerprint.

Augmentation is seeded per (seed, epoch, sample index) (`loaders.AugSeeded`), so the teacher's
logits for a training image are a pure function of (teacher weights, data + split, input size,
preprocessing, seed, epoch, index) and of how the teacher computes (device, AMP, batch). A
`CacheKey` names all of these; `fingerprint()` hashes them with the record format (`RecordFormat`)
and the file version, so a cache of another teacher, data, size or seed is another key.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from spofa_deploy.errors import UserError

FORMATS = ("fp32", "fp16", "topk")
# Default record: fp16 full logits up to this many classes, top-k beyond (as FKD does for ImageNet),
# but only for losses at temperature 1 (see `default_format`).
FULL_LOGITS_MAX_CLASSES = 100
# benchmarks/teacher_cache_topk.py (trained synthetic teachers): at k = 50 the losses at temperature 1
# (OFA, SPOFA, KD at T=1) move by < 1e-3 relative for 100-class and confident (87 %) 1000-class
# teachers, 1.2e-2 for a weak (49 %) one; KD at T=4 moves by 8-27 % at k = 50-100 of 1000 classes.
DEFAULT_TOPK = 50
# Top-k records keep the tail's mass exact at these softmax temperatures (OFA's tau and KD's T by
# default; a run at another temperature adds its own), so one record serves ofa/spofa and a kd run
# that asks for top-k alike (by default KD's T = 4 gets full logits: `default_format`).
TAIL_TEMPERATURES = (1.0, 4.0)
VERSION = 1  # of the record file format (in every fingerprint and header)


@dataclass(frozen=True)
class CacheKey:
    """Everything the teacher's training-set logits depend on (all in the fingerprint).

    Attributes:
        teacher: `weights_digest()` of the teacher (its state dict or file bytes), never its file name.
        data: the data spec, e.g. `"cifar100:/data/cifar"`.
        split: `split_digest()` of the training split (labels plus file list or image bytes).
        num_samples: training samples (the index range of the records).
        img_size: input size in pixels.
        mean: normalisation mean.
        std: normalisation std.
        interpolation: resize interpolation.
        crop_pct: eval crop fraction (part of the teacher's preprocessing config).
        augmentation: a description of the training transform, e.g. `repr(splits.train.transform)`.
        seed: the training seed (augmentation and data order).
        train_fraction: fraction of the training split kept.
        compute: how the teacher runs, e.g. `"cpu/fp32/batch16/rank0of1/torch2.4"`; bitwise equal
            logits need the same device kind, AMP dtype and batch grouping.
    """

    teacher: str
    data: str
    split: str
    num_samples: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float
    augmentation: str
    seed: int
    train_fraction: float
    compute: str = ""

    def to_dict(self) -> dict:
        """Plain JSON types (numpy scalars or a list for a tuple hash the same as the Python values)."""
        return {f.name: _PLAIN[f.type](getattr(self, f.name)) for f in fields(self)}


_PLAIN = {"str": str, "int": int, "float": float, "tuple[float, ...]": lambda v: [float(x) for x in v]}


@dataclass(frozen=True)
class RecordFormat:
    """How an epoch's logits are stored: "fp32" | "fp16" | "topk" (k classes, tail mass at some temperatures)."""

    fmt: str
    num_classes: int
    k: int | None = None
    tail_temperatures: tuple[float, ...] = ()

    @classmethod
    def make(cls, num_classes: int, fmt: str | None = None, k: int | None = None,
             temperature: float = 1.0) -> "RecordFormat":
        """Check and complete a format: None -> `default_format`; top-k gets `DEFAULT_TOPK` and the temperatures.

        Raises:
            UserError: an unknown format, or a k that is not below the class count.
        """
        fmt = fmt or default_format(num_classes, temperature)
        if fmt not in FORMATS:
            raise UserError(f"unknown teacher cache format '{fmt}': use {', '.join(FORMATS)}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise UserError(f"the teacher cache needs a positive temperature, got {temperature}")
        if fmt != "topk":
            return cls(fmt, int(num_classes))
        k = DEFAULT_TOPK if k is None else int(k)
        if not 1 <= k < num_classes:
            raise UserError(f"teacher cache top-k needs 1 <= k < {num_classes} classes, got {k} (use fp16 for full logits)")
        return cls(fmt, int(num_classes), k, tuple(sorted({*TAIL_TEMPERATURES, float(temperature)})))

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "format": self.fmt, "k": self.k,
                "tail_temperatures": list(self.tail_temperatures)}


def fingerprint(key: CacheKey, record: RecordFormat) -> str:
    """Hex sha256 of every key part plus the record format and the file version."""
    parts = {"version": VERSION, "key": key.to_dict(), "record": record.to_dict()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weights_digest(weights: str | Path | Mapping[str, torch.Tensor]) -> str:
    """sha256 of a teacher's weights: the bytes of a weights file, or the tensors of a state dict.

    A state dict hashes names, dtypes, shapes and raw bytes in name order (buffers included), so
    the same weights give the same digest whatever file they were saved in.
    """
    h = hashlib.sha256()
    if isinstance(weights, Mapping):
        for name in sorted(weights):
            t = weights[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # (bfloat16 has no numpy dtype)
        return h.hexdigest()
    try:
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read teacher weights {weights}: {e.strerror}") from e
    return h.hexdigest()


def split_digest(labels: Sequence[int] | np.ndarray, items: Iterable[str | os.PathLike] | np.ndarray | None = None) -> str:
    """sha256 identifying a training split: its labels in order, plus its members.

    Args:
        labels: the split's labels in index order.
        items: what the samples are: an image array (in-memory data), or one string per sample
            (e.g. `f"{path}|{size}|{mtime_ns}"` for image files, so a replaced file changes it).
    """
    h = hashlib.sha256()
    lab = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
    h.update(f"labels {lab.shape}\n".encode())
    h.update(lab.tobytes())
    if isinstance(items, np.ndarray):
        arr = np.ascontiguousarray(items)
        h.update(f"array {arr.dtype} {arr.shape}\n".encode())
        h.update(arr.tobytes())
    elif items is not None:
        h.update(b"items\n")
        for s in items:
            h.update(os.fsencode(s) + b"\0")  # fsencode: file names that are not UTF-8 still hash
    return h.hexdigest()


def default_format(num_classes: int, temperature: float = 1.0) -> str:
    """fp16 full logits up to `FULL_LOGITS_MAX_CLASSES` classes or for a loss at T != 1, else top-k.

    A softened loss (KD at T = 4) reads the teacher's whole tail, which no top-k keeps: measured
    several % off at k = 100 of 1000 classes, so it gets full logits whatever the class count.
    """
    return "topk" if num_classes > FULL_LOGITS_MAX_CLASSES and temperature == 1.0 else "fp16"
