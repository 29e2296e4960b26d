"""ONNX -> TensorRT engine (TensorRT 10 and 11) and `TrtRunner` for built engines.

The version-dependent part is one decision, made once (`trt_major()`):
- TensorRT 10.x: weakly typed network; reduced precision from builder flags (FP16, BF16;
  INT8 = the Q/DQ ONNX plus the INT8 flag).
- TensorRT >= 11: networks are always strongly typed (the builder precision flags are gone):
  precision comes from the ONNX itself (FP16/BF16 via ModelOpt AutoCast, INT8 via Q/DQ).
  `onnx_precision_for` tells the exporter which ONNX to feed.

`import tensorrt` happens only inside the functions that need it, so this module imports
everywhere; where TensorRT or a GPU is missing they raise `MissingDependency`.
An engine is GPU code: `TrtRunner` refuses an engine without its sidecar unless trust=True,
and refuses one built by another TensorRT version or for another GPU.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch

from spofa_deploy.artifacts import atomic_path, read_json, sidecar_path
from spofa_deploy.errors import MissingDependency, UserError

from .onnx import BatchProfile

_log = logging.getLogger(__name__)

TRT_MISSING = "TensorRT is not installed: pip install 'spofa-deploy[trt]' on a machine with an NVIDIA GPU"
NO_GPU = "no CUDA GPU is visible: TensorRT builds and runs engines on an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
DEFAULT_WORKSPACE_GIB = 4.0
_BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}  # TensorRT 10 only


def import_tensorrt():
    """The `tensorrt` module, or MissingDependency with the install command."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependency(TRT_MISSING) from e
    return trt


@functools.lru_cache(maxsize=None)
def trt_major() -> int:
    """Major version of the installed TensorRT (detected once per process)."""
    return int(str(import_tensorrt().__version__).split(".")[0])


def strongly_typed() -> bool:
    """True where precision must come from the ONNX (TensorRT >= 11)."""
    return trt_major() >= 11


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise MissingDependency(NO_GPU)


def gpu_info(device: int = 0) -> dict:
    """Name and compute capability of a CUDA device, as stored in engine sidecars."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def onnx_precision_for(precision: str) -> str:
    """Precision the ONNX fed to TensorRT must carry for an engine of `precision`."""
    if precision == "int8":
        return "int8"  # Q/DQ graph on every version
    if precision in ("fp16", "bf16") and strongly_typed():
        return precision  # AutoCast graph: TensorRT 11 has no FP16/BF16 builder flags
    return "fp32"


def default_timing_cache() -> Path:
    """Timing cache reused across builds (`SPOFA_TRT_TIMING_CACHE` overrides it)."""
    return Path(os.environ.get("SPOFA_TRT_TIMING_CACHE", "~/.cache/spofa/trt-timing.cache")).expanduser()


def _parser_error(err) -> str:
    """One line per parser error: operator, node name, description."""
    where = []
    for attr in ("node_operator", "node_name"):  # absent in some bindings: the message just gets shorter
        with contextlib.suppress(AttributeError, TypeError, RuntimeError):
            value = getattr(err, attr)()
            if value:
                where.append(str(value))
    desc = err.desc() if hasattr(err, "desc") else str(err)
    return f"{' '.join(where)}: {desc}" if where else desc


def _network_flags(trt) -> int:
    if trt_major() < 11:
        return 0  # weakly typed; precision from builder flags
    # Always strongly typed on 11; the flag is accepted (and ignored) for compatibility.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _attach_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a cache from another TensorRT version or a damaged file: start afresh
        _log.warning("ignoring unreadable TensorRT timing cache %s", path)
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # built on another GPU or TensorRT
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    except (OSError, UserError) as e:
        return f"could not save the TensorRT timing cache {path}: {e}"
    return None


def build_engine(onnx_path: Path, engine_path: Path, precision: str, batch: BatchProfile, *,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, timing_cache: Path | None = None) -> dict:
    """Build a serialized engine from an ONNX file with the TensorRT Python API.

    Args:
        onnx_path: the ONNX (fp32; Q/DQ for int8; AutoCast fp16/bf16 on TensorRT >= 11).
        engine_path: where to write the plan (the caller makes it atomic).
        precision: fp32 | fp16 | bf16 | int8.
        batch: the optimisation profile for a dynamic-batch ONNX (min/opt/max).
        workspace_gib: builder workspace memory-pool limit.
        timing_cache: timing cache file, read before and updated after the build (None: off).

    Returns:
        Metadata for the sidecar: tensorrt version, gpu, compute_capability, strongly_typed, ...

    Raises:
        MissingDependency: no TensorRT or no GPU.
        UserError: the parser rejects the ONNX (one line per parser error) or the build fails.
    """
    trt = import_tensorrt()
    require_gpu()
    info = gpu_info()
    if precision == "bf16" and float(info["compute_capability"]) < 8.0:
        raise UserError(f"bf16 needs compute capability >= 8.0; {info['gpu']} has {info['compute_capability']}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no parser message)"]
        raise UserError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}:\n" + "\n".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if trt_major() < 11 and precision in _BUILDER_FLAGS:
        config.set_flag(getattr(trt.BuilderFlag, _BUILDER_FLAGS[precision]))

    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if shape and shape[0] == -1:
        profile = builder.create_optimization_profile()
        chw = shape[1:]
        profile.set_shape(inp.name, (batch.min, *chw), (batch.opt, *chw), (batch.max, *chw))
        config.add_optimization_profile(profile)
    elif batch.dynamic:
        raise UserError(f"{onnx_path.name} has a fixed batch of {shape[0]}: export it with --dynamic-batch")
    _attach_timing_cache(config, timing_cache)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
                        f"({precision}); its log above says why")
    with open(engine_path, "wb") as f:
        f.write(plan)
    warning = _save_timing_cache(config, timing_cache)
    return {"tensorrt": str(trt.__version__), **info, "strongly_typed": trt_major() >= 11,
            "workspace_gib": workspace_gib, "build_seconds": round(time.perf_counter() - start, 2),
            "timing_cache": str(timing_cache) if timing_cache else None,
            "warnings": [warning] if warning else []}


# ---------------------------------------------------------------------------------- runtime

def read_engine_meta(path: Path, trust: bool = False) -> dict:
    """The engine's sidecar; a missing one is refused unless `trust`."""
    side = sidecar_path(path)
    if not side.is_file():
        if trust:
            return {}
        raise UserError(f"{path} has no sidecar {side.name}: refusing to load an engine of unknown origin "
                        "(an engine is code for the GPU; pass trust=True only for engines you built)")
    meta = read_json(side)
    if meta.get("format", "trt") != "trt":
        raise UserError(f"{side.name} describes a '{meta.get('format')}' artifact, not a TensorRT engine")
    return meta


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


class TrtRunner:
    """Run a TensorRT engine on torch CUDA tensors (`execute_async_v3`, `set_tensor_address`).

    Attributes:
        batch: the optimisation profile's {"min", "opt", "max"} batch (all equal for a fixed batch).
        input_name, output_name: I/O tensor names (`images`, `logits` for spofa exports).
        meta: the engine's sidecar ({} when loaded with trust=True and none exists).
    """

    def __init__(self, engine: str | Path, *, trust: bool = False, device: int = 0):
        """Load an engine after checking its sidecar against this machine.

        Args:
            engine: the `.engine` file.
            trust: load even without a sidecar (only for engines you built yourself).
            device: CUDA device index.
        """
        path = Path(engine)
        if not path.is_file():
            raise UserError(f"engine not found: {path}")
        self.meta = read_engine_meta(path, trust)
        trt = import_tensorrt()
        require_gpu()
        self.device = torch.device("cuda", device)
        check_engine_meta(self.meta, {"tensorrt": trt.__version__, **gpu_info(device)}, path)
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
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.input_shape = shape[1:]
        if shape[0] == -1:
            lo, opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            self.batch = {"min": lo[0], "opt": opt[0], "max": hi[0]}
        else:
            self.batch = {"min": shape[0], "opt": shape[0], "max": shape[0]}

    @property
    def min_batch(self) -> int:
        return self.batch["min"]

    @property
    def max_batch(self) -> int:
        return self.batch["max"]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch (N, C, H, W), enqueued on the current CUDA stream (no sync).

        Raises:
            UserError: batch size outside the engine's profile, or wrong image shape.
        """
        n = int(images.shape[0])
        if not self.min_batch <= n <= self.max_batch:
            raise UserError(f"batch {n} is outside the engine's profile {self.min_batch}..{self.max_batch} "
                            f"(opt {self.batch['opt']}): re-export with --dynamic-batch MIN:OPT:MAX")
        if tuple(images.shape[1:]) != tuple(self.input_shape):
            raise UserError(f"the engine takes images of shape {tuple(self.input_shape)}, got {tuple(images.shape[1:])}")
        x = images.to(self.device, self._dtypes[self.input_name]).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise UserError(f"TensorRT rejected input shape {tuple(x.shape)}")
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs = {}
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs[self.output_name]
