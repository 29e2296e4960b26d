"""The ONNX graph toolkit of the onnx and trt homes: PyTorch -> ONNX, checker, onnxslim, AutoCast, and
`ort_session` (the one place ONNX Runtime sessions are built).

Exporter choice: the TorchScript exporter (`dynamo=False`, `dynamic_axes`). Measured here
(torch 2.14, onnxscript 0.7, 2 CPU cores) on test_resnet / mobilenetv3_small_050 /
test_efficientnet / test_vit at 32 px, both exporters reached the same ORT parity (max abs
error 1e-8..3e-7, dynamic batch 1 and 7 fine), but:
- dynamo cannot emit opset 17: it exports opset 18 and its down-conversion failed on test_vit
  (Resize antialias), while TensorRT 10 and older ORT builds are happiest at 17;
- dynamo took 3-10 s per export vs 0.1-2 s, and writes weights to a separate `.onnx.data`
  file by default, which complicates the atomic write of one artifact;
- the TorchScript graph can carry Identity nodes, which onnxslim removes (a freshly built
  test_resnet: 48 -> 38 nodes).
The TorchScript exporter is deprecated in torch >= 2.9, so `exporter="dynamo"` is kept as a
switch (opset raised to 18) for the day it is removed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.artifact import BatchProfile
from export.options import MIN_OPSET
from export.parity import padded_chunks
from spofa_deploy.artifacts import INPUT_NAME, OUTPUT_NAME
from spofa_deploy.errors import MissingDependency, UserError

DYNAMO_MIN_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


def max_opset(exporter: str) -> int:
    """The newest opset `exporter` writes (TorchScript stops earlier than dynamo)."""
    from torch.onnx import _constants

    if exporter == "torchscript":
        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    return int(getattr(_constants, "ONNX_MAX_OPSET", 23))


def check_opset(opset: int, exporter: str = "torchscript") -> None:
    """Refuse an exporter or opset the ONNX export cannot write, before any work."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter '{exporter}': use one of {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset} is too old: use >= {MIN_OPSET} (LayerNorm as one node)")
    if opset > max_opset(exporter):
        raise UserError(f"--opset {opset} is newer than the {exporter} exporter of torch {torch.__version__} "
                        f"writes: use {MIN_OPSET} to {max_opset(exporter)}")


def export_onnx(model: nn.Module, path: Path, *, img_size: int, batch: BatchProfile, opset: int = MIN_OPSET,
                exporter: str = "torchscript", in_chans: int = 3) -> int:
    """Export `model` (built with `exportable=True`, in eval mode) to `path`.

    Args:
        model: the timm model.
        path: output file (the caller makes it atomic).
        img_size: square input size.
        batch: fixed batch (static first dim) or dynamic (symbolic `batch` dim).
        opset: ONNX opset, >= 17.
        exporter: "torchscript" (default, see module docstring) or "dynamo".
        in_chans: input channels.

    Returns:
        The opset actually written.
    """
    check_opset(opset, exporter)
    model = model.eval()
    # dynamo specialises a dynamic dim whose example size is 1, so its example batch is >= 2.
    n = max(batch.opt, 2) if (batch.dynamic and exporter == "dynamo") else batch.opt
    example = torch.randn(n, in_chans, img_size, img_size)
    common = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings are noise for timm CNNs.
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch.dynamic else None
            torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamic_axes=axes, dynamo=False, **common)
        else:
            opset = max(opset, DYNAMO_MIN_OPSET)  # dynamo implements opset >= 18 only
            shapes = ({0: torch.export.Dim("batch", min=1, max=max(batch.max, 1024))},) if batch.dynamic else None
            # One self-contained file (no `.onnx.data` beside it), like the TorchScript path.
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                              external_data=False, **common)
    return opset


def check_onnx(path: Path) -> "onnx.ModelProto":  # noqa: F821
    """Run `onnx.checker` and confirm the graph has exactly `images` in and `logits` out."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"the exported ONNX graph is invalid: {str(e).splitlines()[0]}") from e
    inits = {i.name for i in model.graph.initializer}
    ins = [i.name for i in model.graph.input if i.name not in inits]
    outs = [o.name for o in model.graph.output]
    if ins != [INPUT_NAME] or outs != [OUTPUT_NAME]:
        raise UserError(f"exported graph has inputs {ins} and outputs {outs}; expected ['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']")
    return model


def slim_available() -> bool:
    return importlib.util.find_spec("onnxslim") is not None


def slim_onnx(path: Path) -> tuple[int, int]:
    """Simplify the graph in place with onnxslim (constant folding, dead/identity nodes).

    Returns:
        (nodes before, nodes after).
    """
    import onnx

    try:
        import onnxslim
    except ImportError as e:
        raise MissingDependency("onnxslim is not installed: pip install onnxslim (or pass --no-slim)") from e
    model = onnx.load(str(path))
    before = len(model.graph.node)
    with contextlib.redirect_stdout(None):  # onnxslim may print a summary table
        slim = onnxslim.slim(model)
    if slim is None:
        raise UserError("onnxslim could not simplify the graph (pass --no-slim)")
    onnx.save(slim, str(path))
    return before, len(slim.graph.node)


def model_opset(model) -> int:
    """The default-domain opset of an ONNX model."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def ort_session(path: Path, *, fused: bool = True, threads: int | None = None, provider: str = "cpu",
                device_id: int = 0, cuda_stream: int | None = None, spin: bool = False):
    """An ONNX Runtime session: the one place sessions are built (export parity, INT8 evaluation, bench).

    Args:
        fused: ORT's full graph optimisation (default). `fused=False` keeps Q/DQ nodes as
            written (ORT_ENABLE_BASIC), so an INT8 model is evaluated with its Q/DQ
            arithmetic rather than ORT's fused int8 CPU kernels (see calibration/quantize.py).
        threads: intra-op threads (None: ORT's default).
        provider: "cpu", or "cuda" (the CUDA provider on GPU `device_id`, the CPU one behind it;
            the caller checks that CUDA was taken).
        cuda_stream: the CUDA stream handle ORT computes on (`user_compute_stream`), for "cuda".
        spin: let idle intra-op threads spin, as ORT does by default (benchmarks). Off for checks
            and evaluations: sleeping threads do not starve other work on small shared machines.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    so.log_severity_level = 3  # errors only
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    providers: list = ["CPUExecutionProvider"]
    if provider == "cuda":
        options = {"device_id": device_id, **({"user_compute_stream": str(cuda_stream)} if cuda_stream else {})}
        providers.insert(0, ("CUDAExecutionProvider", options))
    elif provider != "cpu":
        raise ValueError(f"unknown ONNX Runtime provider {provider}")
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise UserError(f"ONNX Runtime cannot load {Path(path).name}: {str(e).splitlines()[0]}") from e


def run_onnx(session, images: np.ndarray, fixed_batch: int | None = None, chunk: int = 64) -> np.ndarray:
    """Logits for `images` (N, C, H, W float32), in chunks; a fixed-batch graph gets padded chunks."""
    lo, hi = (fixed_batch, fixed_batch) if fixed_batch else (1, chunk)
    outs = [session.run([OUTPUT_NAME], {INPUT_NAME: x})[0][:n] for x, n in padded_chunks(images, lo, hi, chunk)]
    return np.concatenate(outs).astype(np.float32)


AUTOCAST_MIN_MODELOPT = (0, 33)  # `convert_to_mixed_precision` appears in 0.33 (0.31 calls it `convert`)


def require_autocast(what: str) -> None:
    """Raise MissingDependency unless ModelOpt's AutoCast entry point (>= 0.33) is importable.

    Args:
        what: what needs it, for the message (e.g. "fp16 ONNX").
    """
    import importlib.metadata

    try:
        version = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        version = None
    hint = "pip install 'nvidia-modelopt[onnx]==0.47.*'"
    if version is None:
        raise MissingDependency(f"{what} needs NVIDIA ModelOpt AutoCast, which is not installed: {hint}")
    try:
        from modelopt.onnx import autocast as ac
    except Exception as e:  # ImportError, or a broken install raising anything at import
        raise MissingDependency(f"{what} needs NVIDIA ModelOpt AutoCast, but nvidia-modelopt {version} fails to "
                                f"import it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {hint}") from e
    if not hasattr(ac, "convert_to_mixed_precision"):
        raise MissingDependency(f"{what} needs ModelOpt AutoCast's convert_to_mixed_precision (nvidia-modelopt >= "
                                f"{'.'.join(map(str, AUTOCAST_MIN_MODELOPT))}); {version} is installed: "
                                f"pip install 'nvidia-modelopt[onnx]==0.47.*'")


def autocast(src: Path, dst: Path, precision: str) -> None:
    """FP16/BF16 mixed-precision ONNX via NVIDIA ModelOpt AutoCast (I/O stay fp32).

    A bf16 graph (opset 22) cannot run in ONNX Runtime's CPU provider (no bf16 Conv kernel):
    the exporter checks it on the TensorRT engine instead (`ort_runs`).

    Raises:
        MissingDependency: ModelOpt (>= 0.33) is not installed.
    """
    import onnx

    require_autocast(f"{precision} ONNX")
    from modelopt.onnx.autocast import convert_to_mixed_precision

    # keep_io_types: callers (TensorRT, ORT) feed float32 images and read float32 logits.
    with _quiet_logs():  # its INFO lines (opset conversion, node counts) go to stdout
        model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type=precision, keep_io_types=True)
    onnx.save(model, str(dst))


@contextlib.contextmanager
def _quiet_logs(level: int = logging.INFO):
    """Drop log records at `level` and below for a while (ModelOpt sets its loggers' levels itself)."""
    old = logging.root.manager.disable
    logging.disable(max(level, old))
    try:
        yield
    finally:
        logging.disable(old)


def ort_runs(precision: str) -> bool:
    """Whether ONNX Runtime's CPU provider runs an ONNX of this precision (bf16 Conv: no kernel)."""
    return precision != "bf16"
