"""Data specs, the digits split, CIFAR files in torchvision's python format, image folders, transforms."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.datasets import DataSpec, FileDataset, parse_data_spec
from spofa_deploy.data.loaders import AugSeeded, build_transforms, make_loader, sample_seed
from spofa_deploy.errors import UserError
from spofa_deploy.models import Preprocessing

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _splits(spec, size=32, **kw):
    return load_splits(spec, Preprocessing(size, MEAN, STD, "bilinear", 0.875), **kw)


def _transform_types(t) -> list[str]:
    return [type(x).__name__ for x in t.transforms]


# ---------------------------------------------------------------- parse_data_spec


def test_parse_spec_kinds(tmp_path, monkeypatch) -> None:
    assert parse_data_spec("digits") == DataSpec("digits", None)
    assert parse_data_spec(" Digits ") == DataSpec("digits", None)
    assert parse_data_spec("cifar10:/data/c10") == DataSpec("cifar10", Path("/data/c10"))
    assert parse_data_spec("cifar100:/data/c100") == DataSpec("cifar100", Path("/data/c100"))
    assert parse_data_spec(f"imagefolder:{tmp_path}") == DataSpec("imagefolder", tmp_path)
    # CIFAR without a folder: $SPOFA_DATA, else the user cache.
    monkeypatch.setenv("SPOFA_DATA", str(tmp_path / "store"))
    assert parse_data_spec("cifar10") == DataSpec("cifar10", tmp_path / "store")
    monkeypatch.delenv("SPOFA_DATA")
    assert parse_data_spec("cifar100").root == Path.home() / ".cache" / "spofa" / "data"
    # `~` expands; str() gives back a spec that parses to the same thing.
    assert parse_data_spec("imagefolder:~/imgs").root == Path.home() / "imgs"
    for s in ("digits", "cifar10:/x/y", f"imagefolder:{tmp_path}"):
        assert parse_data_spec(str(parse_data_spec(s))) == parse_data_spec(s)
    assert parse_data_spec("imagefolder:/a").natural_size == 224
    assert parse_data_spec("digits").natural_size == 32 and not parse_data_spec("digits").flips


@pytest.mark.parametrize("spec, words", [
    ("mnist", "unknown data spec"),
    ("", "unknown data spec"),
    ("cifar", "unknown data spec"),
    ("imagefolder", "needs a folder"),
    ("imagefolder:", "needs a folder"),
    ("digits:/tmp/x", "takes no folder"),
])
def test_parse_spec_bad(spec: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        parse_data_spec(spec)


# ---------------------------------------------------------------- digits


def test_digits_split_fixed_and_stratified() -> None:
    a = _splits("digits")
    b = _splits("digits", seed=123)  # the digits split ignores the seed: one val set for every run
    assert (len(a.train), len(a.val)) == (1438, 359)
    assert a.classes == [str(i) for i in range(10)] and a.num_classes == 10
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    assert a.val.labels.dtype == np.int64
    counts = np.bincount(a.val.labels, minlength=10)
    assert (counts >= 34).all() and (counts <= 37).all(), counts  # 20 % of each class (174..183 images)
    tr_counts = np.bincount(a.train.labels, minlength=10)
    np.testing.assert_allclose(counts / (counts + tr_counts), 0.2, atol=0.005)
    # Train and val are disjoint samples of the 1797 digits.
    from sklearn.datasets import load_digits

    d = load_digits()
    all_imgs = (d.images * (255.0 / 16.0)).round().astype(np.uint8).reshape(len(d.images), -1)
    keys = {r.tobytes() + bytes([int(t)]) for r, t in zip(all_imgs, d.target)}
    assert len(a.train) + len(a.val) == len(d.images)
    x, y = a.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == int(a.val.labels[0])
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated to 3 channels
    assert a.val.images[0].reshape(-1).tobytes() + bytes([y]) in keys


def test_train_fraction_keeps_stratified_subset() -> None:
    full = _splits("digits")
    a = _splits("digits", train_fraction=0.1, seed=3)
    b = _splits("digits", train_fraction=0.1, seed=3)
    c = _splits("digits", train_fraction=0.1, seed=4)
    assert len(a.train) == round(1438 * 0.1) and len(a.val) == 359  # val untouched
    counts = np.bincount(a.train.labels, minlength=10)
    assert counts.min() >= 14 and counts.max() <= 15, counts
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.train.images, c.train.images)
    full_rows = {r.tobytes() for r in full.train.images}
    assert all(r.tobytes() in full_rows for r in a.train.images)  # a subset of the training split
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(UserError, match="train-fraction"):
            _splits("digits", train_fraction=bad)


# ---------------------------------------------------------------- CIFAR (torchvision's python format)

_NUMPY_PY2 = (b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # what the real (numpy 1.x) files name


def _dump(obj, path: Path, protocol: int = 2, py2_numpy: bool = True) -> None:
    data = pickle.dumps(obj, protocol=protocol)
    if protocol == 2 and py2_numpy:
        data = data.replace(*_NUMPY_PY2)
    path.write_bytes(data)


def _rand_images(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path, per_batch: int = 3, n_test: int = 5, seed: int = 0, evil_in: str | None = None,
                   protocol: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, base / "batches.meta", protocol)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = _rand_images(rng, per_batch), [int(v) for v in rng.integers(0, 10, per_batch)]
        train_x.append(x)
        train_y += y
        _dump({"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
               "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}, base / f"data_batch_{i}", protocol)
    tx, ty = _rand_images(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
    _dump({"batch_label": "testing batch 1 of 1", "labels": ty, "data": tx,
           "filenames": [f"test_{j}.png" for j in range(n_test)]}, base / "test_batch", protocol)
    (base / "readme.html").write_text("<html></html>")
    if evil_in:
        (base / evil_in).write_bytes(pickle.dumps(_Evil(root / "PWNED"), protocol=2))
    return {"names": names, "train_x": np.concatenate(train_x), "train_y": np.array(train_y),
            "test_x": tx, "test_y": np.array(ty)}


def _write_cifar100(root: Path, n_train: int = 12, n_test: int = 4, seed: int = 1, bytes_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    fine = [f"fine_{i:03d}" for i in range(100)]
    coarse = [f"coarse_{i:02d}" for i in range(20)]

    def k(d: dict) -> dict:  # a py2 pickle read with encoding="bytes" has bytes keys
        return {key.encode(): v for key, v in d.items()} if bytes_keys else d

    _dump(k({"fine_label_names": fine, "coarse_label_names": coarse}), base / "meta")
    out = {"names": fine}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _rand_images(rng, n)
        y = [int(v) for v in rng.integers(0, 100, n)]
        _dump(k({"filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": f"{split} batch",
                 "fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x}), base / split)
        out[f"{split}_x"], out[f"{split}_y"] = x, np.array(y)
    return out


class _Evil:
    """Pickles to a call of os.system: must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_files(tmp_path: Path, protocol: int) -> None:
    ref = _write_cifar10(tmp_path, protocol=protocol)
    s = _splits(f"cifar10:{tmp_path}")
    assert s.classes == ref["names"] and s.num_classes == 10
    assert s.train.images.shape == (15, 32, 32, 3) and s.train.images.dtype == np.uint8
    assert s.val.images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(s.train.images, _hwc(ref["train_x"]))  # batches 1..5 in order, CHW -> HWC
    np.testing.assert_array_equal(s.train.labels, ref["train_y"])
    np.testing.assert_array_equal(s.val.images, _hwc(ref["test_x"]))
    np.testing.assert_array_equal(s.val.labels, ref["test_y"])
    # Eval transform at the native 32 px: the normalised tensor is exactly the stored pixels.
    x, y = s.val[2]
    assert y == ref["test_y"][2] and x.shape == (3, 32, 32)
    expected = torch.from_numpy(ref["test_x"][2].reshape(3, 32, 32).astype(np.float32) / 255.0)
    torch.testing.assert_close(x, (expected - 0.5) / 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar100_files(tmp_path: Path, bytes_keys: bool) -> None:
    ref = _write_cifar100(tmp_path, bytes_keys=bytes_keys)
    s = _splits(f"cifar100:{tmp_path}")
    assert s.classes == ref["names"] and s.num_classes == 100
    assert s.train.images.shape == (12, 32, 32, 3) and s.val.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(s.train.images, _hwc(ref["train_x"]))
    np.testing.assert_array_equal(s.train.labels, ref["train_y"])  # fine labels, not coarse
    np.testing.assert_array_equal(s.val.labels, ref["test_y"])


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, evil_in="data_batch_3")
    with pytest.raises(UserError, match="data_batch_3") as e:
        _splits(f"cifar10:{tmp_path}")
    assert "system" in str(e.value)  # names the refused global
    assert not (tmp_path / "PWNED").exists()  # and never called it


def test_cifar_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no cifar10 data"):
        _splits(f"cifar10:{tmp_path}")
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(UserError, match="data_batch_4"):
        _splits(f"cifar10:{tmp_path}")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"\x80\x02}q\x00")  # truncated pickle
    with pytest.raises(UserError, match="data_batch_4"):
        _splits(f"cifar10:{tmp_path}")


def test_cifar_wrong_layout_is_a_user_error(tmp_path: Path) -> None:
    """A readable pickle that is not a CIFAR batch (bad data size, missing labels) is refused clearly."""
    _write_cifar10(tmp_path)
    base = tmp_path / "cifar-10-batches-py"
    _dump({"batch_label": "x", "labels": [1, 2], "data": np.zeros((2, 100), np.uint8)}, base / "data_batch_2")
    with pytest.raises(UserError, match="data_batch_2"):
        _splits(f"cifar10:{tmp_path}")
    _dump({"batch_label": "x", "data": np.zeros((2, 3072), np.uint8)}, base / "data_batch_2")
    with pytest.raises(UserError, match="data_batch_2"):
        _splits(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- image folders


def _png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3), value, np.uint8)
    Image.fromarray(arr).save(path)


# Created in this (unsorted) order; labels must follow the sorted order.
CLASSES = ["zebra", "Ant", "cat"]


def _tree(root: Path, per_class: int = 10, val: dict[str, int] | None = None) -> None:
    for c in CLASSES:
        for i in range(per_class):
            _png(root / "train" / c / f"{i:02d}.png", 10 * CLASSES.index(c) + i)
    for c, n in (val or {}).items():
        for i in range(n):
            _png(root / "val" / c / f"v{i}.png", 100 + i)


def test_imagefolder_without_val_seeded_split(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    a = _splits(f"imagefolder:{tmp_path}", seed=0)
    b = _splits(f"imagefolder:{tmp_path}", seed=0)
    c = _splits(f"imagefolder:{tmp_path}", seed=1)
    assert a.classes == sorted(CLASSES) == ["Ant", "cat", "zebra"]
    assert (len(a.train), len(a.val)) == (24, 6)
    assert np.bincount(a.val.labels).tolist() == [2, 2, 2]
    assert a.train.paths == b.train.paths and a.val.paths == b.val.paths
    assert a.val.paths != c.val.paths
    everything = {p for p in (tmp_path / "train").rglob("*.png")}
    assert set(a.train.paths).isdisjoint(a.val.paths) and set(a.train.paths) | set(a.val.paths) == everything
    for p, y in zip(a.train.paths + a.val.paths, list(a.train.labels) + list(a.val.labels)):
        assert a.classes[y] == p.parent.name
    x, y = a.val[0]
    assert x.shape == (3, 32, 32) and a.classes[y] == a.val.paths[0].parent.name


def test_imagefolder_with_val(tmp_path: Path) -> None:
    _tree(tmp_path, per_class=4, val={"zebra": 2, "Ant": 1})  # val/ lacks 'cat'
    s = _splits(f"imagefolder:{tmp_path}")
    assert s.classes == ["Ant", "cat", "zebra"]
    assert len(s.train) == 12 and len(s.val) == 3  # all of train/ trains, val/ validates
    # val labels index the train class list: Ant -> 0, zebra -> 2
    assert sorted((p.parent.name, int(y)) for p, y in zip(s.val.paths, s.val.labels)) == [
        ("Ant", 0), ("zebra", 2), ("zebra", 2)]
    _png(tmp_path / "val" / "lion" / "x.png", 3)
    with pytest.raises(UserError, match="lion"):
        _splits(f"imagefolder:{tmp_path}")


def test_imagefolder_bad_trees(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        _splits(f"imagefolder:{tmp_path / 'nope'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="train/"):
        _splits(f"imagefolder:{empty}")
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        _splits(f"imagefolder:{empty}")
    one = tmp_path / "one"
    for i in range(5):
        _png(one / "train" / "only" / f"{i}.png", i)
    with pytest.raises(UserError, match="at least 2"):
        _splits(f"imagefolder:{one}")


def _tree_with_broken(root: Path) -> Path:
    _tree(root, per_class=3, val={"Ant": 2, "cat": 2})
    bad = root / "val" / "Ant" / "broken.png"
    good = (root / "val" / "Ant" / "v0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated PNG
    return bad


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = _tree_with_broken(tmp_path)
    s = _splits(f"imagefolder:{tmp_path}")
    i = s.val.paths.index(bad)
    with pytest.raises(UserError, match="broken.png") as e:
        s.val[i]
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "val" / "cat" / "v1.png").write_bytes(b"garbage, not an image")
    with pytest.raises(UserError, match="v1.png"):
        s.val[s.val.paths.index(tmp_path / "val" / "cat" / "v1.png")]


def test_corrupt_image_skipped_and_counted(tmp_path: Path) -> None:
    bad = _tree_with_broken(tmp_path)
    s = _splits(f"imagefolder:{tmp_path}", skip_corrupt=True)
    assert isinstance(s.val, FileDataset)
    out = [s.val[i] for i in range(len(s.val))]
    assert all(x.shape == (3, 32, 32) for x, _ in out)
    i = s.val.paths.index(bad)
    nxt = (i + 1) % len(s.val)
    assert out[i][1] == out[nxt][1] and torch.equal(out[i][0], out[nxt][0])  # replaced by the next readable one
    assert s.val.corrupt == {str(bad)}
    s.val[i]
    assert len(s.val.corrupt) == 1  # counted once per file


def test_corrupt_image_through_loader_worker_is_one_line(tmp_path: Path) -> None:
    """With loader workers the error still reads as one line naming the file (no worker traceback)."""
    bad = _tree_with_broken(tmp_path)
    s = _splits(f"imagefolder:{tmp_path}")
    with pytest.raises(UserError) as e:
        for _ in make_loader(s.val, batch_size=8, train=False, workers=1):
            pass
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and "Traceback" not in msg, msg


# ---------------------------------------------------------------- transforms


def test_transforms_suit_the_resolution() -> None:
    big = _transform_types(build_transforms(Preprocessing(64, MEAN, STD, "bicubic", 0.9), train=True))
    assert big[0] == "RandomResizedCrop" and "RandomHorizontalFlip" in big
    assert "RandomResizedCrop" not in _transform_types(build_transforms(Preprocessing(63, MEAN, STD), train=True))
    small = _transform_types(build_transforms(Preprocessing(32, MEAN, STD), train=True))
    assert "RandomResizedCrop" not in small and "RandomCrop" in small and "RandomHorizontalFlip" in small
    assert "RandomHorizontalFlip" not in _transform_types(build_transforms(Preprocessing(32, MEAN, STD), train=True, flips=False))
    ev = build_transforms(Preprocessing(224, MEAN, STD, "bicubic", 0.875), train=False)
    assert _transform_types(ev)[:2] == ["Resize", "CenterCrop"]
    assert ev.transforms[0].size == 256 and ev.transforms[1].size == (224, 224)
    assert str(ev.transforms[0].interpolation.value) == "bicubic"
    assert not any(n.startswith("Random") for n in _transform_types(build_transforms(Preprocessing(32, MEAN, STD), train=False)))
    norm = ev.transforms[-1]
    assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD


def test_load_splits_transforms() -> None:
    s = load_splits("digits", Preprocessing(64, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), "bilinear", 0.875))
    assert "RandomResizedCrop" in _transform_types(s.train.transform)
    assert "RandomHorizontalFlip" not in _transform_types(s.train.transform)  # a mirrored digit is another symbol
    assert "RandomResizedCrop" not in _transform_types(s.val.transform)
    x, _ = s.train[0]
    assert x.shape == (3, 64, 64)
    s = _splits("digits", size=32, train_aug=False)  # calibration: eval transform on the train split
    assert not any(n.startswith("Random") for n in _transform_types(s.train.transform))
    assert torch.equal(s.train[5][0], s.train[5][0])


# ---------------------------------------------------------------- seeded augmentation (AugSeeded)


def _global_rng() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))


def _textured_folder(root: Path) -> str:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 1)):
        for c in ("a", "b"):
            for i in range(n):
                path = root / split / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return f"imagefolder:{root}"


@pytest.mark.parametrize("kind, size", [("digits", 32), ("imagefolder", 64)])  # pad-and-crop; random-resized-crop
def test_loading_a_sample_leaves_the_global_rng_alone(kind: str, size: int, tmp_path: Path) -> None:
    """Issue 17: with zero workers, samples load in the training process; they must not reseed its RNGs."""
    spec = "digits" if kind == "digits" else _textured_folder(tmp_path)
    train = _splits(spec, size=size).train
    ds = AugSeeded(train, seed=3)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    before = _global_rng()
    x = ds[(4, 2)][0]
    assert _same_rng(before, _global_rng())
    for _ in make_loader(ds, 4, train=True, workers=0, sampler=[(i, 0) for i in range(9)]):
        pass
    assert _same_rng(before, _global_rng())
    assert torch.equal(x, ds[(4, 2)][0])  # the same (seed, epoch, sample): the same tensor
    assert not torch.equal(x, ds[(4, 3)][0]) and not torch.equal(x, AugSeeded(train, seed=4)[(4, 2)][0])
    # The same images as seeding torch's global generator (the runs checkpointed before this fix).
    torch.manual_seed(sample_seed(3, 2, 4))
    assert torch.equal(x, train[4][0])
