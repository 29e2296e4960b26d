"""Teacher-output cache: the teacher's logits of each (epoch, training sample), stored once, read back.

The logits of a training image are a pure function of what a `CacheKey` names (teacher weights,
data + split, input size, preprocessing, seed, epoch, index, how the teacher computes;
`teacher_cache_key`). A cache only ever reads records carrying its own full fingerprint, so
outputs of another teacher, data, size or seed are never reused: they live in another folder
and are simply another key.

Layout::

    DIR/<fingerprint[:16]>/manifest.json     every key part in clear (for people and miss notes)
    DIR/<fingerprint[:16]>/epoch-0003.bin    one record per epoch (`teacher_cache_record`)

A truncated, corrupt or foreign record is ignored on read (a miss, with one note) and
rewritten. Two writers of the same epoch write the same bytes and the last rename wins. A
cache that cannot be written (read-only or missing folder, full disk, its `max_gb` bound
reached) stops writing and says so once through `pop_warnings()`; the run goes on without it.
Nothing here prints: the caller prints `note` and the warnings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from spofa_deploy.artifacts import read_json, write_json
from spofa_deploy.errors import UserError
from spofa_deploy.teacher.cache_key import (VERSION, CacheKey,
                                RecordFormat, fingerprint)
from spofa_deploy.teacher.cache_record import Codec, CorruptRecord, EpochRecords, RecordFile, write_record


MANIFEST = "manifest.json"
STALE_TMP_S = 3600.0  # temp files older than this were left by a killed writer
_FOLDER_HEX = 16


@dataclass
class TeacherCacheOptions:
    """The teacher-output cache of a distillation: where it lives, its bound, its record format."""

    folder: str | Path  # the teacher's logits of every training view, stored once, read by later runs and epochs
    max_gb: float | None = None  # bound on the folder
    format: str | None = None  # fp32 (exact) | fp16 | topk; None: fp16, top-k beyond 100 classes at temperature 1


class TeacherCache:
    """Teacher logits per (epoch, sample index) in `DIR/<fingerprint>/`; see the module docstring.

    Use per batch: `t = cache.get(epoch, idx)`; when it is None run the teacher and train on
    `t = cache.put(epoch, idx, teacher(x))`; at the end of the epoch `cache.commit(epoch)`.
    `put` returns what `get` will return later (the logits after the record's rounding), so a run
    trains on the same targets whether its cache was cold, warm or could not be written.
    One epoch is held in memory at a time: commit it before moving to the next.
    """

    def __init__(self, root: Path, key: CacheKey, codec: Codec, fp: str, max_bytes: int | None):
        self.root, self.key, self.codec, self.fingerprint, self.max_bytes = root, key, codec, fp, max_bytes
        self.records = RecordFile(fp, key.num_samples, codec)
        self.folder = root / fp[:_FOLDER_HEX]
        self.writing = True
        self.note = ""
        self._warnings: list[str] = []
        self._current: EpochRecords | None = None
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
        cache = cls(Path(root), key, Codec(record, float(temperature)), fingerprint(key, record),
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
        return self.records.epoch_bytes()

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
                ep = self._current = self.records.empty(epoch)
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
        chunks = self.records.chunks(ep)
        size = len(chunks[0]) + self.key.num_samples * self.codec.bytes_per_sample()
        old = path.stat().st_size if path.is_file() else 0
        if self.max_bytes is not None and self._used - old + size > self.max_bytes:
            self._stop(f"teacher cache {self.root} would pass its bound of {_human(self.max_bytes)}: "
                       f"no more epochs are written from epoch {epoch} on (the run goes on)")
            return False
        try:
            write_record(path, chunks)
        except (OSError, UserError) as e:
            self._stop(f"teacher cache: cannot write {path} ({_reason(e)}): the run goes on without writing the cache")
            return False
        self._used += size - old
        ep.dirty = False
        return True

    # ---- internals

    def _path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.bin"

    def _epoch(self, epoch: int) -> EpochRecords:
        """The in-memory epoch, loading its record on first use (a damaged one counts as absent)."""
        if self._current is not None and self._current.epoch == epoch:
            return self._current
        ep = EpochRecords(epoch)  # (an uncommitted other epoch is dropped here, as documented)
        path = self._path(epoch)
        if path.is_file():
            try:
                ep = self.records.read(path, epoch)
            except CorruptRecord as e:
                self._warnings.append(f"teacher cache: {path} is damaged ({e}): ignored, the teacher runs and it is rewritten")
            except OSError as e:
                self._warnings.append(f"teacher cache: cannot read {path} ({_reason(e)}): the teacher runs instead")
        self._current = ep
        return ep

    def _stop(self, message: str) -> None:
        """Stop writing for the rest of the run, with one warning; reading goes on."""
        if self.writing:
            self._warnings.append(message)
        self.writing = False
        if self._current is not None and self._current.dirty:
            self._current = None  # its rows will never be written: free them


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


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
