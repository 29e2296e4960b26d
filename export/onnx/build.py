"""The ONNX an export makes, shared by the onnx and trt homes: fp32 ONNX -> [INT8 Q/DQ | QAT Q/DQ | AutoCast].

fp32: export, checker, optional onnxslim, parity against PyTorch in ONNX Runtime CPU (fails beyond
1e-3 + 1e-4 x the logit scale, or on a decisive top-1 flip). INT8: calibration set -> Q/DQ ONNX
(quantizer by target) -> val top-1 as written and through ORT's int8 kernels, the accuracy gate, and
for an ONNX artifact its size and ORT CPU latency against fp32 (`payoff`). fp16/bf16: AutoCast,
checked in ORT CPU where it has kernels (bf16: on the engine only). Each check runs the ONNX through
`OrtRunner`, the runner `spofa bench` times.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from calibration.dataset import calibration_set
from calibration.quantize import check_trt_qdq, quantize_int8, resolve_quantizer
from export.parity import Parity
from export.runner import RunOptions
from spofa_deploy.errors import MissingDependency, UserError

from . import graph
from . import payoff as payoffs
from .ort import OrtRunner

if TYPE_CHECKING:
    from export.exporter import ExportJob
    from export.options import ExportOptions

_log = logging.getLogger(__name__)
INT8_WARN_DROP = 1.0  # points of val top-1: ORT's fused int8 kernels below the Q/DQ as written
ORT_CPU = "onnxruntime-cpu"


@dataclass
class OnnxBuild:
    """The ONNX an export made: the file (in the work folder), its precision, and its sidecar entries."""

    path: Path
    precision: str
    extra: dict


def check_chain(options: "ExportOptions") -> None:
    """Refuse, before any work, an onnxslim or quantizer the ONNX chain cannot use (after `graph.check_opset`
    and the format's own dependencies)."""
    if options.slim and not graph.slim_available():
        raise MissingDependency("onnxslim is not installed: pip install onnxslim (or pass --no-slim)")
    if options.precision == "int8":
        resolve_quantizer(options.int8.quantizer, options.format)


def build_onnx(job: "ExportJob", work: Path, precision: str) -> OnnxBuild:
    """The ONNX of `precision` in `work`, checked against PyTorch; parity, gate and INT8 facts into `job.result`.

    Args:
        job: the export.
        work: its temp folder.
        precision: the ONNX's precision (for an engine: `tensorrt.onnx_precision_for`).
    """
    result = job.result
    fp32 = work / "fp32.onnx"
    fp32_parity, extra = _fp32(job, fp32)
    result.parity = fp32_parity
    final = _reduced(job, fp32, precision, extra)
    if final != fp32:
        extra["parity_fp32"] = fp32_parity.to_dict()
    result.opset = graph.model_opset(onnx.load(str(final), load_external_data=False))
    extra["parity"] = result.parity.to_dict() if result.parity else None
    if result.parity is None:
        extra["parity_note"] = f"{precision} ONNX not run by ONNX Runtime CPU (no kernels): checked on the engine"
    return OnnxBuild(final, precision, extra)


def ort_cpu(job: "ExportJob", path: Path, precision: str, fused: bool = True) -> OrtRunner:
    """The ONNX Runtime CPU runner of an ONNX this export made (`fused=False`: the Q/DQ as written)."""
    art = job.built(path, "onnx", precision, batch_range=(job.fixed_batch,) * 2 if job.fixed_batch else None)
    return OrtRunner(art, "cpu", RunOptions(fused=fused, spin=False))


def _fp32(job: "ExportJob", path: Path) -> tuple[Parity, dict]:
    """Export, check and optionally slim the fp32 ONNX at `path`, then check it against PyTorch.

    Returns:
        Its parity, and the sidecar entries of how it was made (slim, slim_nodes, exporter).
    """
    o, meta = job.options, job.meta
    graph.export_onnx(job.model, path, img_size=int(meta["img_size"]), batch=job.profile, opset=o.opset,
                      exporter=o.exporter, in_chans=int(meta.get("in_chans", 3)))
    graph.check_onnx(path)
    nodes = graph.slim_onnx(path) if (graph.slim_available() if o.slim is None else o.slim) else None
    graph.check_onnx(path)
    qat = bool(meta.get("qat"))
    with ort_cpu(job, path, "fp32", fused=not qat) as runner:  # a QAT graph is Q/DQ: judged as written, like int8
        parity = job.parity(runner, ORT_CPU)
    # A QAT graph may differ by a rounding step where PyTorch's fake quant and ORT's QuantizeLinear break a tie
    # differently: beyond the fp32 tolerance, but it fails only on a decisive top-1 flip.
    if not parity.passed and not (qat and parity.decisive_disagreements == 0):
        raise UserError(f"ONNX Runtime output differs from PyTorch beyond tolerance: {parity.describe()}"
                        f"{parity.flips()}: nothing written (try --no-slim or another --opset)")
    return parity, {"slim": nodes is not None, "slim_nodes": list(nodes) if nodes else None, "exporter": o.exporter}


def _reduced(job: "ExportJob", fp32: Path, precision: str, extra: dict) -> Path:
    """The ONNX of `precision` made from `fp32` (Q/DQ, AutoCast, or `fp32` itself); its parity and gate into the result."""
    if precision == "int8" and job.meta.get("qat"):  # a QAT student exports its own Q/DQ: nothing to calibrate
        extra["int8"] = _qat(job, fp32)
        return fp32
    if precision == "int8":
        final = fp32.with_name("int8.onnx")
        extra["int8"] = _int8(job, fp32, final)
        return final
    if precision in ("fp16", "bf16"):
        final = fp32.with_name(f"{precision}.onnx")
        graph.autocast(fp32, final, precision)
        graph.check_onnx(final)
        job.result.parity = None
        # ORT's CPU provider has no bf16 Conv kernel: such a graph is checked on its engine only.
        if graph.ort_runs(precision):
            with ort_cpu(job, final, precision) as runner:
                job.result.parity = job.parity(runner, ORT_CPU)
                if job.options.format != "trt":  # (an engine's gate judges the engine itself)
                    job.result.gate = job.judge(runner, ORT_CPU)
        return final
    return fp32


def _int8(job: "ExportJob", fp32: Path, dest: Path) -> dict:
    """Calibrate and quantize `fp32` into `dest`; its val top-1 against PyTorch, parity and payoff into the result."""
    o, result = job.options, job.result
    calib = calibration_set(job.meta, o.int8.calib_data, o.int8.calib_samples, o.seed)
    info = quantize_int8(fp32, dest, calib.images, quantizer=o.int8.quantizer, target=o.format,
                         keep_ends=o.int8.keep_ends, calib_data=calib.spec)
    graph.check_onnx(dest)
    result.quantization = info.to_dict()
    with ort_cpu(job, dest, "int8", fused=False) as written, ort_cpu(job, dest, "int8") as kernels:
        scores = job.scores({"written": written, "kernels": kernels})
        if scores is not None:
            result.fp32_top1, result.eval_samples = scores.reference, scores.n
            result.int8_top1, result.int8_top1_ort_kernels = scores.top1["written"], scores.top1["kernels"]
            # The Q/DQ arithmetic as written is what the graph means and what TensorRT reproduces.
            result.gate = job.verdict(scores, "written", "onnxruntime-cpu, Q/DQ as written")
            if result.int8_top1 - result.int8_top1_ort_kernels > INT8_WARN_DROP:
                _log.warning(f"ONNX Runtime's fused int8 CPU kernels score {result.int8_top1_ort_kernels:.2f}% "
                             f"here (vs {result.int8_top1:.2f}% with the Q/DQ as written): int16 saturation on "
                             "CPUs without VNNI; TensorRT is not affected")
        result.parity = job.parity(written, ORT_CPU)
    if o.format == "onnx":
        _payoff(job, fp32, dest)
    return {**info.to_dict(), "fp32_top1": result.fp32_top1, "int8_top1": result.int8_top1,
            "int8_top1_ort_kernels": result.int8_top1_ort_kernels, "eval_samples": result.eval_samples,
            "payoff": result.payoff}


def _payoff(job: "ExportJob", fp32: Path, int8: Path) -> None:
    """INT8 against fp32 where the ONNX runs (ONNX Runtime CPU): size and latency, said plainly when worse."""
    b, meta = job.profile, job.meta
    lo, hi = (b.min, b.max) if b.dynamic else (b.opt, b.opt)
    shape = (int(meta.get("in_chans", 3)), int(meta["img_size"]), int(meta["img_size"]))
    job.result.payoff = payoffs.int8_payoff(fp32, int8, shape, payoffs.payoff_batches(lo, hi))
    for line in payoffs.slower(job.result.payoff):
        _log.warning(line)


def _qat(job: "ExportJob", qdq: Path) -> dict:
    """Check the Q/DQ graph a QAT student exported (TensorRT's rules); its val top-1 and gate into the result.

    The gate's PyTorch model is the QAT student itself (fake quantizers in): what was exported.
    """
    problems = check_trt_qdq(onnx.load(str(qdq)))
    if problems:
        raise UserError(f"the QAT student's ONNX is not TensorRT-compatible: {'; '.join(problems[:3])}")
    result, settings = job.result, job.meta["qat_settings"]
    result.quantization = {"quantizer": "qat", "calib_samples": settings["calib_samples"],
                           "calib_data": settings["calib_data"],
                           "excluded_nodes": settings.get("kept_float", [])}  # (module names: float in training)
    with ort_cpu(job, qdq, "int8", fused=False) as written:
        scores = job.scores({"written": written})
    if scores is not None:
        result.int8_top1, result.eval_samples = scores.top1["written"], scores.n
        result.fp32_top1 = settings["fp32_top1"]  # (the student before QAT, in PyTorch, on the same val split)
        result.gate = job.verdict(scores, "written", "onnxruntime-cpu, Q/DQ as written")
    return {**result.quantization, "qat": True, "qat_settings": settings, "int8_top1": result.int8_top1,
            "eval_samples": result.eval_samples}
