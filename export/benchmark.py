"""`spofa bench`: latency and accuracy of a student artifact beside its teacher.

Pipeline: resolve the artifact (+ sidecar checks) -> pick backends -> build runners
(PyTorch from `spofa_deploy.bench`, ONNX Runtime and TensorRT here) -> per batch size,
interleave student and teacher timings over a few rounds and pool them -> accuracy on
the validation split through the same runners -> `BenchReport` -> table / JSON / PNG.

A backend that cannot run here (no GPU, no TensorRT, no CUDA provider) becomes a
"skipped" result carrying the reason; it is never replaced by another backend.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from spofa_deploy.artifacts import REQUIRED_META, read_json, read_model_meta, sidecar_path, write_json
from spofa_deploy.bench import (
    TORCH_BACKENDS,
    TORCH_PRECISIONS,
    LatencyStats,
    Runner,
    TimedStep,
    TorchRunner,
    cuda_skip_reason,
    machine_info,
    measure_step,
    state_dict_bytes,
)
from spofa_deploy.errors import MissingDependency, UserError

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu", *TORCH_BACKENDS)
FORMAT_BACKENDS = {"torch": TORCH_BACKENDS, "onnx": ("ort-cuda", "ort-cpu"), "trt": ("trt",)}
FORMAT_NAMES = {"torch": "a PyTorch model (.safetensors)", "onnx": "an ONNX model", "trt": "a TensorRT engine"}
_SUFFIX_FORMAT = {".safetensors": "torch", ".onnx": "onnx", ".engine": "trt"}
_FORMAT_ALIASES = {"torch": "torch", "pytorch": "torch", "safetensors": "torch", "onnx": "onnx",
                   "trt": "trt", "tensorrt": "trt", "engine": "trt"}
_ORT_TYPES = {"tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16)}
SCHEMA = "spofa-bench/1"
TIMING_NOTE = ("median/p99/img/s: GPU compute time (CUDA events, input already on the device) on GPU, host "
               "wall-clock latency on CPU; speed-up = teacher median / student median, same batch, interleaved")


# =========================================================================== artifacts

@dataclass(frozen=True)
class OnnxInfo:
    """What the ONNX graph itself declares (checked against the sidecar)."""

    input_name: str
    input_shape: tuple  # ints for static dims, strings for symbolic ones
    output_name: str
    output_shape: tuple
    fixed_batch: int | None
    external_files: tuple[str, ...]
    qdq: bool


@dataclass
class Artifact:
    """A model file to bench, with its checked metadata."""

    path: Path
    format: str  # torch | onnx | trt
    meta: dict
    precision: str | None  # the artifact's own precision (None for PyTorch weights: chosen at run time)
    size_bytes: int
    batch_range: tuple[int, int] | None  # None: any batch size
    source: Path | None = None  # the safetensors an export came from
    onnx: OnnxInfo | None = None

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def img_size(self) -> int:
        return int(self.meta["img_size"])


def _format_of(path: Path) -> str:
    """`torch` / `onnx` / `trt` from the file name, through `export.formats` where present."""
    try:
        from export.formats import format_for_path
    except ImportError:  # the formats table may not be there yet; the suffixes are the contract
        format_for_path = None
    if format_for_path is not None:
        fmt = format_for_path(path)
        name = _FORMAT_ALIASES.get(str(getattr(fmt, "name", fmt)).lower())
        if name:
            return name
    name = _SUFFIX_FORMAT.get(path.suffix.lower())
    if name is None:
        raise UserError(f"cannot bench {path.name}: expected a .engine, .onnx or .safetensors file, or a run folder")
    return name


def _onnx_info(path: Path) -> OnnxInfo:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a bad file
        raise UserError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1 or not m.graph.output:
        raise UserError(f"{path.name} has {len(inputs)} inputs: spofa bench runs image classifiers with one input")

    def dims(v) -> tuple:
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim)

    ishape, oshape = dims(inputs[0]), dims(m.graph.output[0])
    external = sorted({e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    fixed = ishape[0] if ishape and isinstance(ishape[0], int) and ishape[0] > 0 else None
    return OnnxInfo(inputs[0].name, ishape, m.graph.output[0].name, oshape, fixed, tuple(external), qdq)


def _sidecar_batch(meta: dict, side: Path) -> tuple[int, int] | None:
    b = meta.get("batch")
    if b is None:
        return None
    try:
        lo, hi = int(b["min"]), int(b["max"])
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{side} has a malformed 'batch' entry {b!r} (expected min/opt/max)") from None
    return lo, hi


def _resolve_source(meta: dict, artifact: Path) -> Path | None:
    src = meta.get("source")
    if not src:
        return None
    p = Path(src)
    for cand in ([p] if p.is_absolute() else [artifact.parent / p, artifact.parent / p.name, p]):
        if cand.is_file():
            return cand
    return None


def resolve_artifact(path: str | Path, role: str = "student") -> Artifact:
    """Find and check the artifact: file kind, sidecar, and that the two belong together.

    A folder means its `student.safetensors` (or `teacher.safetensors` for role="teacher").

    Raises:
        UserError: missing file or sidecar, or a sidecar that does not match the file.
    """
    path = Path(path)
    if path.is_dir():
        cand = path / f"{role}.safetensors"
        if not cand.is_file():
            raise UserError(f"{path} is a folder without {cand.name}: name the model file to bench")
        path = cand
    if not path.exists():
        raise UserError(f"artifact not found: {path}")
    if not path.is_file():
        raise UserError(f"not a file: {path}")
    fmt = _format_of(path)
    side = sidecar_path(path)
    if fmt == "torch":
        meta = read_model_meta(path)
    else:
        if not side.is_file():
            raise UserError(f"{path} has no sidecar {side.name} beside it (it is written by `spofa export`)")
        meta = read_json(side)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise UserError(f"{side} lacks {', '.join(missing)}: not a spofa export sidecar")
    declared = meta.get("format")
    if declared is None and fmt != "torch":
        raise UserError(f"{side} has no 'format' entry: it was not written for {path.name}")
    if declared is not None and _FORMAT_ALIASES.get(str(declared).lower()) != fmt:
        raise UserError(f"sidecar {side.name} describes a '{declared}' artifact but {path.name} is {FORMAT_NAMES[fmt]}: "
                        f"the sidecar does not belong to this file (re-export it)")
    try:
        img = int(meta["img_size"])
        classes = int(meta["num_classes"])
    except (TypeError, ValueError):
        raise UserError(f"{side} has a non-integer img_size or num_classes") from None
    batch_range = _sidecar_batch(meta, side) if fmt != "torch" else None
    size = path.stat().st_size
    info = None
    if fmt == "onnx":
        info = _onnx_info(path)
        _check_onnx_against_sidecar(path, side, info, meta, img, classes, batch_range)
        for name in info.external_files:
            ext = path.parent / name
            if not ext.is_file():
                raise UserError(f"{path.name} keeps its weights in {name}, which is missing beside it")
            size += ext.stat().st_size
        # A dynamic-batch ONNX runs any batch in ONNX Runtime; the sidecar's profile is for TensorRT.
        batch_range = (info.fixed_batch, info.fixed_batch) if info.fixed_batch else None
    precision = str(meta.get("precision", "fp32")).lower() if fmt != "torch" else None
    return Artifact(path=path, format=fmt, meta=meta, precision=precision, size_bytes=size, batch_range=batch_range,
                    source=_resolve_source(meta, path) if fmt != "torch" else path, onnx=info)


def _check_onnx_against_sidecar(path, side, info: OnnxInfo, meta, img, classes, batch_range) -> None:
    shape = info.input_shape
    if len(shape) != 4:
        raise UserError(f"{path.name} takes a rank-{len(shape)} input {shape}; an image classifier takes (N, C, H, W)")
    chans = int(meta.get("in_chans", 3))
    if isinstance(shape[1], int) and shape[1] > 0 and shape[1] != chans:
        raise UserError(f"{path.name} takes {shape[1]} channels but its sidecar {side.name} implies {chans}: "
                        "the sidecar does not belong to this file")
    hw = [d for d in shape[2:] if isinstance(d, int) and d > 0]
    if hw and any(d != img for d in hw):
        raise UserError(f"{path.name} takes {shape[2]}x{shape[3]} images but its sidecar {side.name} says img_size {img}: "
                        "the sidecar does not belong to this file")
    out = info.output_shape
    if len(out) >= 2 and isinstance(out[-1], int) and out[-1] > 0 and out[-1] != classes:
        raise UserError(f"{path.name} outputs {out[-1]} classes but its sidecar {side.name} says {classes}: "
                        "the sidecar does not belong to this file")
    if info.fixed_batch and batch_range and not batch_range[0] <= info.fixed_batch <= batch_range[1]:
        raise UserError(f"{path.name} has a fixed batch of {info.fixed_batch} but its sidecar {side.name} says "
                        f"batch {batch_range[0]}..{batch_range[1]}: the sidecar does not belong to this file")


# =========================================================================== runners

class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message is the reason shown to the user."""


def _random(shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _Holder:
    out: torch.Tensor | None = None


class OrtRunner:
    """An ONNX model in ONNX Runtime, on the CPU provider or on CUDA through IOBinding.

    On CUDA, ORT computes on a torch stream we own (`user_compute_stream`), so the
    host->device copy, the compute (bracketed by CUDA events) and the device->host copy are
    ordered on one stream without extra host synchronisation, and the bound input is
    already on the device when the compute is timed.
    """

    fixed_shapes = False

    def __init__(self, art: Artifact, provider: str, threads: int | None = None):
        import onnxruntime as ort

        if provider not in ("cpu", "cuda"):
            raise ValueError(provider)
        self.backend, self.device = f"ort-{provider}", provider
        self.name, self.precision, self.size_bytes = art.model, art.precision or "fp32", art.size_bytes
        self.batch_range = art.batch_range
        self.num_classes = int(art.meta["num_classes"])
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; a CUDA fallback is detected and reported below
        if threads:
            so.intra_op_num_threads = threads
        self._stream = None
        if provider == "cuda":
            reason = cuda_skip_reason()
            if reason:
                raise BackendUnavailable(reason)
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
            self._device_id = torch.cuda.current_device()
            self._stream = torch.cuda.Stream()
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id,
                                                    "user_compute_stream": str(self._stream.cuda_stream)}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(art.path), sess_options=so, providers=providers)
        except Exception as e:
            raise UserError(f"onnxruntime cannot load {art.path.name}: {str(e).splitlines()[0]}") from e
        if provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable("onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing or "
                                     "of another major version); ort-cpu runs this model")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type not in _ORT_TYPES or out.type not in _ORT_TYPES:
            raise UserError(f"{art.path.name} has {inp.type} input / {out.type} output; spofa bench feeds float32 or float16")
        self._in_name, self._out_name = inp.name, out.name
        self._in_np, self._in_torch = _ORT_TYPES[inp.type]
        self._out_np, self._out_torch = _ORT_TYPES[out.type]
        self.input_shape = (int(art.meta.get("in_chans", 3)), art.img_size, art.img_size)
        self._bindings: dict[int, tuple] = {}

    def batch_sizes_supported(self, batch: int) -> bool:
        return batch >= 1 and (self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1])

    def _binding(self, batch: int) -> tuple:
        """IOBinding with device-resident input and output buffers for `batch` (CUDA only)."""
        if batch not in self._bindings:
            x_dev = torch.empty((batch, *self.input_shape), dtype=self._in_torch, device="cuda")
            out_dev = torch.empty((batch, self.num_classes), dtype=self._out_torch, device="cuda")
            io = self.session.io_binding()
            io.bind_input(name=self._in_name, device_type="cuda", device_id=self._device_id, element_type=self._in_np,
                          shape=tuple(x_dev.shape), buffer_ptr=x_dev.data_ptr())
            io.bind_output(name=self._out_name, device_type="cuda", device_id=self._device_id,
                           element_type=self._out_np, shape=tuple(out_dev.shape), buffer_ptr=out_dev.data_ptr())
            self._bindings[batch] = (io, x_dev, out_dev)
        return self._bindings[batch]

    def prepare(self, batch: int) -> TimedStep:
        x_cpu = _random((batch, *self.input_shape), seed=batch).to(self._in_torch)
        if self.device == "cpu":
            feed = {self._in_name: x_cpu.numpy()}
            holder = _Holder()

            def compute() -> None:
                holder.out = self.session.run([self._out_name], feed)[0]

            compute()
            return TimedStep(compute=compute)
        io, x_dev, out_dev = self._binding(batch)
        x_host = x_cpu.pin_memory()
        out_host = torch.empty(out_dev.shape, dtype=out_dev.dtype, pin_memory=True)
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            self.session.run_with_iobinding(io)
        s.synchronize()
        return TimedStep(compute=lambda: self.session.run_with_iobinding(io),
                         copy_in=lambda: x_dev.copy_(x_host, non_blocking=True),
                         copy_out=lambda: out_host.copy_(out_dev, non_blocking=True),
                         sync=s.synchronize, cuda_events=True, stream=s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device == "cpu":
            out = self.session.run([self._out_name], {self._in_name: x.to(self._in_torch).numpy()})[0]
            return torch.from_numpy(np.asarray(out)).float()
        io, x_dev, out_dev = self._binding(x.shape[0])
        with torch.cuda.stream(self._stream):
            x_dev.copy_(x.to(self._in_torch))
            self.session.run_with_iobinding(io)
            out = out_dev.float().cpu()
        self._stream.synchronize()
        return out

    def release(self) -> None:
        self._bindings.clear()


def _first_output(out) -> torch.Tensor:
    if isinstance(out, dict):
        return out["logits"] if "logits" in out else next(iter(out.values()))
    if isinstance(out, (list, tuple)):
        return out[0]
    return out


def _trt_profile(runner, fallback: tuple[int, int] | None) -> tuple[int, int] | None:
    """(min, max) batch of the engine's optimisation profile, however TrtRunner spells it."""
    for attr in ("batch", "profile", "batch_profile"):
        b = getattr(runner, attr, None)
        if isinstance(b, dict) and "min" in b and "max" in b:
            return int(b["min"]), int(b["max"])
        if isinstance(b, (tuple, list)) and len(b) == 3:
            return int(b[0]), int(b[2])
    lo, hi = getattr(runner, "min_batch", None), getattr(runner, "max_batch", None)
    if lo is not None and hi is not None:
        return int(lo), int(hi)
    return fallback


class EngineRunner:
    """A TensorRT engine through `export.tensorrt.TrtRunner` (`execute_async_v3` on torch CUDA tensors).

    Work is issued on a stream we own, so TensorRT does not run on the legacy default
    stream and the CUDA events bracket only its compute.
    """

    backend, device, fixed_shapes = "trt", "cuda", False

    def __init__(self, art: Artifact, trust: bool = False):
        reason = cuda_skip_reason()
        if reason:
            raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {reason}")
        try:
            from export.tensorrt import TrtRunner
        except ImportError as e:
            raise BackendUnavailable(f"the TensorRT runner cannot be imported ({e})") from None
        self.name, self.precision, self.size_bytes = art.model, art.precision or "fp32", art.size_bytes
        self.num_classes = int(art.meta["num_classes"])
        self.input_shape = (int(art.meta.get("in_chans", 3)), art.img_size, art.img_size)
        try:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._trt = TrtRunner(str(art.path), trust=trust, device=device)
        except MissingDependency as e:  # TensorRT not installed (or no GPU): a missing backend
            raise BackendUnavailable(str(e)) from None
        # Any other UserError (engine from another TensorRT version or GPU) is the user's to fix: it propagates.
        engine_shape = tuple(int(d) for d in getattr(self._trt, "input_shape", self.input_shape))
        if engine_shape != self.input_shape:
            raise UserError(f"{art.path.name} takes images of shape {engine_shape} but its sidecar says "
                            f"{self.input_shape}: the sidecar does not belong to this engine")
        self.batch_range = _trt_profile(self._trt, art.batch_range)
        self._stream = torch.cuda.Stream()

    def batch_sizes_supported(self, batch: int) -> bool:
        return batch >= 1 and (self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return _first_output(self._trt(x))

    def prepare(self, batch: int) -> TimedStep:
        x_host = _random((batch, *self.input_shape), seed=batch).pin_memory()
        x_dev = torch.empty_like(x_host, device="cuda")
        holder = _Holder()
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            holder.out = self._run(x_dev)
        s.synchronize()
        out_host = torch.empty(holder.out.shape, dtype=holder.out.dtype, pin_memory=True)

        def compute() -> None:
            holder.out = self._run(x_dev)

        return TimedStep(compute=compute, copy_in=lambda: x_dev.copy_(x_host, non_blocking=True),
                         copy_out=lambda: out_host.copy_(holder.out, non_blocking=True),
                         sync=s.synchronize, cuda_events=True, stream=s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            out = self._run(x.to("cuda", non_blocking=False)).float().cpu()
        self._stream.synchronize()
        return out

    def release(self) -> None:
        pass


# =========================================================================== records

@dataclass
class Accuracy:
    """Top-k accuracy (percent) on the validation split, through the runner itself."""

    top1: float
    top5: float
    n: int
    k5: int  # the k of "top-5" (fewer classes than 5 -> all classes)
    teacher_top1: float | None = None
    agreement: float | None = None  # percent of images where student and teacher top-1 agree
    preds: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "top5_k": self.k5, "n": self.n,
                "teacher_top1": self.teacher_top1, "agreement": self.agreement}


@dataclass
class BatchResult:
    """Latency of one variant at one batch size, with the side-by-side ratio to its teacher."""

    batch: int
    latency: LatencyStats
    speedup_vs_teacher: float | None = None
    teacher_median_ms: float | None = None

    def to_dict(self) -> dict:
        return {**self.latency.to_dict(), "speedup_vs_teacher": self.speedup_vs_teacher,
                "teacher_median_ms": self.teacher_median_ms}


@dataclass
class VariantResult:
    """One model on one backend at one precision: all batches, accuracy, or why it did not run."""

    key: str
    role: str  # student | teacher
    model: str
    backend: str
    backend_requested: str
    precision: str
    device: str
    artifact: str | None
    size_bytes: int | None
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    teacher: str | None = None  # key of the paired teacher variant
    batches: list[BatchResult] = field(default_factory=list)
    accuracy: Accuracy | None = None

    def batch(self, b: int) -> BatchResult | None:
        return next((r for r in self.batches if r.batch == b), None)

    def to_dict(self) -> dict:
        return {"key": self.key, "role": self.role, "model": self.model, "backend": self.backend,
                "backend_requested": self.backend_requested, "precision": self.precision, "device": self.device,
                "artifact": self.artifact, "size_bytes": self.size_bytes, "status": self.status,
                "reason": self.reason, "teacher": self.teacher,
                "accuracy": self.accuracy.to_dict() if self.accuracy else None,
                "batches": [b.to_dict() for b in self.batches]}


@dataclass
class BenchReport:
    """Everything one `spofa bench` measured."""

    results: list[VariantResult]
    settings: dict
    machine: dict
    data: dict | None = None
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def students(self) -> list[VariantResult]:
        return [r for r in self.results if r.role == "student"]

    @property
    def teachers(self) -> list[VariantResult]:
        return [r for r in self.results if r.role == "teacher"]

    def get(self, key: str) -> VariantResult:
        return next(r for r in self.results if r.key == key)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": self.created, "settings": self.settings, "machine": self.machine,
                "data": self.data, "notes": self.notes, "results": [r.to_dict() for r in self.results]}


# =========================================================================== core

@dataclass
class Candidate:
    """A variant to run: its runner (None when skipped) and its validation data."""

    result: VariantResult
    runner: Runner | None = None
    val: object | None = None  # a Dataset with this model's eval transform


def _per_round(total: float, rounds: int) -> float:
    return total / rounds


@contextlib.contextmanager
def cpu_threads(n: int | None, cudnn_benchmark: bool = True):
    """Temporarily set PyTorch's CPU threads (None: leave as is) and cuDNN autotuning.

    cuDNN benchmark mode is on while benching, as in timm's benchmark script: each
    fixed input shape gets its fastest convolution algorithm, as a deployment would.
    """
    if n is not None and n < 1:
        raise UserError("--threads must be >= 1")
    old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if n is not None:
        torch.set_num_threads(n)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench


def _torch_settings() -> dict:
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def evaluate(runner: Runner, dataset, batch_size: int, progress=None, task=None) -> Accuracy:
    """Top-1 / top-5 of `runner` over `dataset` (in order); predictions kept for agreement.

    A short last batch is padded to `batch_size` (and the padding dropped) where the
    runner has fixed shapes or does not accept that size.
    """
    from spofa_deploy.data import make_loader

    loader = make_loader(dataset, batch_size, train=False, workers=0 if len(dataset) <= 4096 else None)
    correct1 = correct5 = n = 0
    preds, k5 = [], 1
    for x, y in loader:
        b = x.shape[0]
        if b != batch_size and (runner.fixed_shapes or not runner.batch_sizes_supported(b)):
            x = torch.cat([x, x[-1:].expand(batch_size - b, *x.shape[1:])])
        logits = runner(x)[:b].float()
        k5 = min(5, logits.shape[1])
        top = logits.topk(k5, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        preds.append(top[:, 0].numpy())
        n += b
        if progress is not None:
            progress.advance(task, b)
    if n == 0:
        raise UserError("the validation split is empty")
    return Accuracy(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n, n=n, k5=k5, preds=np.concatenate(preds))


def _eval_batch(runner: Runner, wanted: int) -> int:
    rng = getattr(runner, "batch_range", None)
    if rng is None:
        return wanted
    return min(max(wanted, rng[0]), rng[1])


def _fail_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def bench_runners(candidates: list[Candidate], *, batch_sizes: Sequence[int], warmup_s: float = 1.0,
                  min_s: float = 3.0, min_iters: int = 50, rounds: int = 3, eval_batch: int = 64,
                  progress: bool = True) -> list[VariantResult]:
    """Time and evaluate prepared candidates; fills and returns their `VariantResult`s.

    Per batch size every runnable candidate is timed in turn, `rounds` times (A B A B ...),
    each round taking 1/rounds of `min_s` and `min_iters`; the rounds are pooled, so slow
    drift (clocks, thermals, other tenants) affects student and teacher alike.
    """
    from spofa_deploy.console import progress as make_progress

    if rounds < 1:
        raise UserError("--rounds must be >= 1")
    for c in candidates:
        if c.runner is None:
            continue
        bad = [b for b in batch_sizes if not c.runner.batch_sizes_supported(b)]
        if bad:
            rng = getattr(c.runner, "batch_range", None)
            allowed = f"{rng[0]}..{rng[1]}" if rng else "its fixed size"
            raise UserError(f"{c.result.model} ({c.result.backend}) accepts batch sizes {allowed}; "
                            f"--batch asked for {', '.join(map(str, bad))}")
    live = [c for c in candidates if c.runner is not None]
    r_min_s, r_iters = _per_round(min_s, rounds), max(1, math.ceil(min_iters / rounds))
    prog = make_progress(transient=True)
    prog.disable = not progress
    with prog:
        t_time = prog.add_task("timing", total=len(live) * len(batch_sizes) * rounds, info="")
        for b in batch_sizes:
            steps: dict[int, TimedStep] = {}
            parts: dict[int, list[LatencyStats]] = {}
            for i, c in enumerate(live):
                if c.result.status != "ok":
                    continue
                prog.update(t_time, info=f"batch {b}: preparing {c.result.model} {c.result.backend}")
                try:
                    steps[i] = c.runner.prepare(b)
                except UserError:
                    raise
                except Exception as e:  # e.g. compile or capture failure: report it, keep the others
                    c.result.status, c.result.reason = "failed", f"prepare at batch {b}: {_fail_reason(e)}"
            for r in range(rounds):
                for i, step in steps.items():
                    c = live[i]
                    if c.result.status != "ok":
                        continue
                    prog.update(t_time, info=f"batch {b} round {r + 1}/{rounds}: {c.result.role} {c.result.backend}")
                    try:
                        st = measure_step(step, batch=b, warmup_s=warmup_s if r == 0 else warmup_s / rounds,
                                          min_s=r_min_s, min_iters=r_iters)
                    except Exception as e:
                        c.result.status, c.result.reason = "failed", f"timing at batch {b}: {_fail_reason(e)}"
                        continue
                    parts.setdefault(i, []).append(st)
                    prog.advance(t_time)
            for i, ps in parts.items():
                if live[i].result.status == "ok":
                    live[i].result.batches.append(BatchResult(batch=b, latency=LatencyStats.pool(ps)))
            steps.clear()
            for c in live:
                c.runner.release()
        to_eval = [c for c in live if c.val is not None and c.result.status == "ok"]
        if to_eval:
            t_acc = prog.add_task("accuracy", total=sum(len(c.val) for c in to_eval), info="")
            for c in to_eval:
                prog.update(t_acc, info=f"{c.result.role} {c.result.model} {c.result.backend}")
                try:
                    c.result.accuracy = evaluate(c.runner, c.val, _eval_batch(c.runner, eval_batch), prog, t_acc)
                except UserError:
                    raise
                except Exception as e:
                    c.result.status, c.result.reason = "failed", f"accuracy: {_fail_reason(e)}"
                finally:
                    c.runner.release()
    _pair(candidates)
    return [c.result for c in candidates]


def _pair(candidates: list[Candidate]) -> None:
    """Speed-ups (teacher median / student median, same batch, same clock) and top-1 agreement."""
    by_key = {c.result.key: c.result for c in candidates}
    for c in candidates:
        s = c.result
        t = by_key.get(s.teacher) if s.teacher else None
        if s.role != "student" or t is None or t.status != "ok" or s.status != "ok":
            continue
        for br in s.batches:
            tb = t.batch(br.batch)
            if tb is None:
                continue
            br.teacher_median_ms = tb.latency.median_ms
            if tb.latency.timing == br.latency.timing and br.latency.median_ms > 0:
                br.speedup_vs_teacher = tb.latency.median_ms / br.latency.median_ms
        if s.accuracy and t.accuracy:
            s.accuracy.teacher_top1 = t.accuracy.top1
            if s.accuracy.preds is not None and t.accuracy.preds is not None and len(s.accuracy.preds) == len(t.accuracy.preds):
                s.accuracy.agreement = 100.0 * float(np.mean(s.accuracy.preds == t.accuracy.preds))


def _resolve_device(device: str) -> str:
    """"auto" -> cuda when PyTorch sees a GPU, else cpu; "cuda:N" selects GPU N."""
    d = device.strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if d == "cuda" or d.startswith("cuda:"):
        if d.startswith("cuda:"):
            try:
                idx = int(d.split(":", 1)[1])
            except ValueError:
                raise UserError(f"--device {device}: expected cuda:N") from None
            if torch.cuda.is_available():
                if idx >= torch.cuda.device_count():
                    raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
                torch.cuda.set_device(idx)
        return "cuda"
    raise UserError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N")


def _default_precision(device: str) -> str:
    # bf16 autocast is how PyTorch inference is run on current GPUs; fp32 on CPU.
    return "bf16" if device == "cuda" else "fp32"


def _torch_candidate(model: nn.Module, *, role: str, name: str, backend: str, requested: str, precision: str,
                     device: str, img_size: int, artifact: str | None, size_bytes: int | None,
                     compile_mode: str | None, in_chans: int = 3) -> Candidate:
    dev = "cuda" if backend == "torch-cudagraph" else device
    res = VariantResult(key=f"{role}:{backend}:{precision}:{dev}", role=role, model=name, backend=backend,
                        backend_requested=requested, precision=precision, device=dev, artifact=artifact,
                        size_bytes=size_bytes)
    reason = cuda_skip_reason() if dev == "cuda" else None
    if reason:
        res.status, res.reason = "skipped", f"{backend} needs a CUDA GPU: {reason}"
        res.size_bytes = state_dict_bytes(model) if size_bytes is None else size_bytes
        return Candidate(res)
    runner = TorchRunner(model, backend=backend, device=dev, precision=precision, img_size=img_size,
                         in_chans=in_chans, name=name, size_bytes=size_bytes, compile_mode=compile_mode)
    res.size_bytes = runner.size_bytes
    return Candidate(res, runner)


def _check_backends(backends: Iterable[str]) -> list[str]:
    out = []
    for b in backends:
        b = b.strip().lower()
        if b not in BACKENDS:
            close = difflib.get_close_matches(b, BACKENDS, n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"unknown backend '{b}'.{hint} Choose from {', '.join(BACKENDS)}")
        if b not in out:
            out.append(b)
    if not out:
        raise UserError("no backend given")
    return out


def _check_batches(batch_sizes: Iterable[int]) -> list[int]:
    out = []
    for b in batch_sizes:
        if int(b) < 1:
            raise UserError(f"batch sizes must be >= 1, got {b}")
        if int(b) not in out:
            out.append(int(b))
    if not out:
        raise UserError("no batch size given")
    return out


def _check_timing(warmup_s: float, min_s: float, min_iters: int) -> None:
    if warmup_s < 0 or min_s < 0:
        raise UserError("--warmup-s and --min-s must be >= 0")
    if min_iters < 1:
        raise UserError("--min-iters must be >= 1")


def bench_models(teacher_model: nn.Module | None, student_model: nn.Module, *, img_size: int,
                 backends: Sequence[str] = ("torch-eager",), batch_sizes: Sequence[int] = (1, 8, 64),
                 precision: str | None = None, device: str = "auto", warmup_s: float = 1.0, min_s: float = 3.0,
                 min_iters: int = 50, rounds: int = 3, student_name: str | None = None,
                 teacher_name: str | None = None, student_val=None, teacher_val=None, eval_batch: int = 64,
                 compile_mode: str | None = None, threads: int | None = None, progress: bool = True) -> BenchReport:
    """Bench in-memory PyTorch models (no artifacts): student beside teacher per torch backend.

    Each backend in `backends` (torch-eager, torch-compile, torch-cudagraph) runs both
    models, interleaved per batch size. Accuracy is measured when `student_val` (a dataset
    with the student's eval transform) is given; `teacher_val` defaults to it.

    Example (GPU):
        bench_models(timm.create_model("vit_base_patch16_224"), timm.create_model("mobilenetv3_large_100"),
                     img_size=224, backends=["torch-eager", "torch-cudagraph", "torch-compile"],
                     batch_sizes=[1, 256], device="cuda", precision="bf16")
    """
    backends = _check_backends(backends)
    bad = [b for b in backends if b not in TORCH_BACKENDS]
    if bad:
        raise UserError(f"bench_models runs PyTorch backends ({', '.join(TORCH_BACKENDS)}), not {', '.join(bad)}")
    batch_sizes = _check_batches(batch_sizes)
    _check_timing(warmup_s, min_s, min_iters)
    dev = _resolve_device(device)
    prec = precision or _default_precision(dev)
    if prec not in TORCH_PRECISIONS:
        raise UserError(f"PyTorch backends run {', '.join(TORCH_PRECISIONS)}, not '{prec}'")
    sname = student_name or getattr(student_model, "default_cfg", {}).get("architecture") or type(student_model).__name__
    tname = None
    if teacher_model is not None:
        tname = teacher_name or getattr(teacher_model, "default_cfg", {}).get("architecture") or type(teacher_model).__name__
    cands: list[Candidate] = []
    for i, b in enumerate(backends):
        s = _torch_candidate(student_model if i == 0 else copy.deepcopy(student_model), role="student", name=sname,
                             backend=b, requested=b, precision=prec, device=dev, img_size=img_size, artifact=None,
                             size_bytes=None, compile_mode=compile_mode)
        s.val = student_val
        cands.append(s)
        if teacher_model is not None:
            t = _torch_candidate(teacher_model if i == 0 else copy.deepcopy(teacher_model), role="teacher", name=tname,
                                 backend=b, requested=b, precision=prec, device=dev, img_size=img_size,
                                 artifact=None, size_bytes=None, compile_mode=compile_mode)
            t.val = teacher_val if teacher_val is not None else student_val
            s.result.teacher = t.result.key
            cands.append(t)
    settings = dict(batch_sizes=batch_sizes, backends=backends, precision=prec, device=dev, warmup_s=warmup_s,
                    min_s=min_s, min_iters=min_iters, rounds=rounds, img_size=img_size, eval_batch=eval_batch,
                    threads=threads or torch.get_num_threads(), timing_note=TIMING_NOTE)
    with cpu_threads(threads):
        settings.update(_torch_settings())
        results = bench_runners(cands, batch_sizes=batch_sizes, warmup_s=warmup_s, min_s=min_s,
                                min_iters=min_iters, rounds=rounds, eval_batch=eval_batch, progress=progress)
    return BenchReport(results=results, settings=settings, machine=machine_info())


# --------------------------------------------------------------------------- run_bench

def _auto_backend(art: Artifact, device_opt: str, device: str, notes: list[str], role: str) -> str:
    if art.format == "torch":
        choice, why = "torch-eager", "PyTorch weights"
    elif art.format == "trt":
        choice, why = "trt", "TensorRT engine"
    else:
        if device == "cuda":
            reason = _ort_cuda_reason()
        else:
            reason = f"--device {device_opt}" if device_opt.strip().lower() != "auto" else cuda_skip_reason()
        choice, why = ("ort-cuda", "ONNX with a usable CUDA provider") if reason is None else ("ort-cpu", f"ONNX; no ort-cuda: {reason}")
    notes.append(f"auto: {role} {art.path.name} -> {choice} ({why})")
    return choice


def _ort_cuda_reason() -> str | None:
    reason = cuda_skip_reason()
    if reason:
        return reason
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    return None


def _backend_device(backend: str, device_opt: str, device: str) -> str:
    """The device a backend runs on; a contradiction with an explicit --device is the user's error."""
    fixed = {"ort-cpu": "cpu", "ort-cuda": "cuda", "trt": "cuda", "torch-cudagraph": "cuda"}.get(backend)
    if fixed is None:
        return device
    if device_opt.strip().lower() != "auto" and fixed != device:
        raise UserError(f"backend {backend} runs on {fixed}, but --device {device_opt} was given")
    return fixed


def _artifact_candidate(art: Artifact, *, role: str, backend: str, requested: str, precision: str | None,
                        device: str, trust_engine: bool, model_cache: dict, compile_mode: str | None,
                        threads: int | None = None) -> Candidate:
    if backend not in FORMAT_BACKENDS[art.format]:
        raise UserError(f"backend {backend} cannot run {art.path.name} ({FORMAT_NAMES[art.format]}); "
                        f"use {' or '.join(FORMAT_BACKENDS[art.format])}"
                        + (" or export it with `spofa export`" if art.format == "torch" else ""))
    if art.format == "torch":
        prec = precision or _default_precision(device)
        if prec not in TORCH_PRECISIONS:
            raise UserError(f"PyTorch backends run {', '.join(TORCH_PRECISIONS)}, not '{prec}' "
                            "(int8 comes from an INT8 ONNX/engine: `spofa export --precision int8`)")
        if art.path not in model_cache:
            from spofa_deploy.artifacts import load_model

            model_cache[art.path] = load_model(art.path)[0]
            fresh = model_cache[art.path]
        else:
            fresh = copy.deepcopy(model_cache[art.path])
        return _torch_candidate(fresh, role=role, name=art.model, backend=backend, requested=requested, precision=prec,
                                device=device, img_size=art.img_size, artifact=str(art.path),
                                size_bytes=art.size_bytes, compile_mode=compile_mode,
                                in_chans=int(art.meta.get("in_chans", 3)))
    prec = art.precision or "fp32"
    if precision is not None and precision != prec:
        raise UserError(f"{art.path.name} was exported at {prec}; --precision {precision} needs its own export "
                        f"(`spofa export --precision {precision}`)")
    dev = "cpu" if backend == "ort-cpu" else "cuda"
    res = VariantResult(key=f"{role}:{backend}:{prec}:{dev}", role=role, model=art.model, backend=backend,
                        backend_requested=requested, precision=prec, device=dev, artifact=str(art.path),
                        size_bytes=art.size_bytes)
    try:
        runner = OrtRunner(art, dev, threads) if backend.startswith("ort-") else EngineRunner(art, trust=trust_engine)
    except BackendUnavailable as e:
        res.status, res.reason = "skipped", str(e)
        return Candidate(res)
    return Candidate(res, runner)


def _teacher_artifact(student: Artifact, teacher: str | Path | None, notes: list[str]) -> Artifact | None:
    if teacher is not None:
        return resolve_artifact(teacher, role="teacher")
    if student.meta.get("role") == "teacher":
        return None
    tfile = student.meta.get("teacher_file")
    if not tfile:
        notes.append("no teacher_file in the student's metadata: no teacher comparison (pass --teacher)")
        return None
    base = student.source.parent if student.source is not None else student.path.parent
    path = base / tfile
    if not path.is_file():
        notes.append(f"teacher {path} not found: no teacher comparison (pass --teacher)")
        return None
    return resolve_artifact(path, role="teacher")


def _teacher_backend(tart: Artifact, student_backend: str, student_device: str, override: str | None) -> str:
    if override:
        return override
    if tart.format == "torch":
        # Same family where possible: a PyTorch student's teacher runs on the same torch backend.
        return student_backend if student_backend in TORCH_BACKENDS else "torch-eager"
    if tart.format == "onnx":
        return "ort-cuda" if student_device == "cuda" else "ort-cpu"
    return "trt"


def _val_sets(spec: str, arts: list[Artifact], max_val: int | None) -> tuple[dict, dict]:
    """One validation dataset per distinct preprocessing, all on the same (sub)set of images."""
    from spofa_deploy.data import load_splits, stratified_subset

    sets: dict[tuple, object] = {}
    info: dict = {"spec": spec}
    idx = None
    for a in arts:
        m = a.meta
        key = (a.img_size, tuple(m["mean"]), tuple(m["std"]), m.get("interpolation", "bilinear"), float(m.get("crop_pct", 0.875)))
        if key in sets:
            continue
        splits = load_splits(spec, a.img_size, m["mean"], m["std"], interpolation=m.get("interpolation", "bilinear"),
                             crop_pct=float(m.get("crop_pct", 0.875)), train_aug=False)
        if splits.num_classes != int(m["num_classes"]):
            raise UserError(f"data {spec} has {splits.num_classes} classes but {a.path.name} has {m['num_classes']}: "
                            "pass the --data it was trained on")
        val = splits.val
        if max_val is not None:
            if idx is None:
                idx = stratified_subset(val.labels, max_val, seed=0)
            val = val.subset(idx)
        info["val_size"] = len(val)
        sets[key] = val
    by_path = {}
    for a in arts:
        m = a.meta
        key = (a.img_size, tuple(m["mean"]), tuple(m["std"]), m.get("interpolation", "bilinear"), float(m.get("crop_pct", 0.875)))
        by_path[a.path] = sets[key]
    return by_path, info


def run_bench(artifact: str | Path, *, teacher: str | Path | None = None, data: str | None = None,
              backends: Sequence[str] = ("auto",), batch_sizes: Sequence[int] = (1, 8, 64),
              precisions: Sequence[str] | None = None, warmup_s: float = 1.0, min_s: float = 3.0,
              min_iters: int = 50, rounds: int = 3, max_val: int | None = None, device: str = "auto",
              teacher_backend: str | None = None, accuracy: bool = True, eval_batch: int = 64,
              compile_mode: str | None = None, trust_engine: bool = False, threads: int | None = None,
              json_path: str | Path | None = None, plot_path: str | Path | None = None,
              progress: bool = True) -> BenchReport:
    """Bench a student artifact (and its run's teacher) for latency and accuracy.

    Args:
        artifact: `.engine`, `.onnx`, `.safetensors`, or a run folder (its student.safetensors).
        teacher: the teacher to compare with (default: `teacher_file` of the student's run).
        data: data spec for accuracy (default: the one in the metadata).
        backends: backends for the student ("auto" = the artifact's natural runtime).
        batch_sizes: batch sizes to time.
        precisions: PyTorch autocast precisions (fp32/bf16/fp16); for ONNX/engines, must match the export.
        warmup_s, min_s, min_iters: the timing method (see `spofa_deploy.bench.measure`).
        rounds: interleaved student/teacher rounds per batch size.
        max_val: evaluate on a stratified subset of this many validation images.
        device: auto | cpu | cuda | cuda:N (PyTorch backends; others have a fixed device).
        teacher_backend: force the teacher's backend (default: same family as the student).
        accuracy: evaluate accuracy (needs the data).
        eval_batch: batch size of the accuracy pass.
        compile_mode: `torch.compile` mode for torch-compile.
        trust_engine: passed to `TrtRunner`.
        threads: CPU threads for PyTorch and ONNX Runtime (default: their own defaults).
        json_path, plot_path: also write the JSON report / the accuracy-latency PNG.
        progress: show transient progress bars on stderr.

    Raises:
        UserError: bad artifact, sidecar mismatch, engine refused, unsupported batch size, unknown backend.
    """
    with cpu_threads(threads):
        return _run_bench(artifact, teacher=teacher, data=data, backends=backends, batch_sizes=batch_sizes,
                          precisions=precisions, warmup_s=warmup_s, min_s=min_s, min_iters=min_iters, rounds=rounds,
                          max_val=max_val, device=device, teacher_backend=teacher_backend, accuracy=accuracy,
                          eval_batch=eval_batch, compile_mode=compile_mode, trust_engine=trust_engine,
                          threads=threads, json_path=json_path, plot_path=plot_path, progress=progress)


def _run_bench(artifact, *, teacher, data, backends, batch_sizes, precisions, warmup_s, min_s, min_iters, rounds,
               max_val, device, teacher_backend, accuracy, eval_batch, compile_mode, trust_engine, threads,
               json_path, plot_path, progress) -> BenchReport:
    backends = _check_backends(backends)
    batch_sizes = _check_batches(batch_sizes)
    _check_timing(warmup_s, min_s, min_iters)
    if max_val is not None and max_val < 1:
        raise UserError("--max-val must be >= 1")
    for flag, out in (("--json", json_path), ("--plot", plot_path)):
        if out is not None and not Path(out).parent.is_dir():  # fail now, not after minutes of timing
            raise UserError(f"{flag}: folder {Path(out).parent} does not exist")
    if teacher_backend is not None:
        teacher_backend = _check_backends([teacher_backend])[0]
        if teacher_backend == "auto":
            teacher_backend = None
    precs = [p.strip().lower() for p in precisions] if precisions else [None]
    dev = _resolve_device(device)
    notes: list[str] = []
    art = resolve_artifact(artifact)
    tart = _teacher_artifact(art, teacher, notes)
    for a in [art] + ([tart] if tart else []):
        if a.batch_range:  # checked before any runtime loads, so it holds where TensorRT is missing too
            bad = [b for b in batch_sizes if not a.batch_range[0] <= b <= a.batch_range[1]]
            if bad:
                what = "fixed batch" if a.format == "onnx" else "engine profile"
                raise UserError(f"{a.path.name} accepts batch {a.batch_range[0]}..{a.batch_range[1]} ({what}); "
                                f"--batch asked for {', '.join(map(str, bad))}")
    if tart is not None and tart.img_size != art.img_size:
        notes.append(f"teacher input {tart.img_size}px, student {art.img_size}px: each timed at its own size")

    model_cache: dict = {}
    cands: list[Candidate] = []
    teachers: dict[str, Candidate] = {}
    for requested in backends:
        backend = _auto_backend(art, device, dev, notes, "student") if requested == "auto" else requested
        bdev = _backend_device(backend, device, dev)
        for prec in precs:
            c = _artifact_candidate(art, role="student", backend=backend, requested=requested, precision=prec,
                                    device=bdev, trust_engine=trust_engine, model_cache=model_cache,
                                    compile_mode=compile_mode, threads=threads)
            if any(x.result.key == c.result.key for x in cands):
                continue
            cands.append(c)
            if tart is None:
                continue
            tb = _teacher_backend(tart, backend, bdev, teacher_backend)
            if tb not in FORMAT_BACKENDS[tart.format]:
                raise UserError(f"teacher backend {tb} cannot run {tart.path.name} ({FORMAT_NAMES[tart.format]})")
            tdev = _backend_device(tb, "auto", bdev)
            tprec = c.result.precision if (tart.format == "torch" and c.result.precision in TORCH_PRECISIONS) else None
            if tart.format == "torch" and tprec is None:
                tprec = _default_precision(tdev)
            probe_key = f"teacher:{tb}:{tprec or tart.precision}:{tdev}"
            if probe_key not in teachers:
                tc = _artifact_candidate(tart, role="teacher", backend=tb, requested=tb, precision=tprec,
                                         device=tdev, trust_engine=trust_engine, model_cache=model_cache,
                                         compile_mode=compile_mode, threads=threads)
                teachers[probe_key] = tc
            c.result.teacher = teachers[probe_key].result.key
    cands.extend(teachers.values())

    data_info = None
    spec = data or art.meta.get("data")
    if accuracy and spec:
        arts = [art] + ([tart] if tart else [])
        by_path, data_info = _val_sets(spec, arts, max_val)
        for c in cands:
            c.val = by_path[Path(c.result.artifact)] if c.runner is not None else None
    elif accuracy:
        notes.append("no data spec in the metadata and no --data: accuracy not measured")

    settings = dict(artifact=str(art.path), teacher=str(tart.path) if tart else None, backends=backends,
                    batch_sizes=batch_sizes, precisions=precisions, device=dev, warmup_s=warmup_s, min_s=min_s,
                    min_iters=min_iters, rounds=rounds, max_val=max_val, eval_batch=eval_batch,
                    threads=threads or torch.get_num_threads(), img_size=art.img_size, timing_note=TIMING_NOTE,
                    **_torch_settings())
    results = bench_runners(cands, batch_sizes=batch_sizes, warmup_s=warmup_s, min_s=min_s, min_iters=min_iters,
                            rounds=rounds, eval_batch=eval_batch, progress=progress)
    report = BenchReport(results=results, settings=settings, machine=machine_info(), data=data_info, notes=notes)
    if json_path is not None:
        write_report_json(report, json_path)
    if plot_path is not None:
        write_plot(report, plot_path)
    return report


# =========================================================================== output

def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def render_table(report: BenchReport):
    """A rich Table: one row per variant and batch size; skipped/failed variants in one row with a mark.

    The reasons are in `report_reasons(report)` (printed under the table by `print_report`).
    """
    from rich.table import Table

    t = Table(title="spofa bench", caption=report.settings.get("timing_note"), caption_justify="left",
              pad_edge=False, collapse_padding=True)
    t.add_column("model", min_width=8, overflow="fold")
    t.add_column("role", no_wrap=True)
    t.add_column("backend", min_width=9, overflow="fold")
    t.add_column("prec", no_wrap=True)
    for col in ("batch", "median ms", "p99 ms", "img/s", "top-1", "agree", "size", "speed-up"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in sorted(report.results, key=lambda r: (r.role != "student", r.key)):
        top1 = f"{r.accuracy.top1:.2f}%" if r.accuracy else "-"
        agree = f"{r.accuracy.agreement:.1f}%" if r.accuracy and r.accuracy.agreement is not None else "-"
        backend = r.backend + (f" {r.device}" if r.backend in ("torch-eager", "torch-compile") else "")
        backend += " (auto)" if r.backend_requested == "auto" else ""
        head = [r.model, r.role, backend, r.precision]
        if not r.batches:
            t.add_row(*head, "-", f"[yellow]{r.status}[/]", "-", "-", top1, agree, _fmt_size(r.size_bytes), "-")
            continue
        for i, br in enumerate(r.batches):
            lat = br.latency
            sp = f"{br.speedup_vs_teacher:.2f}x" if br.speedup_vs_teacher is not None else "-"
            first = i == 0
            t.add_row(*(head if first else [""] * 4), str(br.batch), _fmt_ms(lat.median_ms), _fmt_ms(lat.p99_ms),
                      f"{lat.throughput_ips:,.0f}", top1 if first else "", agree if first else "",
                      _fmt_size(r.size_bytes) if first else "", sp)
        if r.status != "ok":
            t.add_row("", "", "", "", "", f"[yellow]{r.status}[/]", "", "", "", "", "", "")
    return t


def report_reasons(report: BenchReport) -> list[str]:
    """One line per skipped or failed variant, with its reason."""
    return [f"{r.status}: {r.role} {r.model} {r.backend} {r.precision}: {r.reason}"
            for r in report.results if r.status != "ok"]


def print_report(report: BenchReport, console=None) -> None:
    """Print the table and the notes (stdout by default)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or pipe: no reason to squeeze the table into 80 columns
            console = Console(width=max(console.width, 140))
    console.print(render_table(report))
    for line in report_reasons(report):
        console.print(line, style="yellow", markup=False)
    for n in report.notes:
        console.print(f"note: {n}", markup=False)


def write_report_json(report: BenchReport, path: str | Path) -> Path:
    """Write the full report (every figure, settings, machine) as JSON, atomically."""
    path = Path(path)
    write_json(path, report.to_dict())
    return path


def write_plot(report: BenchReport, path: str | Path) -> Path | None:
    """PNG of top-1 accuracy against median latency, one point per variant and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spofa_deploy.artifacts import atomic_path

    pts = [r for r in report.results if r.accuracy and r.batches]
    if not pts:
        report.notes.append("no accuracy measured: no plot written")
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for i, r in enumerate(pts):
        xs = [b.latency.median_ms for b in r.batches]
        ys = [r.accuracy.top1] * len(xs)
        label = f"{r.role}: {r.model} {r.backend} {r.precision}"
        ax.plot(xs, ys, marker="*" if r.role == "teacher" else markers[i % len(markers)],
                markersize=12 if r.role == "teacher" else 7, linestyle=":", label=label)
        for b in r.batches:
            ax.annotate(f"b{b.batch}", (b.latency.median_ms, r.accuracy.top1), textcoords="offset points",
                        xytext=(3, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median latency per batch (ms, log)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
