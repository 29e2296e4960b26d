"""Decoding and augmenting training images on a device (`load_splits(..., decode_device=...)`).

The device path runs here with device "cpu" (torchvision's decoder in the main process):
the same code as on CUDA but for the decoder (nvJPEG there). It must draw exactly the
CPU path's crops and flips for each (seed, epoch, sample), give nearly the same pixels
(only the resize kernel differs: PIL's vs torch's antialiased one), and follow the
--skip-corrupt policy.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.device_augment import DeviceAugment, EncodedSample, read_encoded
from spofa_deploy.data.loaders import AugSeeded, make_loader
from spofa_deploy.errors import UserError
from spofa_deploy.models import Preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 64
SEED = 11


def _texture(rng, h: int, w: int) -> np.ndarray:
    """A smooth random picture with grain: JPEG-typical content, and no two crops alike."""
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(int)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/{a,b}: textured RGB JPEGs of varied sizes, plus a PNG, a grayscale and a CMYK JPEG; a val/ folder."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(7):
            h, w = (int(v) for v in rng.integers(72, 160, 2))
            _save(Image.fromarray(_texture(rng, h, w)), root / "train" / c / f"{i}.jpg", quality=90)
        _save(Image.fromarray(_texture(rng, 80, 100)), root / "val" / c / "v.jpg", quality=90)
    _save(Image.fromarray(_texture(rng, 90, 120)), root / "train" / "a" / "png.png")
    _save(Image.fromarray(_texture(rng, 100, 90)[..., 0]), root / "train" / "b" / "gray.jpg", quality=90)
    _save(Image.fromarray(_texture(rng, 110, 96)).convert("CMYK"), root / "train" / "b" / "cmyk.jpg", quality=90)
    return root


def _splits(root: Path, decode_device: str | None = None, interpolation: str = "bilinear", **kw):
    return load_splits(f"imagefolder:{root}", Preprocessing(SIZE, MEAN, STD, interpolation), seed=0, decode_device=decode_device, **kw)


def _epochs(ds, epochs=(0, 1, 2)) -> list[tuple[int, int]]:
    return [(k, e) for e in epochs for k in range(len(ds))]


def _batches(ds, sampler, workers: int = 0, batch: int = 6):  # 17 samples an epoch: no last batch of one to drop
    loader = make_loader(AugSeeded(ds, SEED), batch, train=True, workers=workers, sampler=sampler)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys), loader


def _levels(d: torch.Tensor) -> torch.Tensor:
    """A difference of normalised images in uint8 levels (x = (v / 255 - mean) / std)."""
    return d * torch.tensor(STD).view(1, 3, 1, 1) * 255


def _global_rng() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _same_rng(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))


# ---------------------------------------------------------------- (a) the same draws as the CPU path


def test_crop_and_flip_draws_equal_the_cpu_path(folder: Path, monkeypatch) -> None:
    """For every (seed, epoch, sample) the device path draws the crop box and flip the torchvision transform applies."""
    from torchvision.transforms import functional as F

    cpu, dev = _splits(folder), _splits(folder, "cpu")
    assert cpu.train.paths == dev.train.paths and isinstance(dev.train.transform, DeviceAugment)
    applied: list = []
    real_crop, real_flip = F.resized_crop, F.hflip
    monkeypatch.setattr(F, "resized_crop", lambda img, i, j, h, w, *a, **k: applied.append([(i, j, h, w), False])
                        or real_crop(img, i, j, h, w, *a, **k))
    monkeypatch.setattr(F, "hflip", lambda img: applied[-1].__setitem__(1, True) or real_flip(img))
    cpu_aug, dev_aug = AugSeeded(cpu.train, SEED), AugSeeded(dev.train, SEED)
    drawn = []
    for item in _epochs(cpu.train):
        cpu_aug[item]
        sample, _ = dev_aug[item]
        assert isinstance(sample, EncodedSample)
        drawn.append([sample.box, sample.flip])
    monkeypatch.undo()
    assert drawn == applied
    flips = [f for _, f in drawn]
    assert 0 < sum(flips) < len(flips)  # both outcomes occur: the comparison covers both
    assert len({b for b, _ in drawn}) == len(drawn)  # and the crops vary


# ---------------------------------------------------------------- (b) the same pixels, up to the resize kernel


@pytest.mark.parametrize("interpolation, max_levels", [("bilinear", 1), ("bicubic", 5)])
def test_device_batches_match_the_pil_path(folder: Path, interpolation: str, max_levels: int) -> None:
    """Decoded with the same libjpeg-turbo here, the two paths differ only in resampling.

    Both resize with the same antialiased filter (torch's is a port of PIL's), but PIL works in
    fixed point, torch in float; each output is rounded to uint8 on both paths. Measured here
    (torchvision 0.29, 8 seeds x 3 epochs x 17 images, 64 px): bilinear max 1 level, mean 0.18,
    per-channel batch mean 0.02 level, std 0.006 %; bicubic (whose overshoot is clamped) max 4,
    mean 0.20, 0.003 level, 0.006 %. The tolerances: per pixel 1 (bilinear) and 5 (bicubic); on
    average 0.3 level; per-channel batch mean within 0.1 level and std within 0.2 % (a wrong crop,
    flip or normalisation moves these by levels to tens of levels).
    """
    cpu, dev = _splits(folder, interpolation=interpolation), _splits(folder, "cpu", interpolation)
    sampler = _epochs(cpu.train)
    xa, ya, _ = _batches(cpu.train, sampler)
    xb, yb, _ = _batches(dev.train, sampler)
    assert xb.shape == xa.shape == (len(sampler), 3, SIZE, SIZE) and xb.dtype == xa.dtype == torch.float32
    assert torch.equal(ya, yb)
    d = _levels(xa - xb).abs()
    assert d.max() <= max_levels + 1e-3, d.max()
    assert d.mean() <= 0.3, d.mean()
    mean_a, mean_b = _levels(xa).mean((0, 2, 3)), _levels(xb).mean((0, 2, 3))
    torch.testing.assert_close(mean_b, mean_a, rtol=0, atol=0.1)
    torch.testing.assert_close(xb.std((0, 2, 3)), xa.std((0, 2, 3)), rtol=2e-3, atol=0)


def test_worker_processes_give_the_same_batches(folder: Path) -> None:
    """Through a loader worker (bytes in shared memory, pickled parameters) the batches are the in-process ones."""
    dev = _splits(folder, "cpu")
    sampler = _epochs(dev.train, (0,))
    x0, y0, _ = _batches(dev.train, sampler, workers=0)
    x1, y1, _ = _batches(dev.train, sampler, workers=1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_other_formats_decode_in_the_worker_as_on_the_cpu_path(folder: Path) -> None:
    """PNG, grayscale and CMYK JPEG come as PIL's RGB pixels; RGB JPEGs as their file bytes."""
    for name in ("a/png.png", "b/gray.jpg", "b/cmyk.jpg"):
        path = folder / "train" / name
        enc = read_encoded(path)
        with Image.open(path) as im:
            ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert isinstance(enc.data, torch.Tensor) and torch.equal(enc.data, ref), name
        assert (enc.height, enc.width) == tuple(ref.shape[1:])
    enc = read_encoded(folder / "train" / "a" / "0.jpg")
    assert enc.data == (folder / "train" / "a" / "0.jpg").read_bytes()


# ---------------------------------------------------------------- (c) flip probability and normalisation


def test_flip_probability_and_normalisation_are_the_transforms(folder: Path) -> None:
    from torchvision import transforms as T

    cpu, dev = _splits(folder), _splits(folder, "cpu")
    parts = {type(t): t for t in cpu.train.transform.transforms}
    aug = dev.train.transform
    assert aug.flip_p == parts[T.RandomHorizontalFlip].p == 0.5
    norm = parts[T.Normalize]
    assert (aug.mean, aug.std) == (list(MEAN), list(STD)) == (list(norm.mean), list(norm.std))
    assert repr(aug) == f"DeviceAugment(decode=cpu, {cpu.train.transform!r})"  # a stable key for caches
    crop = parts[T.RandomResizedCrop]
    assert (aug.crop.size, aug.crop.scale, aug.crop.ratio, aug.crop.interpolation, aug.crop.antialias) == (
        crop.size, crop.scale, crop.ratio, crop.interpolation, crop.antialias)
    # A flat colour comes out as ((v / 255) - mean) / std on both paths.
    flat = folder.parent / "flat"
    for split in ("train", "val"):
        for c in ("a", "b"):
            _save(Image.new("RGB", (90, 70), (200, 100, 30)), flat / split / c / "x.png")
    want = ((torch.tensor([200, 100, 30]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for decode in (None, "cpu"):
        x, _, _ = _batches(_splits(flat, decode).train, [(0, 0), (1, 0)], batch=2)
        torch.testing.assert_close(x, want.expand_as(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (d) corrupt files: the --skip-corrupt policy


def _with_truncated(root: Path) -> Path:
    good = (root / "train" / "a" / "1.jpg").read_bytes()
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(good[: len(good) // 2])  # the header parses; the pixels are cut short
    return bad


def test_truncated_jpeg_fails_in_one_line(folder: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    bad = _with_truncated(root)
    dev = _splits(root, "cpu")
    with pytest.raises(UserError) as e:
        _batches(dev.train, _epochs(dev.train, (0,)))
    msg = str(e.value)
    assert str(bad) in msg and "--skip-corrupt" in msg and "\n" not in msg and ".cpp" not in msg, msg


def test_truncated_jpeg_skipped_takes_the_next_sample(folder: Path, tmp_path: Path, caplog) -> None:
    import shutil

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    bad = _with_truncated(root)
    dev = _splits(root, "cpu", skip_corrupt=True)
    k = dev.train.paths.index(bad)
    sampler = [(i, 0) for i in range(len(dev.train))]
    with caplog.at_level(logging.WARNING):
        x, y, loader = _batches(dev.train, sampler, batch=len(sampler))
    assert x.shape[0] == len(sampler)  # the batch keeps its size
    assert torch.equal(x[k], x[k + 1]) and y[k] == y[k + 1]  # replaced by the next readable sample
    assert loader.corrupt == dev.train.corrupt == {str(bad)} and str(bad) in caplog.text  # where distill reports them
    clean, _, _ = _batches(_splits(folder, "cpu").train, sampler, batch=len(sampler))
    keep = [i for i in range(len(sampler)) if i != k]
    assert torch.equal(x[keep], clean[keep])  # the other samples are untouched


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_cpu(folder: Path, monkeypatch) -> None:
    """nvJPEG lacks some JPEG flavours: such a file is decoded by libjpeg-turbo instead, not taken as corrupt.

    The refusal is simulated (the batch call and the file's own call on the device fail once each).
    """
    from spofa_deploy.data import device_augment
    dev = _splits(folder, "cpu")
    sampler = [(i, 0) for i in range(len(dev.train))]
    want, _, _ = _batches(dev.train, sampler, batch=len(sampler))
    refused = torch.from_numpy(np.frombuffer(dev.train.paths[3].read_bytes(), np.uint8).copy())
    real, refusals = device_augment._decode_jpegs, [2]

    def decode(files, device):
        if refusals[0] and any(torch.equal(f, refused) for f in files):
            refusals[0] -= 1
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(files, device)

    monkeypatch.setattr(device_augment, "_decode_jpegs", decode)
    x, _, loader = _batches(dev.train, sampler, batch=len(sampler))
    assert refusals == [0] and not loader.corrupt and torch.equal(x, want)


def test_unreadable_file_follows_the_file_policy(folder: Path, tmp_path: Path) -> None:
    """A file that is no image at all fails in the worker already, as on the CPU path."""
    import shutil

    root = tmp_path / "d"
    shutil.copytree(folder, root)
    bad = root / "train" / "b" / "2.jpg"
    bad.write_bytes(b"not a jpeg")
    sampler = _epochs(_splits(root, "cpu").train, (0,))
    with pytest.raises(UserError, match="2.jpg"):
        _batches(_splits(root, "cpu").train, sampler)
    x, _, _ = _batches(_splits(root, "cpu", skip_corrupt=True).train, sampler)
    assert x.shape[0] == len(sampler)


# ---------------------------------------------------------------- exact resume, and no global RNG side effects


def test_same_sample_same_tensor_and_global_rng_untouched(folder: Path) -> None:
    dev = _splits(folder, "cpu")
    sampler = _epochs(dev.train, (3,))
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    before = _global_rng()
    a, _, _ = _batches(dev.train, sampler)
    b, _, _ = _batches(dev.train, list(reversed(sampler)))  # another order and batching: same images
    assert _same_rng(before, _global_rng())
    assert torch.equal(a, b.flip(0))
    c, _, _ = _batches(dev.train, _epochs(dev.train, (4,)))
    assert not torch.equal(a, c)  # another epoch, other crops


# ---------------------------------------------------------------- where it does not apply


def test_device_decode_refused_where_it_cannot_work(folder: Path) -> None:
    with pytest.raises(UserError, match="imagefolder"):
        load_splits("digits", Preprocessing(SIZE, MEAN, STD), decode_device="cpu")
    with pytest.raises(UserError, match="img-size"):
        load_splits(f"imagefolder:{folder}", Preprocessing(32, MEAN, STD), decode_device="cpu")
    with pytest.raises(UserError, match="decode device"):
        _splits(folder, "tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            _splits(folder, "cuda")
    # The eval transform (e.g. calibration on the train split) stays on the PIL path.
    assert not _splits(folder, "cpu", train_aug=False).train.encoded


# ---------------------------------------------------------------- nvJPEG


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
def test_nvjpeg_batches_match_the_cpu_decoder(folder: Path) -> None:
    """On CUDA: the same crops, images on the GPU, close to the CPU decoder's.

    nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, so the bound is looser
    than the resize-only one above: mean 1 level, per-channel batch mean 0.5 level.
    """
    dev, gpu = _splits(folder, "cpu"), _splits(folder, "cuda")
    sampler = _epochs(dev.train, (0, 1))
    xc, yc, _ = _batches(dev.train, sampler)
    xg, yg, _ = _batches(gpu.train, sampler)
    assert xg.device.type == "cuda" and torch.equal(yc, yg.cpu())
    d = _levels(xc - xg.cpu()).abs()
    assert d.mean() <= 1.0, d.mean()
    torch.testing.assert_close(_levels(xg.cpu()).mean((0, 2, 3)), _levels(xc).mean((0, 2, 3)), rtol=0, atol=0.5)
