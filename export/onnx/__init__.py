"""The home of the onnx format (`export.formats`): `.onnx` files run by ONNX Runtime.

    graph.py      the ONNX toolkit: PyTorch -> ONNX, checker, onnxslim, AutoCast, `ort_session`
    build.py      the ONNX an export makes: fp32 -> INT8 / QAT Q/DQ / AutoCast, checked and gated
    payoff.py     whether an INT8 ONNX pays: its size and ONNX Runtime CPU latency against fp32
    info.py       an ONNX file and its sidecar, held against each other (`OnnxInfo`)
    ort.py        `OrtRunner`: ONNX Runtime on the CPU, or on CUDA through IOBinding
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from export.artifact import Artifact, BatchProfile
from export.parity import Parity, compare_logits, torch_logits
from export.runner import RunOptions
from spofa_deploy.errors import UserError

from .info import OnnxInfo, describe
from .graph import (INPUT_NAME, MIN_OPSET, OUTPUT_NAME, autocast, check_onnx, check_opset, export_onnx,
                    ort_session, require_autocast, run_onnx)
from .ort import OrtRunner, ort_cuda_reason

if TYPE_CHECKING:
    from export.exporter import ExportJob
    from export.options import ExportOptions

__all__ = ["BatchProfile", "INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "OnnxInfo", "OrtRunner", "Parity", "autocast",
           "check_export", "check_onnx", "compare_logits", "describe", "export", "export_onnx", "ort_cuda_reason",
           "ort_session", "require_autocast", "run_onnx", "runner", "torch_logits"]


def check_export(options: "ExportOptions") -> None:
    """Refuse, before any work, an export this machine cannot make (ONNX Runtime, ModelOpt, onnxslim, quantizer)."""
    from export.formats import FORMATS

    from .build import check_chain

    check_opset(options.opset, options.exporter)
    FORMATS["onnx"].require(options.precision)
    if options.precision in ("fp16", "bf16"):
        require_autocast(f"{options.precision} ONNX")
    check_chain(options)


def export(job: "ExportJob") -> None:
    """The `.onnx` of the job's precision, checked and gated, published with its sidecar."""
    from .build import build_onnx  # (the INT8 calibration is imported with it)

    with job.work() as work:
        built = build_onnx(job, work, job.precision)
        job.install([(built.path, job.dest, job.sidecar("onnx", job.precision, job.dest, **built.extra))])


def runner(art: Artifact, backend: str, device: str, precision: str, options: RunOptions) -> OrtRunner:
    """ONNX Runtime on the CPU (`ort-cpu`) or on CUDA (`ort-cuda`)."""
    if backend not in ("ort-cpu", "ort-cuda"):
        raise UserError(f"backend {backend} cannot run {art.path.name}")
    return OrtRunner(art, backend.split("-", 1)[1], options)
