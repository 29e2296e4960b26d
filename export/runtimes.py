"""The ONNX Runtime and TensorRT runners of `spofa bench`.

Both implement the `Runner` protocol of `spofa_deploy.bench` (where the PyTorch runner
lives): `prepare(batch)` returns the `TimedStep` that `measure` times, `__call__(x)` runs a
CPU batch through the same path for accuracy. On the GPU they issue their work on a
stream they own, so the CUDA events bracket only the compute. A runner that cannot run on
this machine raises `BackendUnavailable`; its message is the reason the report shows.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from export.artifact import Artifact
from spofa_deploy.bench import OutputSlot, TimedStep, cuda_step, random_input
from spofa_deploy.machine import cuda_skip_reason
from spofa_deploy.errors import MissingDependency, UserError

_ORT_TYPES = {"tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16)}


class BackendUnavailable(Exception):
    """The backend cannot run on this machine; the message is the reason shown to the user."""


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


class _ArtifactRunner:
    """What the artifact runners share: the identity of the model file and its accepted batch sizes."""

    fixed_shapes = False

    def _describe(self, art: Artifact) -> None:
        self.name, self.precision, self.size_bytes = art.model, art.precision or "fp32", art.size_bytes
        self.num_classes = int(art.meta["num_classes"])
        self.input_shape = art.input_shape
        self.batch_range = art.batch_range

    def batch_sizes_supported(self, batch: int) -> bool:
        return batch >= 1 and (self.batch_range is None or self.batch_range[0] <= batch <= self.batch_range[1])

    def release(self) -> None:
        pass


class OrtRunner(_ArtifactRunner):
    """An ONNX model in ONNX Runtime, on the CPU provider or on CUDA through IOBinding.

    On CUDA, ORT computes on a torch stream we own (`user_compute_stream`), so the
    host->device copy, the compute (bracketed by CUDA events) and the device->host copy are
    ordered on one stream without extra host synchronisation, and the bound input is
    already on the device when the compute is timed.
    """

    def __init__(self, art: Artifact, provider: str, threads: int | None = None):
        import onnxruntime as ort

        if provider not in ("cpu", "cuda"):
            raise ValueError(provider)
        self.backend, self.device = f"ort-{provider}", provider
        self._describe(art)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; a CUDA fallback is detected and reported below
        if threads:
            so.intra_op_num_threads = threads
        self._stream = None
        if provider == "cuda":
            reason = ort_cuda_reason()
            if reason:
                raise BackendUnavailable(reason)
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
        self._bindings: dict[int, tuple] = {}

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
        x_cpu = random_input((batch, *self.input_shape), seed=batch).to(self._in_torch)
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
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            self.session.run_with_iobinding(io)
        s.synchronize()
        return cuda_step(lambda: self.session.run_with_iobinding(io), slot, x_host, x_dev, sync=s.synchronize, stream=s)

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


class EngineRunner(_ArtifactRunner):
    """A TensorRT engine through `export.tensorrt.TrtRunner` (`execute_async_v3` on torch CUDA tensors).

    Work is issued on a stream we own, so TensorRT does not run on the legacy default
    stream and the CUDA events bracket only its compute.
    """

    backend, device = "trt", "cuda"

    def __init__(self, art: Artifact, trust: bool = False):
        reason = cuda_skip_reason()
        if reason:
            raise BackendUnavailable(f"TensorRT needs a CUDA GPU: {reason}")
        try:
            from export.tensorrt import TrtRunner
        except ImportError as e:
            raise BackendUnavailable(f"the TensorRT runner cannot be imported ({e})") from None
        self._describe(art)
        try:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self._trt = TrtRunner(str(art.path), trust=trust, device=device)
        except MissingDependency as e:  # TensorRT not installed (or no GPU): a missing backend
            raise BackendUnavailable(str(e)) from None
        # Any other UserError (engine from another TensorRT version or GPU) is the user's to fix: it propagates.
        engine_shape = tuple(int(d) for d in self._trt.input_shape)
        if engine_shape != self.input_shape:
            raise UserError(f"{art.path.name} takes images of shape {engine_shape} but its sidecar says "
                            f"{self.input_shape}: the sidecar does not belong to this engine")
        self.batch_range = (self._trt.min_batch, self._trt.max_batch)  # the engine's own profile
        self._stream = torch.cuda.Stream()

    def _compute(self, x_dev: torch.Tensor, stream: int) -> tuple[Callable[[], None], torch.Tensor]:
        """The timed call on the device input `x_dev`, and the buffer it writes the logits into.

        `x_dev` is bound here, once; the call itself only enqueues the engine on `stream` (it
        re-binds only if something else ran this engine in between: an attribute compare).
        """
        trt, ptr = self._trt, x_dev.data_ptr()
        out = trt.bind(x_dev)

        def compute() -> None:
            if trt.input_ptr != ptr:
                trt.bind(x_dev)
            trt.enqueue(stream)

        return compute, out

    def prepare(self, batch: int) -> TimedStep:
        x_host = random_input((batch, *self.input_shape), seed=batch).to(self._trt.input_dtype).pin_memory()
        x_dev = torch.empty_like(x_host, device=self._trt.device)
        slot = OutputSlot()
        s = self._stream
        with torch.cuda.stream(s):
            x_dev.copy_(x_host)
            compute, slot.out = self._compute(x_dev, s.cuda_stream)  # every run writes into slot.out
            compute()
        s.synchronize()
        return cuda_step(compute, slot, x_host, x_dev, sync=s.synchronize, stream=s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.stream(self._stream):
            out = self._trt(x).float().cpu()  # .cpu() copies out of the cached buffer and waits
        return out

    def release(self) -> None:
        self._trt.release()
