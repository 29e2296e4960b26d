"""The AOTInductor runner: a `.pt2` package called from Python."""
from __future__ import annotations

import time

import torch

from export.artifact import Artifact
from export.runner import OutputSlot, Runner, TimedStep, cuda_step
from spofa_deploy.errors import UserError

from . import package


class Pt2Runner(Runner):
    """A `.pt2` package through AOTInductor's runtime.

    CPU: host timing of the call. CUDA: the call is issued on a stream we own (AOTInductor
    runs on the current stream), so the CUDA events bracket only its compute. The package is
    checked against its sidecar and this machine where it is described (`export.pt2.describe`);
    activating the runner loads it (`package.load_pt2`, which refuses a package of another device).

    Attributes:
        load_seconds: time to load the package (its compile time is in the sidecar, `compile_seconds`,
            measured at export).
    """

    def __init__(self, art: Artifact, *, device: str | None = None):
        """Args:
            art: the package (its sidecar in `art.meta`).
            device: where to run (default: the device the package was built for).
        """
        super().__init__(**self.of_artifact(art), backend="aoti", device=device or art.meta.get("device", "cpu"))
        self.path = art.path
        self.load_seconds = 0.0
        self._fn = self._stream = None

    def _load(self) -> None:
        t0 = time.perf_counter()
        self._fn = package.load_pt2(self.path, self.device)
        self.load_seconds = time.perf_counter() - t0
        self._stream = torch.cuda.Stream() if self.device == "cuda" else None

    def _unload(self) -> None:
        self._fn = self._stream = None

    def _check(self, x: torch.Tensor) -> None:
        # AOTInductor does not check shapes at run time: a wrong one reads out of bounds.
        if not self.batch_sizes_supported(int(x.shape[0])):
            lo, hi = self.batch_range
            raise UserError(f"batch {x.shape[0]} is outside {self.name}'s .pt2 range {lo}..{hi} "
                            "(re-export with --dynamic-batch MIN:OPT:MAX)")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise UserError(f"the .pt2 takes images of shape {tuple(self.input_shape)}, got {tuple(x.shape[1:])}")

    def _prepare(self, batch: int) -> TimedStep:
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

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if self.device == "cpu":
            return self._fn(x.float().contiguous()).float()
        with torch.cuda.stream(self._stream):
            out = self._fn(x.to("cuda", torch.float32).contiguous()).float().cpu()
        self._stream.synchronize()
        return out
