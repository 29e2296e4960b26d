"""The ONNX Runtime runner: the CPU provider, or CUDA through IOBinding on a stream we own."""
from __future__ import annotations

import numpy as np
import torch

from export.artifact import Artifact
from export.runner import BackendUnavailable, OutputSlot, Runner, RunOptions, TimedStep, cuda_step
from spofa_deploy.errors import UserError
from spofa_deploy.machine import cuda_skip_reason

from . import graph

_ORT_TYPES = {"tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16)}


def ort_cuda_reason() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when it can."""
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


def unsynchronised_run():
    """Run options that keep ONNX Runtime from synchronising its CUDA stream after each run (it does by default):
    on our own stream, the caller synchronises, so back-to-back timed runs queue without the host in between."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return opts


class OrtRunner(Runner):
    """An ONNX model in ONNX Runtime, on the CPU provider or on CUDA through IOBinding.

    On CUDA, ORT computes on a torch stream we own (`user_compute_stream`), so the
    host->device copy, the compute (bracketed by CUDA events) and the device->host copy are
    ordered on one stream without extra host synchronisation (`unsynchronised_run`), and the bound
    input is already on the device when the compute is timed.
    """

    def __init__(self, art: Artifact, provider: str, options: RunOptions = RunOptions()):
        if provider not in ("cpu", "cuda"):
            raise ValueError(provider)
        super().__init__(**self.of_artifact(art), backend=f"ort-{provider}", device=provider)
        self.path, self.options = art.path, options
        self.num_classes = int(art.meta["num_classes"])
        self.session = self._stream = None
        self._device_id = 0
        self._bindings: dict[int, tuple] = {}

    def unavailable(self) -> str | None:
        return ort_cuda_reason() if self.device == "cuda" else None

    def _load(self) -> None:
        reason = self.unavailable()
        if reason:
            raise BackendUnavailable(reason)
        if self.device == "cuda":
            self._device_id = torch.cuda.current_device()
            self._stream = torch.cuda.Stream()
        o = self.options
        # Timed like a deployment by default: ORT's own thread behaviour (spinning), full graph optimisation.
        self.session = graph.ort_session(self.path, fused=o.fused, threads=o.threads, provider=self.device,
                                         device_id=self._device_id, spin=o.spin,
                                         cuda_stream=self._stream.cuda_stream if self._stream is not None else None)
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable("onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing or "
                                     "of another major version); ort-cpu runs this model")
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type not in _ORT_TYPES or out.type not in _ORT_TYPES:
            raise UserError(f"{self.path.name} has {inp.type} input / {out.type} output; spofa bench feeds float32 or float16")
        self._in_name, self._out_name = inp.name, out.name
        self._in_np, self._in_torch = _ORT_TYPES[inp.type]
        self._out_np, self._out_torch = _ORT_TYPES[out.type]

    def _unload(self) -> None:
        self.session = self._stream = None

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

    def _prepare(self, batch: int) -> TimedStep:
        x_cpu = self.timed_input(batch).to(self._in_torch)
        slot = OutputSlot()
        if self.device == "cpu":
            feed = {self._in_name: x_cpu.numpy()}

            def compute() -> None:
                slot.out = self.session.run([self._out_name], feed)[0]

            compute()
            return TimedStep(compute=compute)
        io, x_dev, out_dev = self._binding(batch)
        x_host = x_cpu.pin_memory()
        slot.out = out_dev  # IOBinding writes every output into this buffer
        s, run = self._stream, unsynchronised_run()
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            self.session.run_with_iobinding(io, run)
        s.synchronize()
        return cuda_step(lambda: self.session.run_with_iobinding(io, run), slot, x_host, x_dev, sync=s.synchronize,
                         stream=s)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
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
