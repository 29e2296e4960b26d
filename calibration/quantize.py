"""INT8 Q/DQ ONNX that TensorRT accepts: via ONNX Runtime `quantize_static` or NVIDIA ModelOpt.

TensorRT's explicit quantization wants symmetric Q/DQ (every zero point 0), int8 weights in
[-127, 127], per-channel weight scales on the output-channel axis, and float biases (it has no
int32 DequantizeLinear). The ORT settings below give exactly that: QDQ format, QInt8 for
activations and weights, ActivationSymmetric/WeightSymmetric, per_channel, QuantizeBias=False.
`check_trt_qdq` verifies it on the written graph.

Measured on digits (32 px, 512 stratified calibration images, 359 val images, ORT 1.31 CPU):

  val top-1 (Q/DQ as written)          test_resnet   mobilenetv3_small_050   test_efficientnet
  fp32                                     96.94            87.47                  96.94
  int8, all layers                         96.38            86.63                  97.03
  int8, first conv + classifier fp32       96.85            86.82                  96.85
  (int8 rows: mean over calibration seeds 0, 1, 2)

Keeping the first conv and the classifier in float helps on average (+0.5 and +0.2 points,
-0.2 on test_efficientnet; one image is 0.28 points), and much more on ORT's fused int8 CPU
kernels (test_resnet 85.5 -> 91.4, mobilenetv3_small_050 78.3 -> 83.6), so `keep_ends=True`
is the default. MinMax, Entropy and Percentile calibration gave the same top-1 within one
image, and `quant_pre_process` changed nothing, so neither is used.

ModelOpt (`--quantizer modelopt`, which `auto` picks for TensorRT where its ONNX quantizer can run;
`resolve_quantizer`) places its own Q/DQ and
calibrates with entropy, but reads the images through the same `calibration_reader` as ORT:
its own `calibration_data=` split crashes a fixed-batch graph unless N is a multiple of the
batch, and runs a dynamic graph at batch 1 (here 7.7x slower than batch 32, same top-1 within
one image). On a KD-trained mobilenetv3_small_050 (digits, fp32 80.78, seeds 0-2, ORT 1.24.4,
ModelOpt 0.47.0, ends kept) ModelOpt scored 80.50 and ORT 79.02; with the ends quantized both
80.04 (`benchmarks/int8_quantizers.py`; seed-to-seed spread is 1-3 points).

Why "Q/DQ as written" (ORT_ENABLE_BASIC, no int8 kernel fusion): on CPUs without VNNI (this machine: AVX2 only), ORT fuses Q/DQ into
u8s8 int8 kernels whose int16 intermediate sums saturate, which cost test_resnet 11 points here
(`reduce_range` avoids it at the price of 7-bit weights, which TensorRT does not need).
TensorRT accumulates in int32, so the Q/DQ arithmetic as written is what predicts the engine;
`spofa export` reports both numbers.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import io
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from spofa_deploy.artifacts import INPUT_NAME
from spofa_deploy.errors import MissingDependency, UserError

_log = logging.getLogger(__name__)
QUANTIZERS = ("auto", "ort", "modelopt")
_LINEAR_OPS = ("Conv", "Gemm", "MatMul")
CALIB_BATCH = 32  # calibration batch for a dynamic-batch graph
MODELOPT_METHOD = "entropy"  # ModelOpt's own default for int8


@dataclass
class QuantizeInfo:
    """How an INT8 model was made (goes into the sidecar)."""

    quantizer: str  # "ort" or "modelopt"
    excluded_nodes: list[str] = field(default_factory=list)
    calib_samples: int = 0
    calib_data: str = ""
    per_channel: bool = True
    symmetric: bool = True
    method: str = "minmax"
    high_precision: str = "fp32"  # the layers without Q/DQ
    target: str = "onnx"  # the format it was made for: onnx (ONNX Runtime) or trt (TensorRT)

    def to_dict(self) -> dict:
        return asdict(self)


def modelopt_available() -> bool:
    return importlib.util.find_spec("modelopt") is not None


MODELOPT_HINT = "pip install 'nvidia-modelopt[onnx]==0.47.*' (or use --quantizer ort)"
# What ModelOpt's ONNX quantizer imports besides itself, which a plain `nvidia-modelopt` install lacks.
MODELOPT_NEEDS = ("onnx_graphsurgeon", "onnxslim")
MODELOPT_KEYWORDS = ("calibration_data_reader", "high_precision_dtype", "nodes_to_exclude", "calibration_shapes")


def modelopt_problem() -> str | None:
    """Why ModelOpt's ONNX quantizer cannot run here (None: it can), checked before any export work.

    Checks what `_quantize_modelopt` needs: the package, the modules its ONNX quantizer imports,
    and the keywords this project passes to `modelopt.onnx.quantization.quantize`.
    """
    if not modelopt_available():
        return "NVIDIA ModelOpt is not installed: pip install 'nvidia-modelopt[onnx]==0.47.*'"
    missing = [m for m in MODELOPT_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return f"ModelOpt's ONNX quantizer needs {', '.join(missing)}, which is not installed: {MODELOPT_HINT}"
    try:
        from modelopt.onnx.quantization import quantize
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything at import
        return f"ModelOpt's ONNX quantizer fails to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): {MODELOPT_HINT}"
    params = inspect.signature(quantize).parameters
    absent = [k for k in MODELOPT_KEYWORDS if k not in params]
    if absent:
        return (f"ModelOpt's quantize() of nvidia-modelopt {importlib.metadata.version('nvidia-modelopt')} takes no "
                f"{', '.join(absent)}: {MODELOPT_HINT}")
    return None


def resolve_quantizer(name: str, target: str = "onnx", *, announce: bool = False) -> str:
    """The quantizer that makes INT8 pay where the artifact runs.

    `auto`: ModelOpt for a TensorRT engine (its Q/DQ placement is TensorRT's), when its ONNX
    quantizer can run here, else ONNX Runtime's with a note; ONNX Runtime's for an ONNX (int8
    weights that ONNX Runtime CPU runs as int8 kernels, where ModelOpt's graph keeps fp32
    weights for TensorRT to fold and runs slower than fp32 there).

    Args:
        name: auto | ort | modelopt.
        target: the export format, "onnx" or "trt".
        announce: log the fallback of `auto` to ONNX Runtime's quantizer as a warning (where it is used).

    Raises:
        UserError: an unknown name. MissingDependency: `modelopt` asked for and unable to run.
    """
    key = name.strip().lower()
    if key not in QUANTIZERS:
        raise UserError(f"unknown --quantizer '{name}': use one of {', '.join(QUANTIZERS)}")
    if key == "ort" or (key == "auto" and target != "trt"):
        return "ort"
    problem = modelopt_problem()
    if problem is None:
        return "modelopt"
    if key == "modelopt":
        raise MissingDependency(f"--quantizer modelopt: {problem}")
    if announce:
        _log.warning(f"--quantizer auto: ONNX Runtime's quantizer instead of ModelOpt ({problem})")
    return "ort"


def high_precision_for(target: str) -> str:
    """The precision of the layers left out of INT8: fp16 in a TensorRT engine, fp32 for ONNX Runtime CPU.

    Under strong typing every layer without Q/DQ runs in the ONNX's own type, so an fp32 rest makes
    an INT8 engine slower than the fp16 one; ONNX Runtime CPU has few fp16 kernels (casts instead).
    """
    return "fp16" if target == "trt" else "fp32"


def boundary_nodes(model) -> list[str]:
    """Names of the first and the last linear node (stem conv, classifier) in graph order.

    The exporter writes nodes in topological order, so the first Conv reads the image and the
    last Conv/Gemm/MatMul produces the logits.
    """
    linear = [n.name for n in model.graph.node if n.op_type in _LINEAR_OPS]
    if not linear:
        return []
    return sorted({linear[0], linear[-1]}, key=linear.index)


def _fixed_batch(model) -> int | None:
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None


class ArrayReader(CalibrationDataReader):
    """ORT `CalibrationDataReader` over an in-memory array, in batches the graph accepts.

    Serves both quantizers: ONNX Runtime calls `get_next`/`rewind`, ModelOpt also `get_first`.
    """

    def __init__(self, images: np.ndarray, batch: int, fixed: bool = False):
        self.images, self.batch, self.fixed, self.i = images, batch, fixed, 0

    @property
    def samples(self) -> int:
        """Images the reader yields in all (a fixed batch drops the partial last one)."""
        return len(self.images) // self.batch * self.batch if self.fixed else len(self.images)

    def _batch_at(self, i: int) -> dict | None:
        x = self.images[i:i + self.batch]
        if len(x) == 0 or (self.fixed and len(x) < self.batch):  # a fixed-batch graph takes only full batches
            return None
        return {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

    def get_next(self) -> dict | None:
        x = self._batch_at(self.i)
        if x is not None:
            self.i += self.batch
        return x

    def get_first(self) -> dict | None:
        """The first batch, without advancing (ModelOpt runs it once to learn tensor shapes)."""
        return self._batch_at(0)

    def rewind(self) -> None:
        self.i = 0


def calibration_reader(src: Path, images: np.ndarray) -> ArrayReader:
    """A reader in the batches `src` accepts: its fixed batch (partial last batch dropped), else CALIB_BATCH.

    Raises:
        UserError: fewer images than one fixed batch.
    """
    import onnx

    fixed = _fixed_batch(onnx.load(str(src), load_external_data=False))
    if fixed and len(images) < fixed:
        raise UserError(f"{len(images)} calibration images do not fill one batch of {fixed}: raise --calib-samples")
    return ArrayReader(images, fixed or CALIB_BATCH, fixed=bool(fixed))


@contextlib.contextmanager
def _quiet():
    """Silence the quantizers' chatter; errors still raise.

    ORT quantization logs "consider pre-processing" (and ModelOpt's pass "Expected bias ... to be
    an initializer") on the root logger on every call, and ORT's histogram calibrator prints a
    line per calibration batch to stdout (512 lines for a fixed batch of 1).
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _quantize_ort(src: Path, dst: Path, reader: ArrayReader, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with _quiet():
        quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude or None,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           # TensorRT has no int32 DequantizeLinear: keep biases float.
                           "QuantizeBias": False})


@contextlib.contextmanager
def _restore_ort_quantization():
    """Undo, on exit, whatever ModelOpt patches in ONNX Runtime's quantization modules.

    ModelOpt (0.47 `ort_patching.patch_ort_modules`) replaces methods of ORT's calibrators and
    quantizers process-wide, for its own conventions (e.g. node names passed as op types). A
    later plain `quantize_static` in the same process then calibrates nothing and fails
    ("Quantization parameters are not specified for param images").
    """
    from onnxruntime.quantization import base_quantizer, calibrate, onnx_quantizer, qdq_quantizer

    modules = (calibrate, base_quantizer, onnx_quantizer, qdq_quantizer)
    classes = [v for m in modules for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__]
    saved = [(owner, dict(vars(owner))) for owner in (*modules, *classes)]
    try:
        yield
    finally:
        for owner, before in saved:
            for key, value in before.items():
                if vars(owner).get(key) is not value:
                    setattr(owner, key, value)


@contextlib.contextmanager
def _no_modelopt_bars():
    """Hide the tqdm bars ModelOpt's calibration draws on stderr (three per INT8 export, 0.47
    `ort_patching`): an export reports its own progress, and its warnings stay on stderr."""
    from modelopt.onnx.quantization import ort_patching

    bar = getattr(ort_patching, "tqdm", None)
    if bar is None:  # another ModelOpt layout: its bars, if any, stay
        yield
        return
    ort_patching.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        ort_patching.tqdm = bar


def _quantize_modelopt(src: Path, dst: Path, reader: ArrayReader, exclude: list[str], high_precision: str) -> None:
    problem = modelopt_problem()
    if problem is not None:
        raise MissingDependency(f"--quantizer modelopt: {problem}")
    from modelopt.onnx.quantization import quantize

    # Our reader, not `calibration_data=`: ModelOpt splits an array into int(N / B) chunks, which gives
    # chunks of B + 1 on a fixed-batch graph whenever N % B != 0, and raises when N < B.
    chw = "x".join(str(d) for d in reader.images.shape[1:])
    with _quiet(), _restore_ort_quantization(), _no_modelopt_bars():
        quantize(
            onnx_path=str(src), quantize_mode="int8", calibration_method=MODELOPT_METHOD,
            calibration_data_reader=reader,
            # The shape of one calibration step: ModelOpt's GEMV/small-GEMM check then uses shape
            # inference at the batch we calibrate with, instead of an extra ORT session.
            calibration_shapes=f"{INPUT_NAME}:{reader.batch}x{chw}",
            # Node names are regular expressions for ModelOpt: match ours literally.
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None,
            output_path=str(dst),
            # The layers without Q/DQ (`high_precision_for`); I/O stay fp32 either way.
            high_precision_dtype=high_precision,
            calibration_eps=["cpu"], log_level="WARNING")


def quantize_int8(src: Path, dst: Path, images: np.ndarray, *, quantizer: str = "auto", target: str = "onnx",
                  keep_ends: bool = True, calib_data: str = "") -> QuantizeInfo:
    """Write a symmetric, per-channel INT8 Q/DQ copy of the fp32 ONNX `src` to `dst`.

    Args:
        src: fp32 ONNX with input `images`.
        dst: output path (the caller makes it atomic).
        images: calibration images, float32 (N, C, H, W), preprocessed like the model's input.
        quantizer: "auto" (by `target`, see `resolve_quantizer`), "ort" or "modelopt".
        target: the format the INT8 model is for: "onnx" (ONNX Runtime) or "trt" (TensorRT).
        keep_ends: keep the first conv and the classifier in fp32 (measured better, see module doc).
        calib_data: the data spec the images came from (recorded only; a quantizer fallback is logged).

    Raises:
        UserError: fewer images than one batch of a fixed-batch `src`, or the result is not a Q/DQ
            graph TensorRT accepts.
    """
    import onnx

    name = resolve_quantizer(quantizer, target, announce=True)
    # ONNX Runtime's quantizer casts nothing: its float layers stay fp32 on every target.
    high = high_precision_for(target) if name == "modelopt" else "fp32"
    exclude = boundary_nodes(onnx.load(str(src), load_external_data=False)) if keep_ends else []
    reader = calibration_reader(src, images)
    if name == "modelopt":
        _quantize_modelopt(src, dst, reader, exclude, high)
    else:
        _quantize_ort(src, dst, reader, exclude)
    problems = check_trt_qdq(onnx.load(str(dst)))
    if problems:
        raise UserError(f"the {name} INT8 model is not TensorRT-compatible: {'; '.join(problems[:3])}")
    return QuantizeInfo(quantizer=name, excluded_nodes=exclude, calib_samples=reader.samples, calib_data=calib_data,
                        method="minmax" if name == "ort" else MODELOPT_METHOD, high_precision=high, target=target)


def qdq_constants(model) -> list[tuple[str, str, np.ndarray]]:
    """(node name, role, value) of every constant scale / zero point / weight feeding Q and DQ nodes."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes hold values too
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        roles = ("data", "scale", "zero_point")
        for role, inp in zip(roles, n.input):
            if inp in consts:
                out.append((n.name, role, consts[inp]))
    return out


def check_trt_qdq(model) -> list[str]:
    """Reasons a Q/DQ graph would be rejected by TensorRT (empty list: fine).

    Checks: at least one Q/DQ pair, every zero point 0, int8 quantized weights in [-127, 127],
    no int32 (bias) DequantizeLinear.
    """
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return ["no QuantizeLinear/DequantizeLinear nodes"]
    problems = []
    for name, role, value in qdq_constants(model):
        if role == "zero_point" and np.any(value != 0):
            problems.append(f"{name} has a non-zero zero point")
        if role == "data" and value.dtype == np.int32:
            problems.append(f"{name} dequantizes an int32 tensor (quantized bias)")
        if role == "data" and value.dtype == np.int8 and value.size and int(value.min()) < -127:
            problems.append(f"{name} has int8 weights below -127")
    return problems
