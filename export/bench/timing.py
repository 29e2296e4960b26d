"""The timing method of `spofa bench`: latency statistics, the timing options, `measure`.

The method borrows trtexec's schedule: warm up for a fixed time, then run until both a
minimum time and a minimum number of iterations are reached. Three figures, as trtexec
reports them:

- host latency: wall clock per iteration around the host->device copy of the input, the
  compute, the device->host copy of the output and the final synchronisation (what a
  caller that waits for each result sees);
- GPU compute time (`back_to_back`): the same number of inferences enqueued back to back,
  the host waiting only every `BLOCK` of them, with a CUDA event recorded on the stream
  after each; the time between consecutive events is one inference's GPU work on a busy
  GPU, so the host's launch time stays out of it (trtexec keeps inferences in flight the
  same way). The compute is a CUDA graph replay where the runner could capture one (a
  TensorRT engine, torch-cudagraph, torch-compile's "reduce-overhead"), else the plain
  enqueue. On CPU it is `None`, never estimated;
- enqueue time: host time of each of those enqueue calls, reported separately: where it
  exceeds the GPU compute time the GPU waits for the host, and the GPU figure says so.

A runner prepares a `TimedStep` (the closures `measure` times) per batch size (`export.runner`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from export.runner import TimedStep
from spofa_deploy.errors import UserError


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
    enqueue: Summary | None = None  # host time of each back-to-back enqueue (GPU runners only)
    enqueue_ms: list[float] | None = field(default=None, repr=False)

    @classmethod
    def from_samples(cls, batch: int, host_ms: list[float], gpu_ms: list[float] | None,
                     warmup_iters: int, measured_s: float, rounds: int = 1,
                     enqueue_ms: list[float] | None = None) -> "LatencyStats":
        return cls(batch=batch, iters=len(host_ms), warmup_iters=warmup_iters, measured_s=measured_s,
                   rounds=rounds, host=Summary.of(host_ms), gpu=Summary.of(gpu_ms) if gpu_ms else None,
                   host_ms=list(host_ms), gpu_ms=list(gpu_ms) if gpu_ms else None,
                   enqueue=Summary.of(enqueue_ms) if enqueue_ms else None,
                   enqueue_ms=list(enqueue_ms) if enqueue_ms else None)

    @classmethod
    def pool(cls, parts: list["LatencyStats"]) -> "LatencyStats":
        """Pool interleaved rounds of the same runner and batch into one distribution."""
        if not parts:
            raise ValueError("nothing to pool")
        host = [v for p in parts for v in p.host_ms]
        gpu = [v for p in parts for v in p.gpu_ms] if all(p.gpu_ms for p in parts) else None
        enqueue = [v for p in parts for v in p.enqueue_ms] if all(p.enqueue_ms for p in parts) else None
        return cls.from_samples(parts[0].batch, host, gpu, sum(p.warmup_iters for p in parts),
                                sum(p.measured_s for p in parts), rounds=sum(p.rounds for p in parts),
                                enqueue_ms=enqueue)

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
                "host_latency": self.host.to_dict(), "gpu_compute": self.gpu.to_dict() if self.gpu else None,
                "enqueue": self.enqueue.to_dict() if self.enqueue else None}


# --------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class TimingOptions:
    """How long and how often each runner is timed per batch size (`spofa bench --warmup-s ...`).

    Attributes:
        warmup_s: warm-up time before the first round (at least one iteration).
        min_s, min_iters: both must be reached (over all rounds together).
        rounds: interleaved rounds (student, teacher, student, ...), each 1/rounds of `min_s`
            and `min_iters`, pooled afterwards: slow drift affects every runner alike.
    """

    warmup_s: float = 1.0
    min_s: float = 3.0
    min_iters: int = 50
    rounds: int = 3

    def __post_init__(self):
        if self.warmup_s < 0 or self.min_s < 0:
            raise UserError("--warmup-s and --min-s must be >= 0")
        if self.min_iters < 1:
            raise UserError("--min-iters must be >= 1")
        if self.rounds < 1:
            raise UserError("--rounds must be >= 1")

    def round(self, index: int) -> "TimingOptions":
        """The share of round `index` (0-based): the full warm-up first, then 1/rounds of it to re-warm."""
        return TimingOptions(warmup_s=self.warmup_s if index == 0 else self.warmup_s / self.rounds,
                             min_s=self.min_s / self.rounds, min_iters=max(1, math.ceil(self.min_iters / self.rounds)),
                             rounds=1)


BLOCK = 16  # inferences in flight at most: enough to hide launches, few enough that an enqueue never waits on the queue


def _once(step: TimedStep) -> float:
    """One iteration as a caller runs it (copy in, compute, copy out, wait): host ms."""
    t0 = time.perf_counter_ns()
    if step.copy_in is not None:
        step.copy_in()
    step.compute()
    if step.copy_out is not None:
        step.copy_out()
    if step.sync is not None:
        step.sync()
    return (time.perf_counter_ns() - t0) / 1e6


def back_to_back(compute: Callable[[], object], n: int, *, new_event: Callable[[], object],
                 block: int = BLOCK) -> tuple[list[float], list[float]]:
    """GPU compute and host enqueue time per inference (ms), measured as trtexec does.

    Inferences are enqueued back to back in blocks of `block`, an event recorded on the stream
    after each, and the host waits only at the end of a block. While the GPU runs one inference
    the host enqueues the next, so the interval between consecutive events is one inference's
    GPU time without the host's launch time (unless the host cannot keep up, which the enqueue
    figure then shows). A block's first interval starts on an idle GPU and is dropped.

    Args:
        compute: enqueue one inference on the current stream (a CUDA graph replay or a plain enqueue).
        n: GPU samples wanted (at least one block's worth are taken).
        new_event: a timing event recorded on the current stream (`torch.cuda.Event(enable_timing=True)`).

    Returns:
        (GPU compute ms per inference, host enqueue ms per call).
    """
    if block < 2:
        raise ValueError("block must be >= 2")
    gpu: list[float] = []
    enqueue: list[float] = []
    while len(gpu) < n:
        events = [new_event() for _ in range(block + 1)]
        events[0].record()
        for e in events[1:]:
            t0 = time.perf_counter_ns()
            compute()
            enqueue.append((time.perf_counter_ns() - t0) / 1e6)
            e.record()
        events[-1].synchronize()
        gpu += [float(a.elapsed_time(b)) for a, b in zip(events[1:-1], events[2:])]
    return gpu, enqueue


def measure(step: TimedStep, *, batch: int, timing: TimingOptions) -> LatencyStats:
    """Time `step` like trtexec: warm up by time, then >= `min_s` seconds and >= `min_iters` runs.

    Host latency comes from those runs; on a GPU, GPU compute and enqueue time from as many
    inferences again, enqueued back to back (`back_to_back`).

    Args:
        step: the runner's prepared closures (`Runner.prepare`).
        batch: images per call, for throughput.
        timing: `warmup_s`, `min_s`, `min_iters` (its `rounds` are the caller's: see `TimingOptions.round`).
    """
    if step.cuda_events and not torch.cuda.is_available():
        raise ValueError("cuda_events=True needs a CUDA device")
    ctx = torch.cuda.stream(step.stream) if step.stream is not None else contextlib.nullcontext()
    with ctx:
        if step.cuda_events and step.sync is None:  # wait for the whole stream, copy_out included
            step = replace(step, sync=torch.cuda.current_stream().synchronize)
        warm, t_end = 0, time.perf_counter() + timing.warmup_s
        while warm == 0 or time.perf_counter() < t_end:
            _once(step)
            warm += 1
        host_ms: list[float] = []
        t_start = time.perf_counter()
        while True:
            host_ms.append(_once(step))
            elapsed = time.perf_counter() - t_start
            if len(host_ms) >= timing.min_iters and elapsed >= timing.min_s:
                break
        gpu_ms = enqueue_ms = None
        if step.cuda_events:
            gpu_ms, enqueue_ms = back_to_back(step.compute, len(host_ms),
                                              new_event=lambda: torch.cuda.Event(enable_timing=True))
    return LatencyStats.from_samples(batch, host_ms, gpu_ms, warm, elapsed, enqueue_ms=enqueue_ms)


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


def torch_settings() -> dict:
    """The PyTorch settings that change timings, for the report."""
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
