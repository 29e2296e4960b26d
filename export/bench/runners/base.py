"""The one shape of a bench runner: `Runner`, and `BackendUnavailable` for a backend missing here."""
from __future__ import annotations

import abc

import torch

from export.bench.target import Artifact
from export.bench.timing import TimedStep, random_input


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message is the reason shown to the user."""


class Runner(abc.ABC):
    """One model on one backend at one precision: what `spofa bench` times and evaluates.

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
    """

    fixed_shapes = False
    seed = 0

    def __init__(self, *, name: str, backend: str, precision: str, device: str, size_bytes: int | None,
                 input_shape: tuple[int, int, int], batch_range: tuple[int, int] | None = None):
        self.name, self.backend, self.precision, self.device = name, backend, precision, device
        self.size_bytes, self.input_shape, self.batch_range = size_bytes, tuple(input_shape), batch_range
        self.compile_seconds: dict[int, float] = {}

    @staticmethod
    def of_artifact(art: Artifact) -> dict:
        """The identity keywords of a runner of a model file (for `__init__`)."""
        return dict(name=art.model, precision=art.precision or "fp32", size_bytes=art.size_bytes,
                    input_shape=art.input_shape, batch_range=art.batch_range)

    def batch_sizes_supported(self, batch: int) -> bool:
        """Whether `batch` can be prepared and called."""
        return batch >= 1 and (self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1])

    def timed_input(self, batch: int) -> torch.Tensor:
        """The reproducible CPU input timed at `batch` (float32, (batch, C, H, W))."""
        return random_input((batch, *self.input_shape), seed=self.seed + batch)

    @abc.abstractmethod
    def prepare(self, batch: int) -> TimedStep:
        """Allocate buffers for `batch`, compile or capture, run once, and return the closures to time."""

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) for a CPU batch, through the same backend, precision and path as the timing."""

    def release(self) -> None:
        """Drop per-batch-size buffers (graphs, bindings) between batch sizes."""
