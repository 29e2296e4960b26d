"""Teacher-output cache: the teacher's logits of each (epoch, training sample), stored once, read back.

Augmentation is seeded per (seed, epoch, sample index) (`train.AugSeeded`), so the teacher's
logits for a training image are a pure function of (teacher weights, data + split, input size,
preprocessing, seed, epoch, index) and of how the teacher computes (device, AMP, batch). A
`CacheKey` names all of these; `fingerprint()` hashes them with the record format, and a cache
only ever reads records carrying its own full fingerprint, so outputs of another teacher, data,
size or seed are never reused: they live in another folder and are simply another key.

Layout::

    DIR/<fingerprint[:16]>/manifest.json     every key part in clear (for people and miss notes)
    DIR/<fingerprint[:16]>/epoch-0003.bin    one record per epoch

A record is `MAGIC | u32 header length | header JSON | payload`. The header names the version,
fingerprint, epoch, samples, classes, format, k, payload size and the payload's sha256, so a
truncated, corrupt or foreign file is detected on read, ignored (a miss, with one note) and
rewritten. The payload holds a per-sample "present" mask (uint8) and one array per field:

    fp32  logits float32 (N, C)           exact: get() returns bitwise what put() received
    fp16  logits float16 (N, C)           error: fp16 rounding (relative 2**-11)
    topk  logp float16 (N, k), index int16/int32 (N, k), lse float32 (N,), log_rest float32 (N, temperatures)

Writes go through `artifacts.atomic_path` (temp file, fsync, rename), so readers see a whole
old file or a whole new one; two writers of the same epoch write the same bytes and the last
rename wins. A cache that cannot be written (read-only or missing folder, full disk, its
`max_gb` bound reached) stops writing and says so once through `pop_warnings()`; the run goes
on without it. Nothing here prints: the caller prints `note` and the warnings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Sequence

import numpy as np
import torch

from .artifacts import atomic_path, read_json, write_json
from .errors import UserError

__all__ = ["CacheKey", "RecordFormat", "TeacherCache", "default_format", "fingerprint", "split_digest",
           "weights_digest", "DEFAULT_TOPK", "FULL_LOGITS_MAX_CLASSES", "FORMATS", "TAIL_TEMPERATURES"]

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
# The tail's log-mass (per unit of temperature) is clamped here: exp(-60) is far below anything a
# loss can see, and a finite value keeps `kl_div(log_target=True)` free of 0 * inf = NaN.
LOG_REST_MIN = -60.0
MAGIC = b"SPOFATC\x01"
VERSION = 1
MANIFEST = "manifest.json"
STALE_TMP_S = 3600.0  # temp files older than this were left by a killed writer
_FOLDER_HEX = 16


# ---------------------------------------------------------------------------------------------------------------------
# The key


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


# ---------------------------------------------------------------------------------------------------------------------
# Record codecs


class _Codec:
    """Encodes (B, C) float32 logits into per-sample field arrays, and decodes them for a loss at `temperature`."""

    def __init__(self, record: RecordFormat, temperature: float = 1.0):
        self.record, self.temperature = record, temperature
        c, k = record.num_classes, record.k or 0
        self.fields: dict[str, tuple[np.dtype, int]] = {
            "fp32": {"logits": (np.dtype(np.float32), c)},
            "fp16": {"logits": (np.dtype(np.float16), c)},
            "topk": {"logp": (np.dtype(np.float16), k),
                     "index": (np.dtype(np.int16 if c <= np.iinfo(np.int16).max else np.int32), k),
                     "lse": (np.dtype(np.float32), 1),
                     "log_rest": (np.dtype(np.float32), len(record.tail_temperatures))},
        }[record.fmt]

    def bytes_per_sample(self) -> int:
        return 1 + sum(dt.itemsize * width for dt, width in self.fields.values())  # 1: the present mask

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """(B, C) float32 CPU logits -> {field: (B, width) array}."""
        if self.record.fmt != "topk":
            with np.errstate(over="ignore"):  # fp16 overflow is detected by `put`
                return {"logits": logits.numpy().astype(self.fields["logits"][0])}
        return self._encode_topk(logits)

    def decode(self, rows: Mapping[str, np.ndarray]) -> torch.Tensor:
        """{field: (B, width) array} -> (B, C) float32 logits."""
        if self.record.fmt != "topk":
            return torch.from_numpy(np.ascontiguousarray(rows["logits"], dtype=np.float32))
        return self._decode_topk(rows)

    def _encode_topk(self, t: torch.Tensor) -> dict[str, np.ndarray]:
        """Top-k of the teacher's distribution, its normaliser, and the exact tail mass at each temperature.

        With S the k most likely classes we store, per sample: log p_i = t_i - lse(t) for i in S
        (fp16: the top classes sit near 0, where fp16 is finest), lse(t) (fp32), and for each
        temperature T, R_T = T * logsumexp_{j not in S}(log p_j / T) (fp32, from the full fp32
        row; at T = 1 it is log r, r = sum_{j not in S} p_j, without the catastrophic
        cancellation of 1 - sum of rounded top-k probabilities).
        """
        lse = torch.logsumexp(t, dim=-1, keepdim=True)
        logp = t - lse
        vals, idx = logp.topk(self.record.k, dim=-1)
        tail = logp.scatter(-1, idx, float("-inf"))
        rest = torch.cat([(T * torch.logsumexp(tail / T, dim=-1, keepdim=True)).clamp_min(LOG_REST_MIN * T)
                          for T in self.record.tail_temperatures], dim=-1)
        return {"logp": vals.numpy().astype(np.float16), "index": idx.numpy().astype(self.fields["index"][0]),
                "lse": lse.numpy(), "log_rest": rest.numpy()}

    def _decode_topk(self, rows: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Full logits whose softmax at `temperature` keeps the top-k and the teacher's own tail mass.

        t_hat_i = lse + log p_i on S, and on each of the C - k other classes one value f with
        (C - k) * exp(f / T) = sum_{j not in S} exp(log p_j / T), i.e. f = R_T - T log(C - k).
        Then softmax(t_hat / T) gives the top-k classes exactly the teacher's relative weights
        and the tail exactly its mass, spread evenly (the flat spread is the least-error guess
        when which tail class gets what is unknown). At T = 1 this is p on S and r / (C - k)
        elsewhere. Adding back lse keeps t_hat_i = t_i on S, so raw-logit diagnostics (the
        stage-alignment cosine) stay close. The tail is matched at one temperature only: a
        flat tail of the same mass at T = 1 weighs more at T = 4 (the flat spread maximises
        sum_j p_j^(1/T)), which is why records keep R_T for KD's T as well as for tau = 1.
        `benchmarks/teacher_cache_topk.py` measures what is left, to choose k.
        """
        c, k, T = self.record.num_classes, self.record.k, self.temperature
        col = self.record.tail_temperatures.index(T)
        logp = torch.from_numpy(rows["logp"].astype(np.float32))
        idx = torch.from_numpy(rows["index"].astype(np.int64))
        lse = torch.from_numpy(np.ascontiguousarray(rows["lse"], dtype=np.float32))
        rest = torch.from_numpy(np.ascontiguousarray(rows["log_rest"][:, col:col + 1], dtype=np.float32))
        fill = rest - T * math.log(c - k)
        return fill.expand(-1, c).clone().scatter_(-1, idx, logp) + lse


# ---------------------------------------------------------------------------------------------------------------------
# One epoch's records in memory


class _Epoch:
    """An epoch's arrays (n rows each) and which samples they hold; `fields is None`: nothing cached."""

    def __init__(self, epoch: int, mask: np.ndarray | None = None, fields: dict[str, np.ndarray] | None = None):
        self.epoch, self.mask, self.fields, self.dirty = epoch, mask, fields, False

    @classmethod
    def empty(cls, epoch: int, n: int, codec: _Codec) -> "_Epoch":
        return cls(epoch, np.zeros(n, np.uint8), {f: np.zeros((n, w), dt) for f, (dt, w) in codec.fields.items()})

    def has(self, idx: np.ndarray) -> bool:
        return self.mask is not None and bool(self.mask[idx].all())


class CorruptRecord(Exception):
    """An epoch file that is truncated, damaged or not ours (the reason is the message)."""


# ---------------------------------------------------------------------------------------------------------------------
# The cache


class TeacherCache:
    """Teacher logits per (epoch, sample index) in `DIR/<fingerprint>/`; see the module docstring.

    Use per batch: `t = cache.get(epoch, idx)`; when it is None run the teacher and train on
    `t = cache.put(epoch, idx, teacher(x))`; at the end of the epoch `cache.commit(epoch)`.
    `put` returns what `get` will return later (the logits after the record's rounding), so a run
    trains on the same targets whether its cache was cold, warm or could not be written.
    One epoch is held in memory at a time: commit it before moving to the next.
    """

    def __init__(self, root: Path, key: CacheKey, codec: _Codec, fp: str, max_bytes: int | None):
        self.root, self.key, self.codec, self.fingerprint, self.max_bytes = root, key, codec, fp, max_bytes
        self.folder = root / fp[:_FOLDER_HEX]
        self.writing = True
        self.note = ""
        self._warnings: list[str] = []
        self._current: _Epoch | None = None
        self._used = 0
        self._passthrough = False  # fp16 overflowed: put() hands back the exact logits
        self._tail = [0.0, 0]  # top-k: summed teacher mass outside the top k (at T = 1), samples

    # ---- opening

    @classmethod
    def open(cls, root: str | Path, key: CacheKey, *, num_classes: int, fmt: str | None = None, k: int | None = None,
             temperature: float = 1.0, max_gb: float | None = None) -> "TeacherCache":
        """Open (creating where possible) the cache of `key` under `root`. Never fails on I/O.

        Args:
            root: the cache folder DIR; one subfolder per fingerprint.
            key: what the logits depend on.
            num_classes: teacher classes.
            fmt: "fp32" (exact), "fp16" or "topk"; None: `default_format(num_classes, temperature)`.
            k: classes kept by "topk" (default `DEFAULT_TOPK`); must be below `num_classes`.
            temperature: the softmax temperature the loss applies to these logits (KD's T, OFA's
                tau); top-k records keep the tail mass exact at it. Full formats ignore it.
            max_gb: bound on the whole of `root`; epochs that would pass it are not written.

        Raises:
            UserError: a format, k, temperature or bound that cannot work.
        """
        record = RecordFormat.make(num_classes, fmt, k, temperature)
        if max_gb is not None and not max_gb > 0:
            raise UserError(f"--teacher-cache-max-gb must be positive, got {max_gb}")
        if key.num_samples < 1:
            raise UserError("the teacher cache needs a non-empty training split")
        cache = cls(Path(root), key, _Codec(record, float(temperature)), fingerprint(key, record),
                    None if max_gb is None else int(max_gb * 1e9))
        cache._prepare()
        return cache

    def _prepare(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
        except (OSError, UserError) as e:
            self._stop(f"teacher cache {self.root} is not writable ({_reason(e)}): the run goes on without writing it")
        self._remove_stale_temps()
        self._used = _tree_bytes(self.root)
        if self.writing and self.max_bytes is not None and self._used >= self.max_bytes:
            self._stop(f"teacher cache {self.root} already holds {_human(self._used)}, its bound is "
                       f"{_human(self.max_bytes)}: no new epochs are written")
        self.note = self._open_note()

    def _write_manifest(self) -> None:
        path = self.folder / MANIFEST
        if path.is_file():
            try:
                saved = read_json(path).get("fingerprint")
            except UserError:
                saved = None  # damaged: rewritten below
            if saved == self.fingerprint:
                return
            if saved is not None:  # a 64-bit prefix collision or a hand-edited folder: never share it
                raise UserError(f"{self.folder} belongs to another key")
        write_json(path, {"fingerprint": self.fingerprint, "format_version": VERSION, "key": self.key.to_dict(),
                          "record": self.codec.record.to_dict(),
                          "bytes_per_epoch": self.epoch_bytes(), "torch": torch.__version__,
                          "created": datetime.now().isoformat(timespec="seconds")})

    def _remove_stale_temps(self) -> None:
        # A SIGKILLed writer leaves its `.epoch-*.tmp`; a live writer's temp is seconds old, never an hour.
        now = time.time()
        for tmp in self.folder.glob(".epoch-*.tmp") if self.folder.is_dir() else ():
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass

    def _open_note(self) -> str:
        cached = self.cached_epochs()
        if cached:
            return f"teacher cache: {len(cached)} epoch(s) of teacher outputs in {self.folder}"
        diff = self._closest_foreign()
        if diff:
            return (f"teacher cache miss: {self.root} holds outputs of another {diff}, never reused; "
                    f"{'writing' if self.writing else 'not writing'} {self.folder.name}")
        return f"teacher cache: empty, {'writing' if self.writing else 'not writing'} {self.folder}"

    def _closest_foreign(self) -> str:
        """The key parts in which the closest other cache under `root` differs, as a short phrase."""
        mine = {**self.key.to_dict(), **self.codec.record.to_dict()}
        best: list[str] | None = None
        for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
            if manifest.parent == self.folder:
                continue
            try:
                other = read_json(manifest)
                theirs = {**other["key"], **other["record"]}
            except (UserError, KeyError, TypeError):
                continue
            diff = [_describe_diff(name, theirs.get(name), value) for name, value in mine.items() if theirs.get(name) != value]
            if diff and (best is None or len(diff) < len(best)):
                best = diff
        return ", ".join(best) if best else ""

    # ---- sizes

    def epoch_bytes(self) -> int:
        """Bytes of one epoch file (header included)."""
        return len(self._header(0, "0" * 64)) + self.key.num_samples * self.codec.bytes_per_sample()

    def size_estimate_bytes(self, epochs: int) -> int:
        """Disk space `epochs` epochs of records take (to show before writing)."""
        return epochs * self.epoch_bytes()

    def describe(self, epochs: int) -> str:
        """One line for the user: format, epochs on disk, size for `epochs` epochs, the bound."""
        r = self.codec.record
        what = {"fp32": "exact fp32 logits", "fp16": "fp16 logits",
                "topk": f"top-{r.k} of {r.num_classes} classes (fp16) + tail mass"}[r.fmt]
        bound = f", bound {_human(self.max_bytes)} ({_human(self._used)} used)" if self.max_bytes is not None else ""
        tail = f", mean tail mass {100 * self.tail_mass:.2g}%" if self.tail_mass is not None else ""
        return (f"teacher cache {self.folder}: {what}, {len(self.cached_epochs())}/{epochs} epochs on disk, "
                f"{_human(self.size_estimate_bytes(epochs))} for {epochs} epochs{bound}{tail}")

    def cached_epochs(self) -> list[int]:
        """Epochs with a record file (checked only when read)."""
        out = []
        for p in self.folder.glob("epoch-*.bin") if self.folder.is_dir() else ():
            try:
                out.append(int(p.stem.split("-", 1)[1]))
            except ValueError:
                pass
        return sorted(out)

    @property
    def tail_mass(self) -> float | None:
        """Top-k: the mean teacher probability outside the top k over the samples `put` so far.

        The loss error of a top-k record grows with it (benchmarks/teacher_cache_topk.py), so it
        is the figure to show the user; None for full formats or before any `put`.
        """
        return self._tail[0] / self._tail[1] if self._tail[1] else None

    def pop_warnings(self) -> list[str]:
        """Warnings since the last call (each problem is reported once), for the caller to print."""
        out, self._warnings = self._warnings, []
        return out

    # ---- reading and writing

    def get(self, epoch: int, indices: torch.Tensor) -> torch.Tensor | None:
        """The cached (B, C) float32 CPU logits of samples `indices` at `epoch`, or None on a miss.

        A miss (no record, a damaged record, or one lacking any of these samples) means: run the
        teacher and `put` its logits.
        """
        idx = _index_array(indices)
        ep = self._epoch(epoch)
        if not ep.has(idx):
            return None
        return self.codec.decode({f: a[idx] for f, a in ep.fields.items()})

    def put(self, epoch: int, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Store the teacher's logits of `indices` at `epoch` (in memory until `commit`).

        Returns:
            The logits as `get` will return them (fp32: `logits` itself), float32, on `logits`'
            device: train on these, so cold and warm runs see the same targets.
        """
        c = self.codec.record.num_classes
        if logits.dim() != 2 or logits.shape[1] != c or logits.shape[0] != indices.numel():
            raise ValueError(f"put: expected ({indices.numel()}, {c}) logits, got {tuple(logits.shape)}")
        idx = _index_array(indices)
        cpu = logits.detach().float().cpu()
        rows = self.codec.encode(cpu)
        if self.codec.record.fmt == "fp16" and not np.isfinite(rows["logits"]).all() and torch.isfinite(cpu).all():
            self._stop("teacher cache: the teacher's logits exceed the fp16 range: the run goes on without the cache "
                       "(use the fp32 format)")
            self._passthrough = True
        if self._passthrough:  # from here on: the teacher's own logits
            return logits.float()
        out = logits.float() if self.codec.record.fmt == "fp32" else self.codec.decode(rows).to(logits.device)
        if "log_rest" in rows:
            col = self.codec.record.tail_temperatures.index(1.0)
            self._tail = [self._tail[0] + float(np.exp(rows["log_rest"][:, col]).sum()), self._tail[1] + len(idx)]
        if self.writing:
            ep = self._epoch(epoch)
            if ep.fields is None:
                ep = self._current = _Epoch.empty(epoch, self.key.num_samples, self.codec)
            for f, a in rows.items():
                ep.fields[f][idx] = a
            ep.mask[idx] = 1
            ep.dirty = True
        return out

    def commit(self, epoch: int) -> bool:
        """Write `epoch`'s records atomically if `put` added any. Never raises on I/O.

        Returns:
            True when a file was written; False otherwise (nothing new, or writing stopped:
            see `pop_warnings`).
        """
        ep = self._current
        if not self.writing or ep is None or ep.epoch != epoch or not ep.dirty:
            return False
        path = self._path(epoch)
        header = self._header(epoch, _payload_sha256(ep))
        size = len(header) + self.key.num_samples * self.codec.bytes_per_sample()
        old = path.stat().st_size if path.is_file() else 0
        if self.max_bytes is not None and self._used - old + size > self.max_bytes:
            self._stop(f"teacher cache {self.root} would pass its bound of {_human(self.max_bytes)}: "
                       f"no more epochs are written from epoch {epoch} on (the run goes on)")
            return False
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                _write_chunks(f, [header, *_payload_chunks(ep)])
        except (OSError, UserError) as e:
            self._stop(f"teacher cache: cannot write {path} ({_reason(e)}): the run goes on without writing the cache")
            return False
        self._used += size - old
        ep.dirty = False
        return True

    # ---- internals

    def _path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.bin"

    def _header(self, epoch: int, sha256: str) -> bytes:
        n, c = self.key.num_samples, self.codec
        head = json.dumps({"version": VERSION, "fingerprint": self.fingerprint, "epoch": epoch, "num_samples": n,
                           **c.record.to_dict(),
                           "dtypes": {f: dt.str for f, (dt, _) in c.fields.items()},
                           "payload_bytes": n * c.bytes_per_sample(), "sha256": sha256},
                          sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<I", len(head)) + head

    def _epoch(self, epoch: int) -> _Epoch:
        """The in-memory epoch, loading its record on first use (a damaged one counts as absent)."""
        if self._current is not None and self._current.epoch == epoch:
            return self._current
        ep = _Epoch(epoch)  # (an uncommitted other epoch is dropped here, as documented)
        path = self._path(epoch)
        if path.is_file():
            try:
                ep = self._read(path, epoch)
            except CorruptRecord as e:
                self._warnings.append(f"teacher cache: {path} is damaged ({e}): ignored, the teacher runs and it is rewritten")
            except OSError as e:
                self._warnings.append(f"teacher cache: cannot read {path} ({_reason(e)}): the teacher runs instead")
        self._current = ep
        return ep

    def _read(self, path: Path, epoch: int) -> _Epoch:
        """Read and verify one epoch file; raises `CorruptRecord` naming what is wrong."""
        with open(path, "rb") as f:
            data = bytearray(f.read())  # bytearray: writable, so the numpy views below are too
        head_end = len(MAGIC) + 4
        if len(data) < head_end or bytes(data[:len(MAGIC)]) != MAGIC:
            raise CorruptRecord("not a teacher cache record")
        (head_len,) = struct.unpack("<I", data[len(MAGIC):head_end])
        try:
            head = json.loads(bytes(data[head_end:head_end + head_len]))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptRecord("unreadable header") from None
        expected = json.loads(self._header(epoch, "")[head_end:])
        for name, value in expected.items():
            if name != "sha256" and (not isinstance(head, dict) or head.get(name) != value):
                raise CorruptRecord(f"header {name} is {head.get(name) if isinstance(head, dict) else None!r}, "
                                    f"expected {value!r}")
        payload = memoryview(data)[head_end + head_len:]
        if len(payload) != head["payload_bytes"]:
            raise CorruptRecord(f"{len(payload)} payload bytes, expected {head['payload_bytes']} (truncated?)")
        if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
            raise CorruptRecord("checksum mismatch")
        n = self.key.num_samples
        mask = np.frombuffer(payload, np.uint8, n)
        fields, offset = {}, n
        for f, (dt, width) in self.codec.fields.items():
            fields[f] = np.frombuffer(payload, dt, n * width, offset).reshape(n, width)
            offset += n * width * dt.itemsize
        return _Epoch(epoch, mask, fields)

    def _stop(self, message: str) -> None:
        """Stop writing for the rest of the run, with one warning; reading goes on."""
        if self.writing:
            self._warnings.append(message)
        self.writing = False
        if self._current is not None and self._current.dirty:
            self._current = None  # its rows will never be written: free them


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _payload_chunks(ep: _Epoch) -> list[memoryview]:
    return [memoryview(np.ascontiguousarray(ep.mask))] + [memoryview(np.ascontiguousarray(a)).cast("B")
                                                          for a in ep.fields.values()]


def _payload_sha256(ep: _Epoch) -> str:
    h = hashlib.sha256()
    for chunk in _payload_chunks(ep):
        h.update(chunk)
    return h.hexdigest()


def _write_chunks(f: BinaryIO, chunks: Iterable[bytes | memoryview]) -> None:
    # One function for every record write, so the tests can fail it like a full disk.
    for chunk in chunks:
        f.write(chunk)


def _index_array(indices: torch.Tensor) -> np.ndarray:
    return indices.detach().cpu().reshape(-1).long().numpy()


def _tree_bytes(root: Path) -> int:
    """Bytes of the files in `root` and its fingerprint folders (one level down)."""
    total = 0
    for p in (*root.glob("*"), *root.glob("*/*")) if root.is_dir() else ():
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


_PART_NAMES = {"teacher": "teacher (weights)", "split": "training split", "data": "data", "num_samples": "training size",
               "img_size": "input size", "seed": "seed", "train_fraction": "train fraction", "compute": "teacher compute",
               "augmentation": "augmentation", "num_classes": "class count", "format": "record format", "k": "top-k",
               "tail_temperatures": "tail temperatures"}


def _describe_diff(name: str, theirs, mine) -> str:
    label = _PART_NAMES.get(name, name)
    if name in ("teacher", "split", "augmentation"):
        return label  # digests and long strings: the name says enough
    return f"{label} ({theirs} here, {mine} now)"


def _reason(e: BaseException) -> str:
    if isinstance(e, UserError) and isinstance(e.__cause__, OSError):
        e = e.__cause__  # atomic_path wraps a full or read-only disk: name the cause once
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _human(nbytes: float) -> str:
    if nbytes < 1000:
        return f"{nbytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000 or unit == "GB":
            break
    return f"{nbytes:.1f} {unit}"
