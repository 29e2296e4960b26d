"""The home of the trt format (`export.formats`): TensorRT engines, built from the export's ONNX
(`export.onnx.build`) for the GPU and TensorRT version of this machine.

    build.py      ONNX -> engine (TensorRT 10 and 11: typing, flags, timing cache, profiles); TensorRT and the GPU here
    engine.py     `TrtEngine` (a built engine on torch CUDA tensors), `check_engine_meta`
    trt.py        `TrtRunner`: an engine enqueued on a stream we own
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from export.artifact import Artifact, exported, read_sidecar
from export.onnx.build import OnnxBuild, build_onnx, check_chain
from export.onnx.graph import check_opset, require_autocast
from export.runner import RunOptions
from spofa_deploy.errors import UserError

from .build import (DEFAULT_WORKSPACE_GIB, TF32_TOLERANCE, build_engine, gpu_info, import_tensorrt, onnx_precision_for,
                    require_gpu, strongly_typed, trt_version)
from .engine import TrtEngine, check_engine_meta
from .trt import TrtRunner

if TYPE_CHECKING:
    from export.exporter import ExportJob
    from export.options import ExportOptions

__all__ = ["DEFAULT_WORKSPACE_GIB", "TF32_TOLERANCE", "TrtEngine", "TrtRunner", "build_engine", "check_engine_meta",
           "check_export", "describe", "export", "gpu_info", "onnx_precision_for", "runner", "strongly_typed",
           "trt_version"]
_log = logging.getLogger(__name__)


def check_export(options: "ExportOptions") -> None:
    """Refuse, before any work, an engine this machine cannot build (TensorRT, a GPU, AutoCast, onnxslim)."""
    from export.formats import FORMATS

    check_opset(options.opset, options.exporter)
    FORMATS["trt"].require()
    require_gpu()
    if onnx_precision_for(options.precision) in ("fp16", "bf16"):
        require_autocast(f"{options.precision} on TensorRT {trt_version()[0]} (strongly typed)")
    check_chain(options)


def export(job: "ExportJob") -> None:
    """The engine of the job's precision, built from its ONNX; both published, the ONNX beside the engine."""
    with job.work() as work:
        built = build_onnx(job, work, onnx_precision_for(job.precision))
        _engine(job, built, work)


def _engine(job: "ExportJob", built: OnnxBuild, work: Path) -> None:
    """Build the engine from the ONNX, check and gate it on the GPU, publish both (the ONNX kept beside it)."""
    from export.exporter import _clean_leftovers, aside
    from export.formats import FORMATS, artifact_name
    from spofa_deploy.run_dirs import writing

    precision, result, t = job.precision, job.result, job.options.trt
    onnx_dest = job.dest.parent / artifact_name(job.source.path.stem, FORMATS["onnx"], built.precision)
    cache = None if t.timing_cache in (None, False) else t.timing_cache  # True: the default, keyed by version and GPU
    plan = work / "model.engine"
    engine = build_engine(built.path, plan, precision, job.profile, workspace_gib=t.workspace_gib,
                          timing_cache=cache, tf32=t.tf32)
    engine.pop("warnings", None)  # (logged as they happened)
    result.engine = engine
    where = f"tensorrt {engine.get('tensorrt')} on {engine.get('gpu')}"
    # An fp32 engine's TF32 layers: TF32-sized errors, not an fp32 failure.
    tf32 = {k: max(v, TF32_TOLERANCE[k]) for k, v in (("atol", job.options.parity.atol),
                                                       ("rtol", job.options.parity.rtol))}
    # The engine's own output, on the GPU that built it: the one check a bf16 graph can have here.
    with TrtRunner(job.built(plan, "trt", precision, None)) as run:
        result.parity_engine = job.parity(run, where, tf32 if engine.get("tf32", False) else None)
        if precision == "fp32" and not result.parity_engine.passed:  # (reduced precision: the gate judges it)
            raise UserError(f"the engine differs from PyTorch beyond tolerance: {result.parity_engine.describe()}"
                            f"{result.parity_engine.flips()}: nothing written")
        if result.parity_engine.top1_agreement < 99.0:
            _log.warning(f"engine top-1 agrees with PyTorch on {result.parity_engine.top1_agreement:.1f}% "
                         f"of {result.parity_engine.n} images only")
        if precision != "fp32":  # the engine, not its ONNX in ORT CPU, is what the gate judges
            result.gate = job.judge(run, where)
    onnx_name = (aside(onnx_dest) if result.gate and not result.gate.passed else onnx_dest).name
    with writing(onnx_dest, "spofa export"):  # the ONNX beside the engine is a target of its own: its lock too
        for target in (onnx_dest, aside(onnx_dest)):
            _clean_leftovers(target)
        replaced = onnx_dest.exists()
        job.install([(built.path, onnx_dest, job.sidecar("onnx", built.precision, onnx_dest, **built.extra)),
                     (plan, job.dest, job.sidecar("trt", precision, job.dest, onnx=onnx_name,
                                                  parity_engine=result.parity_engine.to_dict(), **engine,
                                                  **built.extra))])
    if replaced:  # (install refuses a failed gate first) an intermediate regenerated from the same source
        _log.warning(f"replaced {onnx_dest.name} with the ONNX this engine is built from")
    result.onnx_path = onnx_dest


def describe(path: Path, trust: bool = False) -> Artifact:
    """An engine and its sidecar; where TensorRT and a GPU are here, refused when another TensorRT version or
    GPU built it. Without a sidecar it is refused unless `trust`: the engine itself then says what it takes."""
    meta = read_sidecar(path, "trt", trust=trust, native=True)
    if meta is None:
        return _trusted(path)
    here = _here()
    if here is not None:
        check_engine_meta(meta, here, path)
    return exported(path, "trt", meta)


def _here() -> dict | None:
    """This machine's TensorRT version and GPU, None where it has no TensorRT or no GPU (nothing runs an engine)."""
    try:
        trt = import_tensorrt()
        require_gpu()
    except Exception:  # noqa: BLE001 - MissingDependency, or a broken install: the runner says why it cannot run
        return None
    return {"tensorrt": trt.__version__, **gpu_info(torch.cuda.current_device())}


def _trusted(path: Path) -> Artifact:
    """An engine without a sidecar, run on the user's word (--trust): input and classes read from the engine."""
    r = TrtEngine(path)  # MissingDependency where TensorRT or a GPU is missing
    c, h, _ = (int(d) for d in r.input_shape)
    classes = int(tuple(r.engine.get_tensor_shape(r.output_name))[-1])
    meta = {"model": path.stem, "format": "trt", "img_size": h, "in_chans": c, "num_classes": classes,
            "batch": r.batch, "trusted_without_sidecar": True}
    return Artifact(path=path, format="trt", meta=meta, precision="unknown", size_bytes=path.stat().st_size,
                    batch_range=(r.min_batch, r.max_batch))


def runner(art: Artifact, backend: str, device: str, precision: str, options: RunOptions) -> TrtRunner:
    """The engine on the GPU (`trt`)."""
    if backend != "trt":
        raise UserError(f"backend {backend} cannot run {art.path.name}")
    return TrtRunner(art)
