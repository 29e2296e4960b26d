"""Data specs (`digits`, `cifar10[:DIR]`, `cifar100[:DIR]`, `imagefolder:DIR`) -> datasets and loaders.

Training images of an image folder can also be decoded and augmented on the GPU
(`load_splits(..., decode_device="cuda")`): the loader workers then only read the file
bytes and draw each sample's crop and flip, and the main process decodes the batch with
nvJPEG and applies them there (`DeviceAugment`).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .errors import UserError
from .models import Preprocessing

_log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
KINDS = ("digits", "cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class DataSpec:
    """A parsed `--data` value."""

    kind: str
    root: Path | None = None

    @property
    def natural_size(self) -> int:
        """Default input size: small for the small-image sets, 224 for photos."""
        return 224 if self.kind == "imagefolder" else 32

    @property
    def flips(self) -> bool:
        # A mirrored digit is another symbol; natural images are mirror-invariant.
        return self.kind != "digits"

    def __str__(self) -> str:
        return self.kind if self.root is None else f"{self.kind}:{self.root}"


def parse_data_spec(spec: str) -> DataSpec:
    """Parse `digits`, `cifar10[:DIR]`, `cifar100[:DIR]` or `imagefolder:DIR`."""
    kind, _, root = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UserError(f"unknown data spec '{spec}': use one of digits, cifar10[:DIR], cifar100[:DIR], imagefolder:DIR")
    if kind == "digits" and root:
        raise UserError("'digits' takes no folder: it ships with scikit-learn")
    if kind == "imagefolder" and not root:
        raise UserError("imagefolder needs a folder: --data imagefolder:DIR")
    if kind.startswith("cifar") and not root:
        root = os.environ.get("SPOFA_DATA", str(Path.home() / ".cache" / "spofa" / "data"))
    return DataSpec(kind, Path(root).expanduser() if root else None)


class ArrayDataset(Dataset):
    """Images held in memory as uint8 arrays (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def subset(self, idx: np.ndarray) -> "ArrayDataset":
        return ArrayDataset(self.images[idx], self.labels[idx], self.transform)


class FileDataset(Dataset):
    """Image files on disk with integer labels.

    With `skip_corrupt`, an unreadable image is replaced by the next readable one and
    counted in `self.corrupt`; otherwise it raises a `UserError` naming the file.
    """

    def __init__(self, paths: list[Path], labels: np.ndarray, transform=None, skip_corrupt: bool = False,
                 encoded: bool = False):
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, np.int64), transform
        self.skip_corrupt = skip_corrupt
        self.encoded = encoded  # hand `EncodedImage`s (file bytes) to the transform instead of PIL images
        self.corrupt: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, i: int) -> Image.Image | EncodedImage:
        if self.encoded:
            return read_encoded(self.paths[i])
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, i: int):
        for j in range(len(self.paths)):
            k = (i + j) % len(self.paths)
            try:
                img = self._open(k)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if not self.skip_corrupt:
                    raise UserError(f"cannot read image {self.paths[k]}: {e} (use --skip-corrupt to skip such files)") from e
                if str(self.paths[k]) not in self.corrupt:
                    _log.warning("skipping unreadable image %s", self.paths[k])
                self.corrupt.add(str(self.paths[k]))
        else:
            raise UserError("no readable image in the data set")
        return (self.transform(img) if self.transform else img), int(self.labels[k])

    def subset(self, idx: np.ndarray) -> "FileDataset":
        return FileDataset([self.paths[i] for i in idx], self.labels[idx], self.transform, self.skip_corrupt,
                           self.encoded)


@dataclass
class Splits:
    """Train and validation datasets of one data spec, plus class names in label order."""

    train: Dataset
    val: Dataset
    classes: list[str]
    spec: DataSpec
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train_idx, val_idx); every class keeps >= 1 sample on each side."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded, class-balanced choice of `n` indices (all of them when n >= len)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = {c: rng.permutation(np.flatnonzero(labels == c)).tolist() for c in classes}
    out: list[int] = []
    while len(out) < n:  # round robin over classes keeps the draw stratified
        for c in classes:
            if per[c] and len(out) < n:
                out.append(per[c].pop())
    return np.sort(np.array(out, dtype=np.int64))


def _digits() -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8 grey, values 0..16
    labels = d.target.astype(np.int64)
    tr, va = stratified_split(labels, 0.2, seed=0)  # fixed split: same val set for every run
    full = ArrayDataset(images, labels)
    return full.subset(tr), full.subset(va), [str(i) for i in range(10)]


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python format: plain containers and numpy arrays only."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        # pickle protocol 5 (Python 3's HIGHEST_PROTOCOL) rebuilds arrays from a byte buffer
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as e:
        raise UserError(f"CIFAR file missing: {path} (pass --download where a network exists)") from e
    except Exception as e:
        raise UserError(f"cannot read CIFAR file {path}: {e}") from e
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR file (it holds a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar(kind: str, root: Path, download: bool) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    folder, files, meta, label_key, names_key = {
        "cifar10": ("cifar-10-batches-py", ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
                    "batches.meta", "labels", "label_names"),
        "cifar100": ("cifar-100-python", (["train"], ["test"]), "meta", "fine_labels", "fine_label_names"),
    }[kind]
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)  # torchvision fetches and verifies the archive
    base = root / folder
    if not base.is_dir():
        raise UserError(f"no {kind} data in {root} (expected {base}; pass --download where a network exists)")

    def read_one(name: str) -> tuple[np.ndarray, np.ndarray]:
        d = _load_cifar_file(base / name)
        try:
            data = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[label_key], np.int64).reshape(-1)
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{base / name} is not a {kind} batch file ({type(e).__name__}: {e})") from e
        if len(labels) != len(data):
            raise UserError(f"{base / name} is not a {kind} batch file: {len(data)} images, {len(labels)} labels")
        return data, labels

    def read(names: list[str]) -> ArrayDataset:
        parts = [read_one(n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ArrayDataset(data.transpose(0, 2, 3, 1).copy(), labels)

    names = _load_cifar_file(base / meta).get(names_key)
    if not isinstance(names, (list, tuple)):
        raise UserError(f"{base / meta} has no '{names_key}' list: not a {kind} meta file")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    return read(files[0]), read(files[1]), classes


def _class_files(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for p in sorted((folder / c).rglob("*")):
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file():
                paths.append(p)
                labels.append(i)
    return classes, paths, np.array(labels, np.int64)


def _imagefolder(root: Path, seed: int, skip_corrupt: bool) -> tuple[FileDataset, FileDataset, list[str]]:
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"{root} has no train/ folder (expected DIR/train/<class>/*.jpg)")
    classes, paths, labels = _class_files(train_dir)
    if not paths:
        raise UserError(f"no images found under {train_dir}")
    train = FileDataset(paths, labels, skip_corrupt=skip_corrupt)
    if (root / "val").is_dir():
        vclasses, vpaths, vlabels = _class_files(root / "val")
        unknown = sorted(set(vclasses) - set(classes))
        if unknown:
            raise UserError(f"val/ has classes not in train/: {', '.join(unknown)}")
        remap = np.array([classes.index(c) for c in vclasses], np.int64)
        return train, FileDataset(vpaths, remap[vlabels] if len(vlabels) else vlabels, skip_corrupt=skip_corrupt), classes
    tr, va = stratified_split(labels, 0.2, seed)
    return train.subset(tr), train.subset(va), classes


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
    if img_size >= 64:
        if train:
            aug = [T.RandomResizedCrop(img_size, interpolation=interp)] + ([T.RandomHorizontalFlip()] if flips else [])
            return T.Compose(aug + norm)
        return T.Compose([T.Resize(int(img_size / prep.crop_pct), interpolation=interp), T.CenterCrop(img_size)] + norm)
    base = [T.Resize((img_size, img_size), interpolation=interp)]
    if train:
        base += [T.RandomCrop(img_size, padding=max(1, img_size // 8), padding_mode="edge")]
        base += [T.RandomHorizontalFlip()] if flips else []
    return T.Compose(base + norm)


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
    if spec.kind == "digits":
        train, val, classes = _digits()
    elif spec.kind.startswith("cifar"):
        train, val, classes = _cifar(spec.kind, spec.root, download)
    else:
        train, val, classes = _imagefolder(spec.root, seed, skip_corrupt)
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


# ---------------------------------------------------------------- decoding and augmenting on the device


@dataclass
class EncodedImage:
    """An image as a loader worker hands it over without decoding it.

    `data` is the JPEG file's bytes, or, for a file the device decoder does not take
    (PNG and other formats, CMYK or grayscale JPEG), its RGB pixels (3, H, W) uint8
    decoded with PIL in the worker, exactly as the CPU path decodes it.
    """

    data: bytes | torch.Tensor
    height: int
    width: int
    path: str


def read_encoded(path: Path) -> EncodedImage:
    """Read an image file's bytes and size (the header only, no decoding) for `DeviceAugment`."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as im:  # parses the header; pixels stay undecoded
        if im.format == "JPEG" and im.mode == "RGB":  # 3-channel JPEG: nvJPEG decodes it to RGB
            return EncodedImage(raw, im.height, im.width, str(path))
        pixels = np.array(im.convert("RGB"))
    return EncodedImage(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), pixels.shape[0], pixels.shape[1],
                        str(path))


@dataclass
class EncodedSample:
    """One training sample's undecoded image and the crop (top, left, height, width) and flip drawn for it."""

    image: EncodedImage
    box: tuple[int, int, int, int]
    flip: bool
    aug: DeviceAugment


@dataclass
class EncodedBatch:
    """A batch of `EncodedSample`s as it crosses from a loader worker to the main process.

    The JPEG bytes travel as one tensor (one shared-memory block per batch, not one per image).
    """

    jpeg: torch.Tensor  # every JPEG file of the batch, concatenated
    lengths: list[int]  # bytes of each sample in `jpeg` (0 where the sample has pixels)
    pixels: dict[int, torch.Tensor]  # sample -> (3, H, W) uint8 pixels decoded in the worker
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    paths: list[str]
    aug: DeviceAugment

    @classmethod
    def collate(cls, samples: list[EncodedSample]) -> "EncodedBatch":
        files = [s.image.data if isinstance(s.image.data, bytes) else b"" for s in samples]
        jpeg = torch.empty(sum(map(len, files)), dtype=torch.uint8)
        view, at = jpeg.numpy(), 0
        for f in files:
            view[at:at + len(f)] = np.frombuffer(f, np.uint8)
            at += len(f)
        pixels = {k: s.image.data for k, s in enumerate(samples) if not isinstance(s.image.data, bytes)}
        return cls(jpeg, [len(f) for f in files], pixels, [s.box for s in samples], [s.flip for s in samples],
                   [s.image.path for s in samples], samples[0].aug)


class DeviceAugment:
    """The training transform split in two: parameters drawn in the loader workers, pixels made on a device.

    Built from the CPU training transform (`build_transforms`: random-resized-crop, optional
    horizontal flip, normalise), so both paths share the crop scale and ratio ranges, output
    size, interpolation, antialias, flip probability and mean/std. The worker side draws the
    crop with `RandomResizedCrop.get_params` and the flip with `torch.rand`, in the order and
    from the generator the CPU transform uses, so under `AugSeeded` a sample gets the same
    crop and flip on either path (exact resume holds). The device side decodes the batch's
    JPEGs at once (nvJPEG on CUDA) and applies torchvision's own tensor `resized_crop` and
    `hflip`; only the resize kernel differs from PIL's (see tests/test_gpu_decode.py).
    """

    def __init__(self, transform, device: str, skip_corrupt: bool = False):
        """
        Args:
            transform: the CPU training transform (`build_transforms(..., train=True)`, >= 64 px).
            device: where to decode and augment ("cuda": nvJPEG, "cpu": libjpeg-turbo).
            skip_corrupt: replace an undecodable image instead of failing (the `--skip-corrupt` policy).
        """
        from torchvision import transforms as T

        parts = {type(t): t for t in transform.transforms}
        crop, norm = parts.get(T.RandomResizedCrop), parts.get(T.Normalize)
        if crop is None or norm is None or T.ToTensor not in parts:
            raise ValueError(f"DeviceAugment needs a random-resized-crop train transform, got {transform}")
        flip = parts.get(T.RandomHorizontalFlip)
        self.crop, self.flip_p = crop, (flip.p if flip is not None else None)
        self.mean, self.std = list(norm.mean), list(norm.std)
        self.device, self.skip_corrupt = device, skip_corrupt
        # A description for cache keys (teacher_cache): the same draws, but other pixels than the PIL path.
        self._repr = f"DeviceAugment(decode={device}, {transform!r})"

    def __repr__(self) -> str:
        return self._repr

    def __call__(self, img: EncodedImage) -> EncodedSample:
        """Worker side: draw this sample's crop and flip (from torch's global generator, as the CPU path does)."""
        # get_params reads only the image size: a zero-stride stand-in of that shape, no pixels.
        size_only = torch.empty((), dtype=torch.uint8).expand(3, img.height, img.width)
        box = tuple(self.crop.get_params(size_only, self.crop.scale, self.crop.ratio))
        flip = self.flip_p is not None and bool(torch.rand(1) < self.flip_p)  # RandomHorizontalFlip's draw
        return EncodedSample(img, box, flip, self)

    def apply(self, batch: EncodedBatch, labels: torch.Tensor, seen: set[str] | None = None):
        """Main-process side: decode the batch on the device, crop, resize, flip and normalise.

        An image the decoder cannot read raises a `UserError` naming the file, or with
        `skip_corrupt` is replaced by the next readable sample of the batch (image, crop and
        label) with a warning once per file (`seen`).

        Returns:
            (images (B, 3, S, S) float32 on the device, labels)
        """
        from torchvision.transforms import functional as F

        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU under torchrun
        images, errors = _decode_batch(batch, device)
        order = self._readable_order(batch, errors, seen if seen is not None else set())
        size = list(self.crop.size)
        out = []
        for k in order:
            x = F.resized_crop(images[k], *batch.boxes[k], size, self.crop.interpolation, antialias=self.crop.antialias)
            out.append(F.hflip(x) if batch.flips[k] else x)
        # ToTensor + Normalize, as on the CPU path, once for the whole batch.
        x = F.normalize(torch.stack(out).float().div_(255), self.mean, self.std, inplace=True)
        return x, (labels[torch.tensor(order)] if errors else labels)

    def _readable_order(self, batch: EncodedBatch, errors: dict[int, str], seen: set[str]) -> list[int]:
        """Sample k's source: itself, or where unreadable (skip_corrupt) the next readable sample."""
        n = len(batch.paths)
        for k, err in errors.items():
            path = batch.paths[k]
            if not self.skip_corrupt:
                raise UserError(f"cannot read image {path}: {err} (use --skip-corrupt to skip such files)")
            if path not in seen:
                _log.warning("skipping unreadable image %s", path)
            seen.add(path)
        if len(errors) == n:
            raise UserError(f"no readable image in a batch of {n} (e.g. {batch.paths[0]})")
        return [next((k + j) % n for j in range(n) if (k + j) % n not in errors) for k in range(n)]


def _decode_batch(batch: EncodedBatch, device: torch.device) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode a batch's JPEGs in one call on `device` (and move worker-decoded pixels there).

    Returns the (3, H, W) uint8 images, None where unreadable, and the error of each unreadable one.
    """
    images: list[torch.Tensor | None] = [None] * len(batch.paths)
    for k, px in batch.pixels.items():
        images[k] = px.to(device, non_blocking=True)
    jpeg = [k for k, n in enumerate(batch.lengths) if n]
    files = batch.jpeg.split(batch.lengths)
    errors: dict[int, str] = {}
    if jpeg:
        try:
            decoded = _decode_jpegs([files[k] for k in jpeg], device)
        except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
            decoded = []
            for k in jpeg:
                img, err = _decode_one(files[k], device)
                decoded.append(img)
                if img is None:
                    errors[k] = err
        for k, img in zip(jpeg, decoded):
            images[k] = img
    return images, errors


def _decode_one(data: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """One JPEG on `device`, else with libjpeg-turbo on the CPU (a JPEG flavour nvJPEG lacks); else (None, why)."""
    err = ""
    for where in (device, torch.device("cpu")):
        try:
            return _decode_jpegs([data], where)[0].to(device), ""
        except RuntimeError as e:
            err = _decoder_message(e)
    return None, err


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (warned on every call).
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def _decoder_message(e: Exception) -> str:
    # torchvision prefixes the C++ source location ("decode_jpeg, /path/decode_jpeg.cpp:171, ...").
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"^[\w.]+, \S+:\d+, ", "", first)
