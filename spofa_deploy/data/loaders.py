"""Transforms, loaders and seeded augmentation: datasets -> batches.

`build_transforms` (train / eval, by resolution), `make_loader` (seeded shuffling, workers,
worker errors as one-line `UserError`s, `EncodedBatch`es finished on their device),
`AugSeeded` (augmentation seeded per (seed, epoch, sample index)) and `EpochSampler`
(a sampler handing out (index, epoch) pairs for it).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from spofa_deploy.data.device_augment import EncodedBatch, EncodedSample
from spofa_deploy.errors import UserError
from spofa_deploy.models import SMALL_IMAGE, Preprocessing


def build_transforms(prep: Preprocessing, *, train: bool = True, flips: bool = True):
    """Train / eval transforms suited to the resolution.

    >= 64 px: random-resized-crop + flip for training, resize + center crop for eval.
    Smaller images: pad-and-crop jitter (no scale change, which destroys tiny images),
    and a plain resize for eval.
    """
    from torchvision import transforms as T

    img_size, interpolation = prep.img_size, prep.interpolation
    interp = T.InterpolationMode(interpolation) if interpolation in ("bilinear", "bicubic", "nearest") else T.InterpolationMode.BILINEAR
    norm = [T.ToTensor(), T.Normalize(prep.mean, prep.std)]
    if not train:  # timm's eval transform for (crop_pct, crop_mode): what the model files record (Preprocessing.meta)
        scale = math.floor(img_size / prep.crop_pct)
        resize = T.Resize((scale, scale) if prep.crop_mode == "squash" else scale, interpolation=interp)
        return T.Compose([resize, T.CenterCrop(img_size)] + norm)
    if img_size >= SMALL_IMAGE:
        aug = [T.RandomResizedCrop(img_size, interpolation=interp)] + ([T.RandomHorizontalFlip()] if flips else [])
        return T.Compose(aug + norm)
    base = [T.Resize((img_size, img_size), interpolation=interp),
            T.RandomCrop(img_size, padding=max(1, img_size // 8), padding_mode="edge")]
    base += [T.RandomHorizontalFlip()] if flips else []
    return T.Compose(base + norm)


def default_workers() -> int:
    # Leave a core for the training process itself on small machines.
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int = 0, workers: int | None = None,
                pin_memory: bool = False, sampler=None) -> DataLoader:
    """A DataLoader with seeded shuffling, pinned memory on GPU and persistent workers.

    Batches of a `DeviceAugment` dataset come out decoded and augmented on its device.
    """
    workers = default_workers() if workers is None else workers
    gen = torch.Generator().manual_seed(seed)
    # A last training batch of one sample breaks BatchNorm ("Expected more than 1 value per channel"): drop it.
    drop_last = train and len(sampler if sampler is not None else ds) % batch_size == 1
    return _Loader(
        ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, drop_last=drop_last,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0, generator=gen,
        worker_init_fn=_seed_worker, collate_fn=_collate,
    )


class _Loader(DataLoader):
    """A DataLoader whose worker errors read as the original one-line `UserError`.

    torch re-raises an error of a worker process as `type(e)("Caught ... Original Traceback ...")`;
    a user error (an unreadable image) must stay one clear line, so it is unwrapped here.
    It also finishes batches of encoded images (`EncodedBatch`) on their device.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Files the device decoder could not read (warned once each), counted with the dataset's own.
        self.corrupt: set[str] = _corrupt_set(self.dataset)

    def __iter__(self):
        try:
            for batch in super().__iter__():
                if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], EncodedBatch):
                    batch = (*batch[0].aug.apply(batch[0], batch[1], self.corrupt), *batch[2:])
                yield batch
        except UserError as e:
            text = str(e)
            marker = f"{type(e).__module__}.{type(e).__qualname__}: "
            if "Original Traceback" not in text or marker not in text:
                raise
            raise type(e)(text[text.rindex(marker) + len(marker):].strip()) from None


def _corrupt_set(ds) -> set[str]:
    """The `corrupt` set of the `FileDataset` under wrappers (`AugSeeded`, `Subset`), else a new one."""
    while ds is not None:
        if isinstance(getattr(ds, "corrupt", None), set):
            return ds.corrupt
        ds = getattr(ds, "ds", getattr(ds, "dataset", None))
    return set()


def _collate(batch: list):
    if batch and isinstance(batch[0][0], EncodedSample):
        rest = [default_collate([b[i] for b in batch]) for i in range(2, len(batch[0]))]  # (sample indices)
        return EncodedBatch.collate([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64), *rest
    return default_collate(batch)


def _seed_worker(worker_id: int) -> None:
    # Each worker's numpy/random state derives from torch's per-worker seed, so augmentation is reproducible.
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ---------------------------------------------------------------- seeded augmentation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample: a function of (run seed, epoch, sample index) only."""
    return hash((seed, epoch, index)) % 2**63  # a tuple of ints hashes the same in every process


class AugSeeded(Dataset):
    """Seeds the augmentation of each sample from (seed, epoch, index).

    So the same seed gives the same augmented images whatever the number of loader
    workers, and a resumed run sees exactly the images the uninterrupted one would.
    torchvision's transforms draw from torch's global CPU generator, so it is seeded for
    the sample and restored afterwards: loading leaves the caller's RNG state (torch CPU
    and CUDA, `random`, numpy) as it was, which matters with zero workers, where samples
    load in the training process itself.
    """

    def __init__(self, ds, seed: int, with_index: bool = False):
        self.ds, self.seed, self.with_index = ds, seed, with_index

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item
        with torch.random.fork_rng(devices=[]):
            # Not torch.manual_seed: that would also reseed every CUDA generator (dropout in the step).
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            sample = self.ds[index]
        # `with_index`: (image, label, index), so the loop can look the sample up in the teacher cache.
        return (*sample, index) if self.with_index else sample


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler with `set_epoch` (e.g. DistributedSampler) to hand out (index, epoch)."""

    def __init__(self, base):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)
