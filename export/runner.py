"""The one shape of a runner: one model on one backend at one precision, what `spofa bench` times and what an
export's parity check and accuracy gate run (`Runner.logits`).

Lifecycle (like Polygraphy's activate / deactivate): making a runner is cheap and loads nothing;
`activate` loads the model (a session, an engine, a package, weights on a device), `prepare(batch)`
sets up one batch size and returns the closures `spofa bench` times (`TimedStep`), `release` drops
what `prepare` made, `deactivate` drops everything. `with runner:` activates and deactivates.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from export.artifact import Artifact
from export.parity import padded_chunks


@dataclass(frozen=True)
class RunOptions:
    """How a runner runs its model, beyond backend and device.

    Attributes:
        threads: CPU threads of ONNX Runtime (None: its default).
        compile_mode: `torch.compile` mode of torch-compile (None: the device's default).
        trust: run a file whose sidecar is missing or whose bytes differ from it (`--trust`).
        fused: ONNX Runtime's full graph optimisation; False runs a Q/DQ graph as written.
        spin: ONNX Runtime's idle threads spin, as deployed (timing); off for checks and evaluations.
    """

    threads: int | None = None
    compile_mode: str | None = None
    trust: bool = False
    fused: bool = True
    spin: bool = True


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message is the reason shown to the user."""


@dataclass
class TimedStep:
    """What `export.bench.timing.measure` times for one batch: closures prepared by a runner.

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


def random_input(shape: tuple, seed: int) -> torch.Tensor:
    """A reproducible standard-normal CPU tensor: the timed input of every runner."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Runner(abc.ABC):
    """One model on one backend at one precision.

    Attributes:
        name: model name (timm name) for tables.
        backend: a backend of `export.formats.FORMATS` ("torch-eager", "ort-cpu", "trt", "aoti", ...).
        precision: "fp32", "bf16", "fp16", "int8".
        device: "cpu" or "cuda".
        size_bytes: size on disk of the artifact (state-dict bytes for in-memory models).
        input_shape: (C, H, W) of one image.
        batch_range: (min, max) batch sizes accepted, None for any.
        fixed_shapes: True when a new batch size is expensive (compile / graph capture), so
            accuracy evaluation pads the last batch instead of running a new size.
        compile_seconds: per batch size, compile or graph-capture time spent in `prepare` or a
            first call, kept out of the latency (empty for backends that compile nothing here).
        seed: the timed input of batch b is `random_input(..., seed + b)`.
        cuda_graph: whether the last `prepare` replays a CUDA graph (None: not on a GPU, or not prepared).
    """

    fixed_shapes = False
    seed = 0
    cuda_graph: bool | None = None

    def __init__(self, *, name: str, backend: str, precision: str, device: str, size_bytes: int | None,
                 input_shape: tuple[int, int, int], batch_range: tuple[int, int] | None = None):
        self.name, self.backend, self.precision, self.device = name, backend, precision, device
        self.size_bytes, self.input_shape, self.batch_range = size_bytes, tuple(input_shape), batch_range
        self.compile_seconds: dict[int, float] = {}
        self.active = False

    @staticmethod
    def of_artifact(art: Artifact) -> dict:
        """The identity keywords of a runner of a model file (for `__init__`)."""
        return dict(name=art.model, precision=art.precision or "fp32", size_bytes=art.size_bytes,
                    input_shape=art.input_shape, batch_range=art.batch_range)

    def unavailable(self) -> str | None:
        """Why the backend cannot run here, found without loading anything (None: it may run)."""
        return None

    def activate(self) -> None:
        """Load the model (once).

        Raises:
            BackendUnavailable: the backend turned out to be missing here (the reason is the message).
            UserError: the file cannot run here (another TensorRT, torch or device built it, ...).
        """
        if not self.active:
            self._load()
            self.active = True

    def deactivate(self) -> None:
        """Drop the loaded model and every buffer."""
        if self.active:
            self.release()
            self._unload()
            self.active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _load(self) -> None:
        """The work of `activate`."""

    def _unload(self) -> None:
        """The work of `deactivate`, after `release`."""

    def batch_sizes_supported(self, batch: int) -> bool:
        """Whether `batch` can be prepared and called."""
        return batch >= 1 and (self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1])

    def timed_input(self, batch: int) -> torch.Tensor:
        """The reproducible CPU input timed at `batch` (float32, (batch, C, H, W))."""
        return random_input((batch, *self.input_shape), seed=self.seed + batch)

    def prepare(self, batch: int) -> TimedStep:
        """Allocate buffers for `batch`, compile or capture, run once, and return the closures to time
        (activating the runner first where it is not)."""
        self.activate()
        return self._prepare(batch)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) for a CPU batch, through the same backend, precision and path as the timing."""
        self.activate()
        return self._infer(x)

    @abc.abstractmethod
    def _prepare(self, batch: int) -> TimedStep:
        """The work of `prepare` on an active runner."""

    @abc.abstractmethod
    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """The work of `__call__` on an active runner."""

    def release(self) -> None:
        """Drop per-batch-size buffers (graphs, bindings) between batch sizes."""

    def logits(self, images: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Float32 logits of `images` (N, C, H, W float32) through `__call__`, in chunks within the batch range;
        a chunk below the range's minimum (a fixed batch, or the last chunk) is padded and the padding dropped."""
        if len(images) == 0:
            raise ValueError("logits of no images")
        self.activate()  # (an engine's batch range is its own profile, read as it loads)
        lo, hi = self.batch_range or (1, chunk)
        outs = [self(torch.from_numpy(x))[:n].float().numpy() for x, n in padded_chunks(images, lo, hi, chunk)]
        return np.concatenate(outs).astype(np.float32)
