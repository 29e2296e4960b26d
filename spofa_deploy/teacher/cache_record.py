"""The teacher cache's record file: the field codec, the file layout, verified reads, atomic writes.

A record is `MAGIC | u32 header length | header JSON | payload`. The header names the version,
fingerprint, epoch, samples, classes, format, k, payload size and the payload's sha256, so a
truncated, corrupt or foreign file is detected on read (`CorruptRecord`). The payload holds a
per-sample "present" mask (uint8) and one array per field:

    fp32  logits float32 (N, C)           exact: decoding returns bitwise what was encoded
    fp16  logits float16 (N, C)           error: fp16 rounding (relative 2**-11)
    topk  logp float16 (N, k), index int16/int32 (N, k), lse float32 (N,), log_rest float32 (N, temperatures)

Writes go through `artifacts.atomic_path` (temp file, fsync, rename), so readers see a whole
old file or a whole new one.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import numpy as np
import torch

from spofa_deploy.artifacts import atomic_path
from spofa_deploy.teacher.cache_key import VERSION, RecordFormat

# The tail's log-mass (per unit of temperature) is clamped here: exp(-60) is far below anything a
# loss can see, and a finite value keeps `kl_div(log_target=True)` free of 0 * inf = NaN.
LOG_REST_MIN = -60.0
MAGIC = b"SPOFATC\x01"


class Codec:
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



class EpochRecords:
    """An epoch's arrays (n rows each) and which samples they hold; `fields is None`: nothing cached."""

    def __init__(self, epoch: int, mask: np.ndarray | None = None, fields: dict[str, np.ndarray] | None = None):
        self.epoch, self.mask, self.fields, self.dirty = epoch, mask, fields, False

    @classmethod
    def empty(cls, epoch: int, n: int, codec: Codec) -> "EpochRecords":
        return cls(epoch, np.zeros(n, np.uint8), {f: np.zeros((n, w), dt) for f, (dt, w) in codec.fields.items()})

    def has(self, idx: np.ndarray) -> bool:
        return self.mask is not None and bool(self.mask[idx].all())


class CorruptRecord(Exception):
    """An epoch file that is truncated, damaged or not ours (the reason is the message)."""


@dataclass(frozen=True)
class RecordFile:
    """The epoch files of one fingerprint: their header, size, verified reading and their bytes."""

    fingerprint: str
    num_samples: int
    codec: Codec

    def header(self, epoch: int, sha256: str) -> bytes:
        n, c = self.num_samples, self.codec
        head = json.dumps({"version": VERSION, "fingerprint": self.fingerprint, "epoch": epoch, "num_samples": n,
                           **c.record.to_dict(),
                           "dtypes": {f: dt.str for f, (dt, _) in c.fields.items()},
                           "payload_bytes": n * c.bytes_per_sample(), "sha256": sha256},
                          sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<I", len(head)) + head

    def epoch_bytes(self) -> int:
        """Bytes of one epoch file (header included)."""
        return len(self.header(0, "0" * 64)) + self.num_samples * self.codec.bytes_per_sample()

    def empty(self, epoch: int) -> EpochRecords:
        return EpochRecords.empty(epoch, self.num_samples, self.codec)

    def chunks(self, ep: EpochRecords) -> list[bytes | memoryview]:
        """The file's bytes in pieces: the header (with the payload's sha256), then the payload."""
        payload = _payload_chunks(ep)
        h = hashlib.sha256()
        for chunk in payload:
            h.update(chunk)
        return [self.header(ep.epoch, h.hexdigest()), *payload]

    def read(self, path: Path, epoch: int) -> EpochRecords:
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
        expected = json.loads(self.header(epoch, "")[head_end:])
        for name, value in expected.items():
            if name != "sha256" and (not isinstance(head, dict) or head.get(name) != value):
                raise CorruptRecord(f"header {name} is {head.get(name) if isinstance(head, dict) else None!r}, "
                                    f"expected {value!r}")
        payload = memoryview(data)[head_end + head_len:]
        if len(payload) != head["payload_bytes"]:
            raise CorruptRecord(f"{len(payload)} payload bytes, expected {head['payload_bytes']} (truncated?)")
        if hashlib.sha256(payload).hexdigest() != head.get("sha256"):
            raise CorruptRecord("checksum mismatch")
        n = self.num_samples
        mask = np.frombuffer(payload, np.uint8, n)
        fields, offset = {}, n
        for f, (dt, width) in self.codec.fields.items():
            fields[f] = np.frombuffer(payload, dt, n * width, offset).reshape(n, width)
            offset += n * width * dt.itemsize
        return EpochRecords(epoch, mask, fields)


def write_record(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Write a record atomically (`artifacts.atomic_path`); OSError / UserError on a failed write."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_chunks(f, chunks)


def _payload_chunks(ep: EpochRecords) -> list[memoryview]:
    return [memoryview(np.ascontiguousarray(ep.mask))] + [memoryview(np.ascontiguousarray(a)).cast("B")
                                                          for a in ep.fields.values()]


def _write_chunks(f: BinaryIO, chunks: Iterable[bytes | memoryview]) -> None:
    # One function for every record write, so the tests can fail it like a full disk.
    for chunk in chunks:
        f.write(chunk)
