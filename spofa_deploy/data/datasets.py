"""Data specs (`digits`, `cifar10[:DIR]`, `cifar100[:DIR]`, `imagefolder:DIR`) and their datasets.

The raw train/val datasets of each kind (untransformed; `data.load_splits` adds the
transforms), the seeded stratified split and subset, and the safe CIFAR unpickler.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from spofa_deploy.data.device_augment import EncodedImage, read_encoded
from spofa_deploy.errors import UserError

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


def read_datasets(spec: DataSpec, *, download: bool = False, seed: int = 0,
                  skip_corrupt: bool = False) -> tuple[Dataset, Dataset, list[str]]:
    """The untransformed (train, val, class names) of a parsed data spec.

    Args:
        spec: what to read.
        download: let torchvision fetch CIFAR where a network exists.
        seed: seed of the image-folder split when it has no val/ folder.
        skip_corrupt: an image folder's unreadable files are skipped (with a warning), not fatal.
    """
    if spec.kind == "digits":
        return _digits()
    if spec.kind.startswith("cifar"):
        return _cifar(spec.kind, spec.root, download)
    return _imagefolder(spec.root, seed, skip_corrupt)


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
