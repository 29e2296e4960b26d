"""ONNX -> TensorRT engine (TensorRT 10 and 11): the builder, and the installed TensorRT and GPU.

The version-dependent part is one decision, `strongly_typed(precision)`:
- TensorRT >= 11: networks are always strongly typed (the builder precision flags are gone):
  precision comes from the ONNX itself (FP16/BF16 via ModelOpt AutoCast, INT8 via Q/DQ).
  No network flag is passed: STRONGLY_TYPED is "deprecated in 11.0 ... retained for API
  compatibility but ignored".
- TensorRT 10.12 .. 10.x, where the precision builder flags are deprecated ("superseded by strong
  typing"): the same strongly typed route (STRONGLY_TYPED network flag, no precision flags) for
  fp32 and int8 (the Q/DQ ONNX carries its precision), and for fp16/bf16 when ModelOpt AutoCast
  is installed to write that ONNX; without it fp16/bf16 keep the (deprecated, working) flags.
- TensorRT < 10.12: weakly typed network, reduced precision from builder flags (FP16, BF16;
  INT8 = the Q/DQ ONNX plus the INT8 and FP16 flags).
`onnx_precision_for` tells the exporter which ONNX to feed; the sidecar records `strongly_typed`.

`import tensorrt` happens only inside the functions that need it, so this module imports
everywhere; where TensorRT or a GPU is missing they raise `MissingDependency`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import torch

from export.artifact import BatchProfile
from export.onnx.graph import require_autocast
from spofa_deploy.artifacts import atomic_path
from spofa_deploy.errors import MissingDependency, UserError

_log = logging.getLogger(__name__)

TRT_MISSING = "TensorRT is not installed: pip install 'tensorrt>=10' on a machine with an NVIDIA GPU"
NO_GPU = "no CUDA GPU is visible: TensorRT builds and runs engines on an NVIDIA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
DEFAULT_WORKSPACE_GIB = 4.0
# Parity tolerance of an engine whose fp32 layers may run TF32: products of 10-bit mantissas
# (relative error ~1e-3 per product, summed over a layer), so 1e-2 of the logit scale.
TF32_TOLERANCE = {"atol": 1e-2, "rtol": 1e-2}
# Weakly typed TensorRT 10 only. INT8 with FP16: the layers a Q/DQ graph leaves unquantized may run in fp16 (ModelOpt
# writes them fp16 for TensorRT, `calibration.quantize.high_precision_for`), as trtexec's --int8 --fp16.
_BUILDER_FLAGS = {"fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}
STRONG_TYPING_FROM = (10, 12)  # the precision builder flags are deprecated from here on


def import_tensorrt():
    """The `tensorrt` module, or MissingDependency with the install command."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependency(TRT_MISSING) from e
    return trt


@functools.lru_cache(maxsize=None)
def trt_version() -> tuple[int, int]:
    """(major, minor) of the installed TensorRT (detected once per process)."""
    parts = str(import_tensorrt().__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@functools.lru_cache(maxsize=None)
def _autocast_available() -> bool:
    try:
        require_autocast("")
    except MissingDependency:
        return False
    return True


def strongly_typed(precision: str = "fp32") -> bool:
    """True where an engine of `precision` takes its precision from the ONNX (see module doc).

    Args:
        precision: fp32 | fp16 | bf16 | int8.
    """
    version = trt_version()
    if version[0] >= 11:
        return True
    if version < STRONG_TYPING_FROM:
        return False
    # 10.12+: the flags still work; strong typing for fp16/bf16 needs an AutoCast ONNX.
    return precision in ("fp32", "int8") or _autocast_available()


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
    if precision in ("fp16", "bf16") and strongly_typed(precision):
        return precision  # AutoCast graph: no FP16/BF16 builder flags (11.x) or deprecated ones (10.12+)
    return "fp32"


def default_timing_cache(tensorrt: str, compute_capability: str) -> Path:
    """The timing cache of one TensorRT version on one GPU architecture (`SPOFA_TRT_TIMING_CACHE`: a folder).

    TensorRT ignores a cache of another version or GPU (`ignore_mismatch=False`), and one shared
    file would be overwritten by each: one file per (version, compute capability) keeps them all.
    """
    folder = Path(os.environ.get("SPOFA_TRT_TIMING_CACHE", "~/.cache/spofa")).expanduser()
    return folder / f"trt-timing-{tensorrt}-sm{str(compute_capability).replace('.', '')}.cache"


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


def _network_flags(trt, precision: str) -> int:
    """`create_network` flags: STRONGLY_TYPED on a strongly typed 10.x build, nothing otherwise."""
    if trt_version()[0] >= 11 or not strongly_typed(precision):
        return 0  # 11.x: always strongly typed, the flag is deprecated and ignored; else weakly typed
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _builder_flags(trt, precision: str) -> list:
    """The precision `BuilderFlag`s of a weakly typed build (none for a strongly typed one)."""
    if strongly_typed(precision):
        return []
    return [getattr(trt.BuilderFlag, name) for name in _BUILDER_FLAGS.get(precision, ())]


def _use_timing_cache(config, data: bytes) -> bool:
    """Create a timing cache from `data` and attach it; False where TensorRT refuses either step.

    On a bad buffer TensorRT may raise, or log and return None; a cache of another GPU or
    TensorRT version is not attached (`set_timing_cache` returns False).
    """
    try:
        cache = config.create_timing_cache(data)
        return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    except Exception:  # noqa: BLE001 - whatever the binding raises, the build goes on without this cache
        return False


def _attach_timing_cache(config, path: Path | None) -> list[str]:
    """Attach the timing cache stored at `path`, or an empty one; returns warnings for the sidecar.

    A damaged or foreign cache never stops the build: an empty cache takes its place (and is
    saved over it after the build); if TensorRT cannot even create that, the build runs without.
    """
    if path is None:
        return []
    warnings = []
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        data = b""
        warnings.append(f"cannot read the TensorRT timing cache {path} ({e})")
    if not _use_timing_cache(config, data):
        if data and _use_timing_cache(config, b""):
            warnings.append(f"ignored the TensorRT timing cache {path} (damaged, or written by another TensorRT "
                            "version or GPU): started an empty one")
        else:
            warnings.append(f"TensorRT could not create a timing cache: built without one ({path} left as it was)")
    for w in warnings:
        _log.warning(w)
    return warnings


def _save_timing_cache(config, path: Path | None) -> str | None:
    cache = config.get_timing_cache() if path is not None else None
    if cache is None:  # no path, or the build ran without a cache
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(cache.serialize())
    except (OSError, UserError) as e:
        return f"could not save the TensorRT timing cache {path}: {e}"
    return None


def profile_opts(batch: BatchProfile) -> list[int]:
    """The opt batch of each optimisation profile: 1 and the large batch, the two `spofa bench` reports.

    TensorRT picks kernels for a profile's opt shape, so one profile serves one of them well;
    each profile spans the whole range, and `TrtEngine` switches to the one nearest the batch.
    """
    return sorted({batch.min, batch.max})


def _add_profiles(builder, config, inp, batch: BatchProfile) -> list[dict]:
    chw = tuple(inp.shape)[1:]
    out = []
    for opt in profile_opts(batch):
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (batch.min, *chw), (opt, *chw), (batch.max, *chw))
        config.add_optimization_profile(profile)
        out.append({"min": batch.min, "opt": opt, "max": batch.max})
    return out


def build_engine(onnx_path: Path, engine_path: Path, precision: str, batch: BatchProfile, *,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, timing_cache: Path | bool | None = None,
                 tf32: bool = True) -> dict:
    """Build a serialized engine from an ONNX file with the TensorRT Python API.

    Args:
        onnx_path: the ONNX of `onnx_precision_for(precision)` (fp32; Q/DQ for int8; AutoCast
            fp16/bf16 where strongly typed).
        engine_path: where to write the plan (the caller makes it atomic).
        precision: fp32 | fp16 | bf16 | int8.
        batch: the batch range of a dynamic-batch ONNX: one optimisation profile per `profile_opts`.
        workspace_gib: builder workspace memory-pool limit.
        timing_cache: timing cache file, read before and updated after the build (True: this
            TensorRT version's and GPU's `default_timing_cache`; None: off).
        tf32: let fp32 layers use TF32 (TensorRT's default, like trtexec without --noTF32).

    Returns:
        Metadata for the sidecar: tensorrt version, gpu, compute_capability, strongly_typed, ...,
        and `warnings` (also logged: a timing cache that could not be used or saved).

    Raises:
        MissingDependency: no TensorRT or no GPU.
        UserError: the parser rejects the ONNX (one line per parser error) or the build fails.
    """
    trt = import_tensorrt()
    require_gpu()
    info = gpu_info()
    if precision == "bf16" and float(info["compute_capability"]) < 8.0:
        raise UserError(f"bf16 needs compute capability >= 8.0; {info['gpu']} has {info['compute_capability']}")
    if timing_cache is True:
        timing_cache = default_timing_cache(str(trt.__version__), info["compute_capability"])
    # The parser owns the weights the network points to: it must outlive the build (TensorRT's developer guide).
    builder, network, parser = _parse(trt, onnx_path, precision)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in _builder_flags(trt, precision):
        config.set_flag(flag)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    profiles = []
    if shape and shape[0] == -1:
        profiles = _add_profiles(builder, config, inp, batch)
    elif batch.dynamic:
        raise UserError(f"{onnx_path.name} has a fixed batch of {shape[0]}: export it with --dynamic-batch")
    warnings = _attach_timing_cache(config, timing_cache)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    del parser  # (only now)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
                        f"({precision}); its log above says why")
    with open(engine_path, "wb") as f:
        f.write(plan)
    warning = _save_timing_cache(config, timing_cache)
    if warning:
        _log.warning(warning)
    return {"tensorrt": str(trt.__version__), **info, "strongly_typed": strongly_typed(precision),
            # fp32 layers may run TF32 (10-bit mantissa products): parity is judged at `TF32_TOLERANCE`.
            "tf32": tf32, "profiles": profiles,
            "profile_choice": "per batch: the profile whose opt is nearest (set_optimization_profile_async)"
            if len(profiles) > 1 else None, "workspace_gib": workspace_gib, "build_seconds": round(time.perf_counter() - start, 2),
            "timing_cache": str(timing_cache) if timing_cache else None,
            "warnings": warnings + ([warning] if warning else [])}


def _parse(trt, onnx_path: Path, precision: str):
    """(builder, network, parser) of the ONNX at `onnx_path`; one line per parser error where TensorRT rejects it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["(no parser message)"]
        raise UserError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}:\n" + "\n".join(errors))
    return builder, network, parser
