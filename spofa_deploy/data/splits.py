"""Data specs -> datasets with their transforms (`load_splits`): the data path's entry point.

The parts live in their own modules and are importable from here too:

    datasets.py        DataSpec, parse_data_spec, ArrayDataset / FileDataset, Splits,
                       stratified_split / stratified_subset, the digits / CIFAR / image-folder readers
    loaders.py         build_transforms, make_loader, AugSeeded (seeded augmentation), EpochSampler
    device_augment.py  DeviceAugment: training images decoded and augmented on a device (nvJPEG)

Training images of an image folder can also be decoded and augmented on the GPU
(`load_splits(..., decode_device="cuda")`): the loader workers then only read the file
bytes and draw each sample's crop and flip, and the main process decodes the batch with
nvJPEG and applies them there (`DeviceAugment`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spofa_deploy.data.datasets import (DataSpec, Splits, parse_data_spec,
                       read_datasets, stratified_subset)
from spofa_deploy.data.device_augment import DeviceAugment
from spofa_deploy.errors import UserError
from spofa_deploy.data.loaders import build_transforms
from spofa_deploy.machine import resolve_device
from spofa_deploy.models import Preprocessing


@dataclass
class DataOptions:
    """What a stage trains on and how it is read: the `--data` options of `spofa teacher` and `spofa distill`."""

    spec: str = "digits"  # digits | cifar10[:DIR] | cifar100[:DIR] | imagefolder:DIR
    img_size: int | None = None  # None: the teacher's size (distill), else the data's natural size
    train_fraction: float = 1.0  # train on this stratified fraction of the training split
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of failing
    download: bool = False  # let torchvision fetch CIFAR (needs a network)
    gpu_decode: bool = False  # decode and augment training images on the training device (nvJPEG on a GPU)


def load_data(data: DataOptions, prep: Preprocessing, *, seed: int, device: str) -> Splits:
    """The splits of `data` with a model's preprocessing (`gpu_decode`: training images decode on `device`)."""
    return load_splits(data.spec, prep, download=data.download, seed=seed, train_fraction=data.train_fraction,
                       skip_corrupt=data.skip_corrupt,
                       decode_device=resolve_device(device).type if data.gpu_decode else None)


def split_seed(meta: dict) -> int:
    """The seed a model's data was split with (an image folder without val/ is split by the run's seed), so that
    exporting, calibrating and benchmarking it read the validation images it was not trained on: a teacher's
    `split_seed`, a student's training seed; 0 for a model from before either was recorded."""
    if "split_seed" in meta:
        return int(meta["split_seed"])
    return int((meta.get("train") or {}).get("seed", 0))


def load_splits(spec: str | DataSpec, prep: Preprocessing, *, train_aug: bool = True, download: bool = False,
                seed: int = 0, train_fraction: float = 1.0, skip_corrupt: bool = False,
                decode_device: str | None = None) -> Splits:
    """Build the train and val datasets of a data spec with their transforms.

    Args:
        spec: a data spec string or parsed `DataSpec`.
        prep: the model's preprocessing (size and timm's data config, usually the teacher's).
        train_aug: augment the training split (False gives the eval transform, e.g. for calibration).
        download: let torchvision fetch CIFAR where a network exists.
        seed: seed of the imagefolder split (when there is no val/) and of `train_fraction`.
        train_fraction: keep this stratified fraction of the training split (low-data studies).
        skip_corrupt: skip unreadable image files with a warning instead of failing.
        decode_device: decode and augment the training images of an image folder on this
            device ("cuda": nvJPEG; "cpu": torchvision's decoder in the main process) instead
            of with PIL in the loader workers; same augmentation statistics (`DeviceAugment`).
            The validation split keeps the PIL path.
    """
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if decode_device is not None:
        _check_decode_device(spec, prep.img_size, decode_device)
    train, val, classes = read_datasets(spec, download=download, seed=seed, skip_corrupt=skip_corrupt)
    if len(classes) < 2:
        raise UserError(f"data {spec} has {len(classes)} class(es): at least 2 are needed")
    if not 0.0 < train_fraction <= 1.0:
        raise UserError(f"--train-fraction must be in (0, 1], got {train_fraction}")
    if train_fraction < 1.0:
        n = max(len(classes), round(len(train) * train_fraction))
        train = train.subset(stratified_subset(train.labels, n, seed))
    if len(val) == 0:
        raise UserError(f"data {spec} has an empty validation split")
    train.transform = build_transforms(prep, train=train_aug, flips=spec.flips)
    val.transform = build_transforms(prep, train=False, flips=spec.flips)
    if decode_device is not None and train_aug:
        train.encoded = True
        train.transform = DeviceAugment(train.transform, decode_device, skip_corrupt)
    return Splits(train, val, classes, spec, {"train_size": len(train), "val_size": len(val)})


def _check_decode_device(spec: DataSpec, img_size: int, device: str) -> None:
    if spec.kind != "imagefolder":
        raise UserError(f"--gpu-decode decodes image files: it needs --data imagefolder:DIR, not {spec}")
    if img_size < 64:
        raise UserError(f"--gpu-decode needs --img-size >= 64 (random-resized-crop); {img_size} px augments on the CPU")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown decode device '{device}': {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--gpu-decode needs a CUDA GPU, and torch sees none")
