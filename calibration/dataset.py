"""Images for calibration, parity and evaluation, preprocessed exactly as the model expects.

Every draw goes through `spofa_deploy.data.splits.load_splits` with the model's own size, mean/std,
interpolation and crop (from its metadata) and the eval transform (`train_aug=False`), and is
seeded and class-stratified (`stratified_subset`), so two exports of the same model
calibrate on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from spofa_deploy.data.splits import load_splits, split_seed
from spofa_deploy.data.datasets import stratified_subset
from spofa_deploy.errors import UserError
from spofa_deploy.models import Preprocessing

SPLITS = ("train", "val")


@dataclass
class ImageSet:
    """Preprocessed images (float32 N, C, H, W) with their labels and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    spec: str
    split: str

    def __len__(self) -> int:
        return len(self.labels)


def load_split(meta: dict, split: str, spec: str | None = None):
    """The `split` dataset of `spec` (default: the model's own data) with the eval transform."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    spec = spec or meta.get("data")
    if not spec:
        raise UserError("the model metadata names no data set ('data'): pass --calib-data SPEC")
    splits = load_splits(spec, Preprocessing.from_meta(meta), train_aug=False, seed=split_seed(meta))
    return getattr(splits, split), str(splits.spec)


def draw(ds, n: int | None, seed: int = 0) -> np.ndarray:
    """Seeded, class-stratified indices of `n` samples (all of them for None or n >= len)."""
    labels = np.asarray(ds.labels)
    return np.arange(len(labels)) if n is None else stratified_subset(labels, n, seed)


def batches(ds, idx: np.ndarray, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) numpy batches of `ds[idx]` without holding all images at once."""
    for i in range(0, len(idx), batch_size):
        items = [ds[int(j)] for j in idx[i:i + batch_size]]
        yield (np.stack([x.numpy() for x, _ in items]).astype(np.float32),
               np.array([y for _, y in items], dtype=np.int64))


def load_images(meta: dict, split: str, n: int | None, *, spec: str | None = None, seed: int = 0) -> ImageSet:
    """Materialise `n` stratified images of `split` (e.g. 64 val images for a parity check)."""
    ds, spec_str = load_split(meta, split, spec)
    parts = list(batches(ds, draw(ds, n, seed)))
    if not parts:
        raise UserError(f"the {split} split of {spec_str} is empty")
    return ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), spec_str, split)


def calibration_set(meta: dict, spec: str | None = None, n: int = 512, seed: int = 0) -> ImageSet:
    """N training images for INT8 calibration: seeded, stratified, eval transform.

    Args:
        meta: model metadata (size, mean/std, interpolation, crop, data spec).
        spec: data spec to draw from (default: the model's own `data`).
        n: number of images (all of the split when it is smaller).
        seed: draw seed.

    Raises:
        UserError: no data spec, or its images cannot be loaded (int8 needs real images).
    """
    if n < 1:
        raise UserError(f"--calib-samples must be >= 1, got {n}")
    try:
        return load_images(meta, "train", n, spec=spec, seed=seed)
    except UserError as e:
        raise UserError(f"int8 needs calibration images and none could be loaded: {e} (pass --calib-data SPEC)") from e
