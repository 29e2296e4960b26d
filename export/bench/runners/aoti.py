"""The AOTInductor runner: a `.pt2` package (`export.pt2`) called from Python."""
from __future__ import annotations

import time

import torch

from export.bench.target import Artifact
from export.bench.timing import OutputSlot, TimedStep, cuda_step
from export.pt2 import load_checked
from spofa_deploy.errors import UserError

from .base import Runner


class Pt2Runner(Runner):
    """A `.pt2` package through AOTInductor's runtime.

    CPU: host timing of the call. CUDA: the call is issued on a stream we own (AOTInductor
    runs on the current stream), so the CUDA events bracket only its compute.

    Attributes:
        load_seconds: time to check and load the package (its compile time is in the sidecar,
            `compile_seconds`, measured at export).
    """

    def __init__(self, art: Artifact, *, device: str | None = None):
        """Check the package against its sidecar and this machine, and load it (`export.pt2.load_checked`).

        Args:
            art: the resolved artifact (sidecar in `art.meta`).
            device: where to run (default: the device the package was built for).
        """
        t0 = time.perf_counter()
        self._fn, device = load_checked(art.path, art.meta, device)
        self.load_seconds = time.perf_counter() - t0
        super().__init__(**self.of_artifact(art), backend="aoti", device=device)
        self._stream = torch.cuda.Stream() if device == "cuda" else None

    def _check(self, x: torch.Tensor) -> None:
        # AOTInductor does not check shapes at run time: a wrong one reads out of bounds.
        if not self.batch_sizes_supported(int(x.shape[0])):
            lo, hi = self.batch_range
            raise UserError(f"batch {x.shape[0]} is outside {self.name}'s .pt2 range {lo}..{hi} "
                            "(re-export with --dynamic-batch MIN:OPT:MAX)")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise UserError(f"the .pt2 takes images of shape {tuple(self.input_shape)}, got {tuple(x.shape[1:])}")

    def prepare(self, batch: int) -> TimedStep:
        x_cpu = self.timed_input(batch)
        self._check(x_cpu)
        slot = OutputSlot()
        if self.device == "cpu":

            def compute() -> None:
                slot.out = self._fn(x_cpu)

            compute()
            return TimedStep(compute=compute)
        x_host = x_cpu.pin_memory()
        x_dev = torch.empty_like(x_host, device="cuda")
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            slot.out = self._fn(x_dev)
        s.synchronize()

        def compute() -> None:
            slot.out = self._fn(x_dev)

        return cuda_step(compute, slot, x_host, x_dev, sync=s.synchronize, stream=s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) for a CPU batch."""
        self._check(x)
        if self.device == "cpu":
            return self._fn(x.float().contiguous()).float()
        with torch.cuda.stream(self._stream):
            out = self._fn(x.to("cuda", torch.float32).contiguous()).float().cpu()
        self._stream.synchronize()
        return out
