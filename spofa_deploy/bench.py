"""Backend-neutral latency measurement, result records and the pure-PyTorch runners.

The method follows trtexec: warm up for a fixed time, then run until both a minimum
time and a minimum number of iterations are reached, synchronising after every
iteration. Two clocks are kept per iteration:

- host latency: wall clock around host->device copy of the input, the compute, the
  device->host copy of the output and the final synchronisation (what a caller sees);
- GPU compute time: CUDA events recorded on the compute stream around the compute only
  (input already on the device). On CPU it is `None`, never estimated.

Runners (PyTorch here; ONNX Runtime and TensorRT in `export.runtimes`) share the small
`Runner` protocol: `prepare(batch)` returns a `TimedStep` (the closures `measure` times)
and `__call__(x)` runs a CPU batch through the same path for accuracy. `cuda_step` builds
the `TimedStep` of a GPU runner, the same way for every backend.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from .errors import UserError

PERCENTILES = (50, 90, 95, 99)
TORCH_BACKENDS = ("torch-eager", "torch-compile", "torch-cudagraph")
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch-compile's mode where none is given: CUDA graphs on a GPU (launch-bound at small batch), plain inductor on CPU.
DEFAULT_COMPILE_MODE = {"cuda": "reduce-overhead", "cpu": "default"}


# --------------------------------------------------------------------------- statistics

def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    arr = np.sort(np.asarray(values, dtype=np.float64))
    if arr.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (arr.size - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(arr[lo] + (arr[hi] - arr[lo]) * (pos - lo))


@dataclass(frozen=True)
class Summary:
    """Distribution of one timing, in milliseconds."""

    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    std: float
    n: int

    @classmethod
    def of(cls, samples_ms) -> "Summary":
        """Summarise a non-empty list of millisecond samples."""
        arr = np.asarray(samples_ms, dtype=np.float64)
        if arr.size == 0:
            raise ValueError("no samples to summarise")
        return cls(min=float(arr.min()), mean=float(arr.mean()), median=percentile(arr, 50),
                   p90=percentile(arr, 90), p95=percentile(arr, 95), p99=percentile(arr, 99),
                   max=float(arr.max()), std=float(arr.std()), n=int(arr.size))

    def to_dict(self) -> dict:
        return {"min_ms": self.min, "mean_ms": self.mean, "median_ms": self.median, "p90_ms": self.p90,
                "p95_ms": self.p95, "p99_ms": self.p99, "max_ms": self.max, "std_ms": self.std, "n": self.n}


@dataclass
class LatencyStats:
    """Latency of one runner at one batch size.

    `host` is wall-clock host latency; `gpu` is GPU compute time from CUDA events (None on CPU).
    `timing` names the clock the headline figures (`median_ms`, `p99_ms`, `throughput_ips`) use:
    "gpu" when GPU compute time exists (as in trtexec and the anchors), else "host".
    """

    batch: int
    iters: int
    warmup_iters: int
    measured_s: float
    rounds: int
    host: Summary
    gpu: Summary | None
    host_ms: list[float] = field(default_factory=list, repr=False)
    gpu_ms: list[float] | None = field(default=None, repr=False)

    @classmethod
    def from_samples(cls, batch: int, host_ms: list[float], gpu_ms: list[float] | None,
                     warmup_iters: int, measured_s: float, rounds: int = 1) -> "LatencyStats":
        return cls(batch=batch, iters=len(host_ms), warmup_iters=warmup_iters, measured_s=measured_s,
                   rounds=rounds, host=Summary.of(host_ms), gpu=Summary.of(gpu_ms) if gpu_ms else None,
                   host_ms=list(host_ms), gpu_ms=list(gpu_ms) if gpu_ms else None)

    @classmethod
    def pool(cls, parts: list["LatencyStats"]) -> "LatencyStats":
        """Pool interleaved rounds of the same runner and batch into one distribution."""
        if not parts:
            raise ValueError("nothing to pool")
        host = [v for p in parts for v in p.host_ms]
        gpu = [v for p in parts for v in p.gpu_ms] if all(p.gpu_ms for p in parts) else None
        return cls.from_samples(parts[0].batch, host, gpu, sum(p.warmup_iters for p in parts),
                                sum(p.measured_s for p in parts), rounds=sum(p.rounds for p in parts))

    @property
    def timing(self) -> str:
        return "gpu" if self.gpu is not None else "host"

    @property
    def headline(self) -> Summary:
        return self.gpu if self.gpu is not None else self.host

    @property
    def median_ms(self) -> float:
        return self.headline.median

    @property
    def p99_ms(self) -> float:
        return self.headline.p99

    @property
    def throughput_ips(self) -> float:
        """Images per second from the headline median."""
        return self.batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def host_throughput_ips(self) -> float:
        return self.batch * 1000.0 / self.host.median if self.host.median > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"batch": self.batch, "iters": self.iters, "warmup_iters": self.warmup_iters,
                "measured_s": self.measured_s, "rounds": self.rounds, "timing": self.timing,
                "median_ms": self.median_ms, "p99_ms": self.p99_ms, "throughput_ips": self.throughput_ips,
                "host_throughput_ips": self.host_throughput_ips,
                "host_latency": self.host.to_dict(), "gpu_compute": self.gpu.to_dict() if self.gpu else None}


# --------------------------------------------------------------------------- the method

@dataclass
class TimedStep:
    """What `measure` times for one batch: closures prepared by a runner.

    compute: enqueue the inference on device-resident input (bracketed by CUDA events).
    copy_in / copy_out: host->device input copy and device->host output copy (host latency only).
    sync: wait for the device; None on CPU where calls are synchronous.
    stream: the CUDA stream the work runs on (events are recorded there); None = current stream.
    """

    compute: Callable[[], object]
    copy_in: Callable[[], object] | None = None
    copy_out: Callable[[], object] | None = None
    sync: Callable[[], object] | None = None
    cuda_events: bool = False
    stream: "torch.cuda.Stream | None" = None


def measure(run_fn: Callable[[], object], *, sync: Callable[[], object] | None = None, cuda_events: bool = False,
            warmup_s: float = 1.0, min_s: float = 3.0, min_iters: int = 50,
            copy_in: Callable[[], object] | None = None, copy_out: Callable[[], object] | None = None,
            stream: "torch.cuda.Stream | None" = None, batch: int = 1) -> LatencyStats:
    """Time `run_fn` like trtexec: warm up by time, then >= `min_s` seconds and >= `min_iters` runs.

    Args:
        run_fn: the compute call (input already where it runs).
        sync: waits for the device after each iteration (e.g. `torch.cuda.synchronize`).
        cuda_events: also record CUDA events around `run_fn` for GPU compute time.
        warmup_s: warm-up time (at least one iteration).
        min_s, min_iters: both must be reached.
        copy_in, copy_out: host<->device copies counted in host latency only.
        stream: CUDA stream to run on and record events on (None: the current stream).
        batch: images per call, for throughput.
    """
    if min_iters < 1 or min_s < 0 or warmup_s < 0:
        raise ValueError("measure needs min_iters >= 1 and non-negative times")
    if cuda_events and not torch.cuda.is_available():
        raise ValueError("cuda_events=True needs a CUDA device")
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        start = end = None
        if cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if sync is None:  # wait for the whole stream, copy_out included, not just the end event
                sync = torch.cuda.current_stream().synchronize

        def once() -> tuple[float, float | None]:
            t0 = time.perf_counter_ns()
            if copy_in is not None:
                copy_in()
            if start is not None:
                start.record()
            run_fn()
            if end is not None:
                end.record()
            if copy_out is not None:
                copy_out()
            if sync is not None:
                sync()
            t1 = time.perf_counter_ns()
            gpu = None
            if start is not None:
                end.synchronize()  # already complete after sync(); elapsed_time needs it recorded
                gpu = float(start.elapsed_time(end))
            return (t1 - t0) / 1e6, gpu

        warm, t_end = 0, time.perf_counter() + warmup_s
        while warm == 0 or time.perf_counter() < t_end:
            once()
            warm += 1
        host_ms: list[float] = []
        gpu_ms: list[float] = []
        t_start = time.perf_counter()
        while True:
            h, g = once()
            host_ms.append(h)
            if g is not None:
                gpu_ms.append(g)
            elapsed = time.perf_counter() - t_start
            if len(host_ms) >= min_iters and elapsed >= min_s:
                break
    return LatencyStats.from_samples(batch, host_ms, gpu_ms or None, warm, elapsed)


def measure_step(step: TimedStep, *, batch: int, warmup_s: float, min_s: float, min_iters: int) -> LatencyStats:
    """`measure` applied to a runner's prepared `TimedStep`."""
    return measure(step.compute, sync=step.sync, cuda_events=step.cuda_events, warmup_s=warmup_s,
                   min_s=min_s, min_iters=min_iters, copy_in=step.copy_in, copy_out=step.copy_out,
                   stream=step.stream, batch=batch)


class OutputSlot:
    """Keeps the latest output alive between compute and copy_out."""

    out: torch.Tensor | None = None


def cuda_step(compute: Callable[[], object], slot: OutputSlot, x_host: torch.Tensor, x_dev: torch.Tensor, *,
              sync: Callable[[], object], stream: "torch.cuda.Stream | None" = None) -> TimedStep:
    """The `TimedStep` of a GPU runner whose first output is already in `slot.out`.

    copy_in: pinned `x_host` -> `x_dev`; copy_out: `slot.out` (as `compute` last left it) -> a
    pinned host buffer; both asynchronous on `stream` (None: the current one), so only `sync`
    waits for them.
    """
    out_host = torch.empty(slot.out.shape, dtype=slot.out.dtype, pin_memory=True)

    def copy_in() -> None:
        x_dev.copy_(x_host, non_blocking=True)

    def copy_out() -> None:
        out_host.copy_(slot.out, non_blocking=True)

    return TimedStep(compute=compute, copy_in=copy_in, copy_out=copy_out, sync=sync, cuda_events=True, stream=stream)


# --------------------------------------------------------------------------- runner interface

@runtime_checkable
class Runner(Protocol):
    """One model on one backend at one precision.

    Attributes:
        name: model name (timm name) for tables.
        backend: e.g. "torch-eager", "ort-cpu", "trt".
        precision: "fp32", "bf16", "fp16", "int8".
        device: "cpu" or "cuda".
        size_bytes: size on disk of the artifact (state-dict bytes for in-memory models).
        fixed_shapes: True when a new batch size is expensive (compile / graph capture), so
            accuracy evaluation pads the last batch instead of running a new size.
    """

    name: str
    backend: str
    precision: str
    device: str
    size_bytes: int | None
    fixed_shapes: bool

    def batch_sizes_supported(self, batch: int) -> bool: ...

    def prepare(self, batch: int) -> TimedStep: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def release(self) -> None: ...


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what a safetensors file would hold)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def random_input(shape: tuple, seed: int) -> torch.Tensor:
    """A reproducible standard-normal CPU tensor: the timed input of every runner."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# Inductor settings patched in while torch-compile traces and compiles (never left on): frozen
# weights become constants of the graph, so BatchNorm folds into the convolutions, weight casts
# fold away and CPU weights are prepacked for oneDNN. Dynamo reads `freezing` while tracing,
# so it must be the global config at that moment: `torch.compile(options=...)` is too late.
COMPILE_CONFIG = {"freezing": True}


def check_compile_mode(mode: str | None, device: str) -> str:
    """The `torch.compile` mode to use: `mode`, or the device's default (`DEFAULT_COMPILE_MODE`).

    Raises:
        UserError: an unknown mode.
    """
    from torch._inductor import list_mode_options

    mode = mode or DEFAULT_COMPILE_MODE[device]
    if mode not in list_mode_options():
        raise UserError(f"unknown compile mode '{mode}': choose one of {', '.join(list_mode_options())}")
    return mode


class TorchRunner:
    """A PyTorch model run eagerly, through `torch.compile`, or by CUDA-graph replay.

    On GPU the model and inputs are channels_last (faster convolutions, see the anchors);
    reduced precision is autocast (`bf16`/`fp16`) with fp32 weights, as users run it.
    torch-compile is compiled as deployed: inference mode, frozen weights (BatchNorm folded,
    `COMPILE_CONFIG`), static shapes, CUDA graphs on a GPU ("reduce-overhead") unless
    `compile_mode` says otherwise.

    Attributes:
        compile_seconds: per batch size, the wall time of the first call (compile + one run) for
            torch-compile, or of the graph capture for torch-cudagraph; kept out of the latency
            (`prepare` makes that call before `measure` starts its clock).
    """

    fixed_shapes: bool

    def __init__(self, model: nn.Module, *, backend: str = "torch-eager", device: str = "cpu",
                 precision: str = "fp32", img_size: int = 224, in_chans: int = 3, name: str | None = None,
                 size_bytes: int | None = None, compile_mode: str | None = None, seed: int = 0):
        if backend not in TORCH_BACKENDS:
            raise ValueError(f"unknown torch backend {backend}")
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"torch backends run {', '.join(TORCH_PRECISIONS)}, not {precision}")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        if backend == "torch-cudagraph" and device != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.backend, self.device, self.precision = backend, device, precision
        self.name = name or type(model).__name__
        self.size_bytes = state_dict_bytes(model) if size_bytes is None else size_bytes
        self.input_shape = (in_chans, img_size, img_size)
        self.fixed_shapes = backend != "torch-eager"
        self.seed = seed
        self._memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
        self.model = model.eval().to(device=device, memory_format=self._memory_format)
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.model
        self.compile_mode = check_compile_mode(compile_mode, device) if backend == "torch-compile" else None
        self.compile_seconds: dict[int, float] = {}
        if backend == "torch-compile":
            # Static shapes: one specialised graph per batch size (dynamic=False), as deployed.
            self._fn = torch.compile(self.model, mode=self.compile_mode, dynamic=False)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    # -- helpers
    def _autocast(self):
        dtype = _AUTOCAST[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        # The autocast weight-cast cache must be off while capturing a CUDA graph.
        return torch.autocast(device_type=self.device, dtype=dtype,
                              cache_enabled=self.backend != "torch-cudagraph")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch-compile" and self.device == "cuda":
            # Each call is a new inference step for CUDA-graph trees (its outputs may be overwritten).
            torch.compiler.cudagraph_mark_step_begin()
        with torch.inference_mode(), self._autocast():
            return self._fn(x)

    def _first_call(self, batch: int, run: Callable[[], object]) -> object:
        """`run()`; the first torch-compile call at a batch size (the one that compiles) runs with
        `COMPILE_CONFIG` patched in and is timed into `compile_seconds`."""
        if self.backend != "torch-compile" or batch in self.compile_seconds:
            return run()
        from torch._inductor import config as inductor_config

        t0 = time.perf_counter()
        with inductor_config.patch(COMPILE_CONFIG):
            out = run()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.compile_seconds[batch] = time.perf_counter() - t0
        return out

    def _graph(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Capture (once per batch size) a CUDA graph of the forward on a static input buffer."""
        if batch in self._graphs:
            return self._graphs[batch]
        t0 = time.perf_counter()
        static_in = torch.zeros((batch, *self.input_shape), device=self.device).contiguous(
            memory_format=self._memory_format)
        # Warm up on a side stream so lazy initialisation (cuBLAS handles, cuDNN plans)
        # happens before capture, as the PyTorch CUDA-graph docs require.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        torch.cuda.synchronize()
        self.compile_seconds[batch] = time.perf_counter() - t0
        self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]

    # -- Runner interface
    def batch_sizes_supported(self, batch: int) -> bool:
        return batch >= 1

    def prepare(self, batch: int) -> TimedStep:
        """Allocate buffers for `batch`, compile or capture, and return the closures to time."""
        x_cpu = random_input((batch, *self.input_shape), seed=self.seed + batch)
        slot = OutputSlot()
        if self.device == "cpu":
            x = x_cpu.contiguous()

            def compute() -> None:
                slot.out = self._forward(x)

            self._first_call(batch, compute)  # compile / first-call costs stay out of the warm-up clock
            return TimedStep(compute=compute)

        # Pinned host buffer in the device buffer's layout, so the H2D copy is one plain DMA.
        xc = x_cpu.contiguous(memory_format=self._memory_format)
        x_host = torch.empty_strided(xc.shape, xc.stride(), dtype=xc.dtype, pin_memory=True).copy_(xc)
        if self.backend == "torch-cudagraph":
            graph, x_dev, static_out = self._graph(batch)
            slot.out = static_out
            compute = graph.replay
        else:
            x_dev = torch.empty_strided(xc.shape, xc.stride(), dtype=xc.dtype, device=self.device)
            x_dev.copy_(x_host)

            def compute() -> None:
                slot.out = self._forward(x_dev)

            self._first_call(batch, compute)
            torch.cuda.synchronize()
        return cuda_step(compute, slot, x_host, x_dev, sync=torch.cuda.synchronize)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) for a CPU batch, through the same backend and precision."""
        if self.backend == "torch-cudagraph":
            graph, static_in, static_out = self._graph(x.shape[0])
            static_in.copy_(x)
            graph.replay()
            return static_out.float().cpu()
        x = x.to(self.device).contiguous(memory_format=self._memory_format)
        return self._first_call(x.shape[0], lambda: self._forward(x)).float().cpu()

    def release(self) -> None:
        """Drop captured graphs (their memory pools) between batch sizes."""
        self._graphs.clear()
