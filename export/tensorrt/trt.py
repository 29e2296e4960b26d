"""The TensorRT runner: an engine (`TrtEngine`) enqueued on a stream we own."""
from __future__ import annotations

from typing import Callable

import torch

from export.artifact import Artifact
from export.runner import BackendUnavailable, OutputSlot, Runner, TimedStep, cuda_step
from spofa_deploy.errors import MissingDependency, UserError
from spofa_deploy.machine import cuda_skip_reason

from .engine import TrtEngine


class TrtRunner(Runner):
    """A TensorRT engine through `TrtEngine` (`execute_async_v3` on torch CUDA tensors).

    Work is issued on a stream we own, so TensorRT does not run on the legacy default
    stream and the CUDA events bracket only its compute. Once active, `batch_range` is the
    engine's own profile.
    """

    def __init__(self, art: Artifact):
        super().__init__(**self.of_artifact(art), backend="trt", device="cuda")
        self.path = art.path
        self._engine: TrtEngine | None = None
        self._stream = None

    def unavailable(self) -> str | None:
        reason = cuda_skip_reason()
        return f"TensorRT needs a CUDA GPU: {reason}" if reason else None

    def _load(self) -> None:
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(reason)
        try:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._engine = TrtEngine(str(self.path), device=device)
        except MissingDependency as e:  # TensorRT not installed (or no GPU): a missing backend
            raise BackendUnavailable(str(e)) from None
        # Any other UserError (a damaged engine) is the user's to fix: it propagates.
        engine_shape = tuple(int(d) for d in self._engine.input_shape)
        if engine_shape != self.input_shape:
            raise UserError(f"{self.path.name} takes images of shape {engine_shape} but its sidecar says "
                            f"{self.input_shape}: the sidecar does not belong to this engine")
        self.batch_range = (self._engine.min_batch, self._engine.max_batch)
        self._stream = torch.cuda.Stream()

    def _unload(self) -> None:
        self._engine = self._stream = None

    def _compute(self, x_dev: torch.Tensor, stream: int) -> tuple[Callable[[], None], torch.Tensor]:
        """The timed call on the device input `x_dev`, and the buffer it writes the logits into.

        `x_dev` is bound here, once; the call itself only enqueues the engine on `stream` (it
        re-binds only if something else ran this engine in between: an attribute compare).
        """
        engine, ptr = self._engine, x_dev.data_ptr()
        out = engine.bind(x_dev)

        def compute() -> None:
            if engine.input_ptr != ptr:
                engine.bind(x_dev)
            engine.enqueue(stream)

        return compute, out

    def _graphed(self, compute: Callable[[], None], stream) -> Callable[[], None]:
        """`compute` captured in a CUDA graph on `stream` and replayed, as trtexec does; else `compute` itself.

        The launch of a small engine at batch 1 is mostly host enqueue time, which a graph replay
        removes from the GPU figure. Capture runs after `compute` has run once (TensorRT sets up
        on its first enqueue); where it fails (an engine TensorRT cannot capture), the plain
        enqueue is timed and `cuda_graph` says so.
        """
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                compute()
        except Exception:  # noqa: BLE001 - any capture failure: time the plain enqueue instead
            self.cuda_graph = False
            return compute
        self.cuda_graph = True
        return graph.replay

    def _prepare(self, batch: int) -> TimedStep:
        x_host = self.timed_input(batch).to(self._engine.input_dtype).pin_memory()
        x_dev = torch.empty_like(x_host, device=self._engine.device)
        slot = OutputSlot()
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            compute, slot.out = self._compute(x_dev, s.cuda_stream)  # every run writes into slot.out
            compute()
            s.synchronize()
            compute = self._graphed(compute, s)
        s.synchronize()
        return cuda_step(compute, slot, x_host, x_dev, sync=s.synchronize, stream=s)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            out = self._engine(x).float().cpu()  # .cpu() copies out of the cached buffer and waits
        return out

    def release(self) -> None:
        if self._engine is not None:
            self._engine.release()
