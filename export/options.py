"""What `export_model` is asked to do: `ExportOptions` and its groups (parity, INT8, accuracy gate, TensorRT).

`spofa export` builds them from its flags (cli/cmd_export.py); `spofa bench` builds them from a
student's sidecar to export its teacher the same way (`export.bench.teacher`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spofa_deploy.errors import UserError

from .artifact import BatchProfile
from .gate import DEFAULT_MAX_DROP, DEFAULT_SAMPLES, check_max_drop
from .parity import PARITY_ATOL, PARITY_RTOL

MIN_OPSET = 17  # LayerNormalization is one node from opset 17 (a ViT teacher overflows in FP16 otherwise)
# Default batch profile MIN:OPT:MAX. MAX 256 is the large batch `spofa bench` reports on a GPU;
# OPT 16 sits between batch-1 latency and throughput (TensorRT tunes its kernels for OPT).
DEFAULT_BATCH = "1:16:256"


@dataclass(frozen=True)
class ParityOptions:
    """The check of an export against PyTorch on the same images (`export.parity.compare_logits`).

    Attributes:
        samples: validation images (random ones where the data cannot be loaded).
        atol, rtol: an fp32 export fails where |artifact - PyTorch| > atol + rtol x the image's largest
            |logit|, or where a decisive top-1 differs.
    """

    samples: int = 64
    atol: float = PARITY_ATOL
    rtol: float = PARITY_RTOL


@dataclass(frozen=True)
class Int8Options:
    """How an INT8 model is calibrated.

    Attributes:
        calib_data: data spec of the calibration images (default: the model's own data).
        calib_samples: calibration images (seeded, stratified, from the training split).
        quantizer: auto (ModelOpt for TensorRT where its ONNX quantizer can run, ONNX Runtime's for
            ONNX: `calibration.quantize.resolve_quantizer`) | ort | modelopt.
        keep_ends: keep the first conv and the classifier in fp32 (measured better).
    """

    calib_data: str | None = None
    calib_samples: int = 512
    quantizer: str = "auto"
    keep_ends: bool = True


@dataclass(frozen=True)
class GateOptions:
    """The accuracy gate of a reduced-precision export (`export.gate`).

    Attributes:
        max_drop: refuse the export (set aside as `<name>.refused<suffix>`, UserError) when its val
            top-1 is more than this many points below the PyTorch model's; 0 disables the refusal.
        samples: validation images it scores (and the INT8 top-1 is measured on).
    """

    max_drop: float = DEFAULT_MAX_DROP
    samples: int = DEFAULT_SAMPLES


@dataclass(frozen=True)
class TrtOptions:
    """How a TensorRT engine is built.

    Attributes:
        workspace_gib: builder workspace.
        tf32: fp32 layers may run TF32 (TensorRT's default; the engine's parity is then judged at
            `TF32_TOLERANCE`); False clears the flag (trtexec's --noTF32).
        timing_cache: timing cache file (True: one per TensorRT version and GPU architecture under
            `~/.cache/spofa/`; None or False: none).
    """

    workspace_gib: float = 4.0
    tf32: bool = True
    timing_cache: Path | bool | None = True


@dataclass(frozen=True)
class ExportOptions:
    """One export: the format and precision, the batch profile, where it goes, and each group's settings.

    Attributes:
        format: "onnx", "trt" or "pt2" (`export.formats.FORMATS`).
        precision: fp32 | fp16 | bf16 | int8 (what the format allows).
        batch: a fixed batch size (not with `dynamic_batch`).
        dynamic_batch: (min, opt, max) or "MIN:OPT:MAX": symbolic batch + TensorRT profile (with
            neither given: `DEFAULT_BATCH`).
        opset: ONNX opset, >= 17 (not for pt2).
        exporter: the ONNX exporter, "torchscript" or "dynamo" (`export.onnx.graph`).
        slim: simplify the ONNX with onnxslim (None: when installed).
        device: the device a `.pt2` package is compiled for (cpu | cuda); other formats ignore it.
        out: output file or folder (default: beside the source, e.g. `student.int8.onnx`).
        force: overwrite an existing output.
        seed: seed of every image draw.
    """

    format: str
    precision: str = "fp32"
    batch: int | None = None
    dynamic_batch: tuple[int, int, int] | str | None = None
    opset: int = MIN_OPSET
    exporter: str = "torchscript"
    slim: bool | None = None
    device: str = "cpu"
    out: Path | str | None = None
    force: bool = False
    seed: int = 0
    parity: ParityOptions = field(default_factory=ParityOptions)
    int8: Int8Options = field(default_factory=Int8Options)
    gate: GateOptions = field(default_factory=GateOptions)
    trt: TrtOptions = field(default_factory=TrtOptions)

    def profile(self) -> BatchProfile:
        """The batch profile asked for (`batch`, `dynamic_batch`, or `DEFAULT_BATCH`)."""
        batch, dynamic = self.batch, self.dynamic_batch
        if batch is not None and dynamic is not None:
            raise UserError("give --batch N (fixed) or --dynamic-batch MIN:OPT:MAX, not both")
        if batch is not None:
            return BatchProfile.fixed(batch)
        if dynamic is None or isinstance(dynamic, str):
            return BatchProfile.parse(dynamic or DEFAULT_BATCH)
        try:
            lo, opt, hi = (int(v) for v in dynamic)
        except (TypeError, ValueError):
            raise UserError(f"dynamic_batch must be (min, opt, max), got {dynamic!r}") from None
        return BatchProfile.dynamic_range(lo, opt, hi)

    def check_gate(self) -> None:
        """Refuse a negative `--max-drop` or no gate image, before any work."""
        check_max_drop(self.gate.max_drop, self.gate.samples)
