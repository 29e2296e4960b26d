"""The home of the torch format (`export.formats`): the trained `.safetensors` weights, run by PyTorch eagerly,
through `torch.compile` (as deployed), or by CUDA-graph replay. Every export starts from one; none makes one."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from export.artifact import Artifact, read_sidecar
from export.formats import FORMATS
from export.runner import BackendUnavailable, OutputSlot, Runner, RunOptions, TimedStep, cuda_step
from spofa_deploy.errors import UserError
from spofa_deploy.machine import cuda_skip_reason

if TYPE_CHECKING:
    from export.exporter import ExportJob
    from export.options import ExportOptions

TORCH_BACKENDS = FORMATS["torch"].backends
TORCH_PRECISIONS = FORMATS["torch"].precisions
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch-compile's mode where none is given: CUDA graphs on a GPU (launch-bound at small batch), plain inductor on CPU.
DEFAULT_COMPILE_MODE = {"cuda": "reduce-overhead", "cpu": "default"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs
# Inductor settings patched in while torch-compile traces and compiles (never left on): frozen
# weights become constants of the graph, so BatchNorm folds into the convolutions, weight casts
# fold away and CPU weights are prepacked for oneDNN. Dynamo reads `freezing` while tracing,
# so it must be the global config at that moment: `torch.compile(options=...)` is too late.
COMPILE_CONFIG = {"freezing": True}


# ------------------------------------------------------------------------------ the format's protocol

def check_export(options: "ExportOptions") -> None:
    """PyTorch weights are the source of exports, not one of them."""
    raise UserError("a .safetensors model is the source of an export, not its result")


def export(job: "ExportJob") -> None:
    """PyTorch weights are the source of exports, not one of them."""
    raise UserError("a .safetensors model is the source of an export, not its result")


def describe(path: Path, trust: bool = False) -> Artifact:
    """A `.safetensors` model and its sidecar (`spofa distill`'s metadata), its digest checked unless `trust`."""
    meta = read_sidecar(path, "torch", trust=trust)
    return Artifact(path=path, format="torch", meta=meta, precision=None, size_bytes=path.stat().st_size,
                    batch_range=None, source=path)


def runner(art: Artifact, backend: str, device: str, precision: str, options: RunOptions) -> "TorchRunner":
    """The model of `art` (loaded when the runner is activated) on a torch backend at an autocast `precision`."""
    return TorchRunner(lambda: _load(art, options.trust), backend=backend, device=device, precision=precision,
                       img_size=art.img_size, in_chans=art.in_chans, name=art.model, size_bytes=art.size_bytes,
                       compile_mode=options.compile_mode)


def _load(art: Artifact, trust: bool) -> nn.Module:
    from spofa_deploy.artifacts import load_model

    return load_model(art.path, trust=trust)[0]


# ------------------------------------------------------------------------------ the runner

def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what a safetensors file would hold)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


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


class TorchRunner(Runner):
    """A PyTorch model run eagerly, through `torch.compile`, or by CUDA-graph replay.

    On GPU the model and inputs are channels_last (faster convolutions, see the anchors);
    reduced precision is autocast (`bf16`/`fp16`) with fp32 weights, as users run it.
    torch-compile is compiled as deployed: inference mode, frozen weights (BatchNorm folded,
    `COMPILE_CONFIG`), static shapes, CUDA graphs on a GPU ("reduce-overhead") unless
    `compile_mode` says otherwise. `compile_seconds` holds, per batch size, the first call
    (compile + one run) of torch-compile or the graph capture of torch-cudagraph.

    Args:
        model: the model, or a function that loads it (called by `activate`).
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], *, backend: str = "torch-eager",
                 device: str = "cpu", precision: str = "fp32", img_size: int = 224, in_chans: int = 3,
                 name: str | None = None, size_bytes: int | None = None, compile_mode: str | None = None,
                 seed: int = 0):
        if backend not in TORCH_BACKENDS:
            raise ValueError(f"unknown torch backend {backend}")
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"torch backends run {', '.join(TORCH_PRECISIONS)}, not {precision}")
        if backend == "torch-cudagraph" and device != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        given = isinstance(model, nn.Module)
        if size_bytes is None and given:
            size_bytes = state_dict_bytes(model)
        super().__init__(name=name or (type(model).__name__ if given else "model"), backend=backend,
                         precision=precision, device=device, size_bytes=size_bytes,
                         input_shape=(in_chans, img_size, img_size))
        self._source = model
        self.fixed_shapes = backend != "torch-eager"
        self.seed = seed
        self._memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
        self.compile_mode = check_compile_mode(compile_mode, device) if backend == "torch-compile" else None
        self.model: nn.Module | None = None
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def unavailable(self) -> str | None:
        reason = cuda_skip_reason() if self.device == "cuda" else None
        return f"{self.backend} needs a CUDA GPU: {reason}" if reason else None

    def _load(self) -> None:
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(reason)
        model = self._source if isinstance(self._source, nn.Module) else self._source()
        self.model = model.eval().to(device=self.device, memory_format=self._memory_format)
        self._fn = self.model
        if self.backend == "torch-compile":
            # Static shapes: one specialised graph per batch size (dynamic=False), as deployed.
            self._fn = torch.compile(self.model, mode=self.compile_mode, dynamic=False)

    def _unload(self) -> None:
        self.model = self._fn = None

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

    def _prepare(self, batch: int) -> TimedStep:
        x_cpu = self.timed_input(batch)
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
        # torch-compile replays CUDA graphs in the modes that use them (its CUDA-graph trees).
        self.cuda_graph = self.backend == "torch-cudagraph" or self.compile_mode in CUDA_GRAPH_MODES
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

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
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
