"""Decoding and augmenting training images on a device (`DeviceAugment`).

With `load_splits(..., decode_device="cuda")` the loader workers only read each image file's
bytes (`read_encoded`) and draw its crop and flip; the batch crosses to the main process as
one `EncodedBatch`, where its JPEGs are decoded at once (nvJPEG on CUDA) and cropped, resized,
flipped and normalised there. Same draws as the CPU path (`loaders.build_transforms`).
"""
from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spofa_deploy.errors import UserError

_log = logging.getLogger(__name__)


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
