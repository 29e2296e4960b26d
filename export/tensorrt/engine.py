"""A built TensorRT engine: `TrtEngine` runs it on torch CUDA tensors; `check_engine_meta` holds its sidecar
against this machine (an engine runs only with the TensorRT version and on the GPU that built it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spofa_deploy.errors import UserError

from . import build


def check_engine_meta(meta: dict, here: dict, path: Path) -> None:
    """Refuse an engine whose sidecar names another TensorRT version or GPU than `here`.

    Args:
        meta: the engine's sidecar (keys tensorrt, gpu, compute_capability).
        here: the same keys for this machine.
        path: the engine, for messages.
    """
    built = meta.get("tensorrt")
    if built and str(built) != str(here["tensorrt"]):
        raise UserError(f"{path.name} was built with TensorRT {built} but TensorRT {here['tensorrt']} is installed: "
                        "an engine runs only with the TensorRT version that built it (rebuild it with "
                        "`spofa export --format trt`)")
    gpu, cc = meta.get("gpu"), meta.get("compute_capability")
    if (gpu and gpu != here["gpu"]) or (cc and str(cc) != str(here["compute_capability"])):
        raise UserError(f"{path.name} was built for {gpu} (compute capability {cc}) but this GPU is {here['gpu']} "
                        f"(compute capability {here['compute_capability']}): rebuild it here with "
                        "`spofa export --format trt`")


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, tdtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return tdtype
    raise UserError(f"engine I/O type {dtype} has no torch equivalent")


class TrtEngine:
    """Run a TensorRT engine on torch CUDA tensors (`execute_async_v3`, `set_tensor_address`).

    The I/O binding is cached: `bind` sets the input shape and the output addresses only when
    the batch size changes (one output buffer per batch size, reused), and the input address
    only when the input tensor changes, so repeated `enqueue` calls do no other host work.
    Outputs are the cached buffers: a call's result is overwritten by the next call of the
    same batch size.

    Attributes:
        batch: the optimisation profile's {"min", "opt", "max"} batch (all equal for a fixed batch).
        input_name, output_name: I/O tensor names (`images`, `logits` for spofa exports).
        input_dtype: the torch dtype the engine's input binding takes.
    """

    def __init__(self, engine: str | Path, *, device: int = 0):
        """Load an engine (checked against its sidecar and this machine where it was described:
        `export.tensorrt.describe`).

        Args:
            engine: the `.engine` file.
            device: CUDA device index.
        """
        path = Path(engine)
        if not path.is_file():
            raise UserError(f"engine not found: {path}")
        trt = build.import_tensorrt()
        build.require_gpu()
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise UserError(f"TensorRT {trt.__version__} could not deserialize {path.name} (damaged or foreign file)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not self.output_names:
            raise UserError(f"{path.name} has inputs {inputs} and outputs {self.output_names}: expected one image input")
        self.input_name = inputs[0]
        self.output_name = "logits" if "logits" in self.output_names else self.output_names[0]
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.input_dtype = self._dtypes[self.input_name]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_shape = shape[1:]
        profiles = int(getattr(self.engine, "num_optimization_profiles", 1)) if shape[0] == -1 else 1
        # The opt batch of each profile; `bind` picks the nearest one for the batch it runs.
        self._opts = [int(self.engine.get_tensor_profile_shape(self.input_name, i)[1][0]) for i in range(profiles)] \
            if shape[0] == -1 else [int(shape[0])]
        profile = self.engine.get_tensor_profile_shape(self.input_name, 0) if shape[0] == -1 else [shape] * 3
        self.batch = dict(zip(("min", "opt", "max"), (int(s[0]) for s in profile)))
        self.profile = 0  # the profile the context runs
        self._outputs: dict[int, dict[str, torch.Tensor]] = {}  # per batch size
        self._shape_batch: int | None = None  # the batch size the context's input shape is set to
        self.input_ptr: int | None = None  # the device address bound as the input

    @property
    def min_batch(self) -> int:
        return self.batch["min"]

    @property
    def max_batch(self) -> int:
        return self.batch["max"]

    def bind(self, x: torch.Tensor) -> torch.Tensor:
        """Make `x` the engine's input; returns the output tensor the next `enqueue` writes.

        Args:
            x: contiguous (N, C, H, W) tensor of `input_dtype` on the engine's device, with N in
                the profile (checked by `__call__`, not here). It must stay alive while bound.

        Raises:
            UserError: TensorRT rejects the input shape.
        """
        n = int(x.shape[0])
        if n != self._shape_batch:
            self._use_profile(self.profile_for(n))
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise UserError(f"TensorRT rejected input shape {tuple(x.shape)}")
            outs = self._outputs.get(n)
            if outs is None:
                outs = self._outputs[n] = {
                    name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name],
                                      device=x.device)
                    for name in self.output_names}
            for name, out in outs.items():
                self.context.set_tensor_address(name, out.data_ptr())
            self._shape_batch = n
        ptr = x.data_ptr()
        if ptr != self.input_ptr:
            self.context.set_tensor_address(self.input_name, ptr)
            self.input_ptr = ptr
        return self._outputs[n][self.output_name]

    def profile_for(self, n: int) -> int:
        """The profile whose opt batch is nearest `n` (by ratio: batch 16 is nearer 1 than 256)."""
        return min(range(len(self._opts)), key=lambda i: abs(np.log(n / self._opts[i])))

    def _use_profile(self, index: int) -> None:
        if index == self.profile:
            return
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.set_optimization_profile_async(index, stream):
            raise UserError(f"TensorRT refused optimisation profile {index}")
        self.profile = index
        self.input_ptr = None  # the caller sets the input shape next; every address is set again

    def enqueue(self, stream: int) -> None:
        """Run the engine on the bound tensors, on the CUDA stream handle `stream` (no sync)."""
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch (N, C, H, W), enqueued on the current CUDA stream (no sync).

        The result is the cached output buffer of this batch size (see the class doc).

        Raises:
            UserError: batch size outside the engine's profile, or wrong image shape.
        """
        n = int(images.shape[0])
        if not self.min_batch <= n <= self.max_batch:
            raise UserError(f"batch {n} is outside the engine's profile {self.min_batch}..{self.max_batch} "
                            f"(opt {self.batch['opt']}): re-export with --dynamic-batch MIN:OPT:MAX")
        if tuple(images.shape[1:]) != tuple(self.input_shape):
            raise UserError(f"the engine takes images of shape {tuple(self.input_shape)}, got {tuple(images.shape[1:])}")
        x = images.to(self.device, self.input_dtype).contiguous()
        out = self.bind(x)
        self.enqueue(torch.cuda.current_stream(self.device).cuda_stream)
        return out

    def release(self) -> None:
        """Drop the cached output buffers (the next call re-binds)."""
        self._outputs.clear()
        self._shape_batch = self.input_ptr = None
