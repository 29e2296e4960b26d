"""`export_model`: the one library entry point of `spofa export` (ONNX, TensorRT, .pt2).

student.safetensors + student.json
  -> fp32 ONNX (checker, onnxslim, ORT parity on real val images; fails beyond
     1e-3 + 1e-4 x the logit scale, or on a decisive top-1 flip: `onnx.compare_logits`)
  -> [int8: calibration set -> Q/DQ ONNX (quantizer by target) -> size and ORT CPU latency vs fp32]
     [fp16/bf16: AutoCast]
  -> .onnx, or TensorRT engine (the ONNX it was built from is kept beside it; the engine's
     own output is checked against PyTorch on the GPU, the only place a bf16 graph runs)
  -> reduced precision: the accuracy gate (`export.gate`): val top-1 of the artifact vs PyTorch;
     beyond `max_drop` the artifact is set aside as `<name>.refused<suffix>` and the export fails
  -> `<artifact>.json` sidecar (what was checked where: `parity`, `parity_fp32`, `parity_engine`, `gate`)

The default batch is dynamic (`DEFAULT_BATCH`, 1..256): one artifact serves `spofa bench`'s
batch-1 latency and its large-batch throughput, and a TensorRT engine gets that profile.

Every file is written under a temp name and renamed when complete, so a failed export leaves
no partial file; intermediates live in a hidden temp folder beside the output. An artifact and
its sidecar appear as a pair: the artifact first, the sidecar (with the artifact's SHA-256) last,
under a marker file, so the next export to that place removes the pair a killed export left half
published, with any temp files. One export writes a target at a time (`artifacts.writing`).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx

from calibration.dataset import calibration_set, load_images
from calibration.quantize import quantize_int8, resolve_quantizer
from spofa_deploy.artifacts import (DIGEST_KEYS, atomic_path, check_output_file, file_digest, latest_run, load_model,
                                    read_json, read_model_meta, sidecar_path, versions, write_json, writing)
from spofa_deploy.errors import MissingDependency, UserError, os_error
from spofa_deploy.run_files import STUDENT_FILE, TEACHER_FILE

from . import gate as gates
from . import onnx as onnx_export
from . import payoff as payoffs
from . import pt2 as pt2_export
from . import tensorrt as trt_export
from .formats import FORMATS, Format, artifact_name, format_for_path, get_format
from .gate import GateResult
from .onnx import BatchProfile, Parity

INT8_WARN_DROP = 1.0  # points of val top-1: ORT's fused int8 kernels below the Q/DQ as written
# Default batch profile MIN:OPT:MAX. MAX 256 is the large batch `spofa bench` reports on a GPU;
# OPT 16 sits between batch-1 latency and throughput (TensorRT tunes its kernels for OPT).
DEFAULT_BATCH = "1:16:256"


@dataclass
class ExportResult:
    """What `export_model` wrote and measured."""

    path: Path
    sidecar: Path
    format: str
    precision: str
    size_bytes: int
    opset: int
    batch: dict
    source: Path
    parity: Parity | None = None  # the artifact's ONNX vs PyTorch in ORT CPU (None: ORT CPU cannot run it)
    parity_engine: Parity | None = None  # a TensorRT engine vs PyTorch, on the GPU
    fp32_top1: float | None = None  # val top-1 of the PyTorch model (int8 exports; QAT: before QAT)
    int8_top1: float | None = None  # same images, the Q/DQ model as written in ORT CPU (no int8 kernel fusion)
    int8_top1_ort_kernels: float | None = None  # same, through ORT's fused int8 CPU kernels
    eval_samples: int = 0
    gate: GateResult | None = None  # the accuracy gate (reduced precision): the artifact vs PyTorch
    payoff: dict | None = None  # INT8 ONNX vs fp32 ONNX: size and ORT CPU latency (`export.payoff`)
    onnx_path: Path | None = None  # engines: the ONNX they were built from
    quantization: dict | None = None
    engine: dict | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def resolve_source(source: str | Path | None, teacher: bool = False) -> Path:
    """The .safetensors to export: `runs/latest/student.safetensors` by default, or its teacher.

    Args:
        source: a model file, a run folder, or None (the latest run).
        teacher: export the teacher of that run (`teacher_file` in the student's metadata).
    """
    path = latest_run() / STUDENT_FILE if source is None else Path(source)
    if path.is_dir():
        path = path / STUDENT_FILE
    if path.suffix != ".safetensors":
        try:
            kind = format_for_path(path).name
        except UserError:
            kind = None
        hint = f" ({path.name} is already an exported {kind} artifact)" if kind else ""
        raise UserError(f"export takes a .safetensors model file{hint}")
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if not teacher:
        return path
    meta = read_model_meta(path)
    if meta.get("role") == "teacher":
        return path
    tfile = meta.get("teacher_file") or TEACHER_FILE
    tpath = path.parent / tfile
    if not tpath.is_file():
        raise UserError(f"--teacher: {tpath} not found beside {path.name} (name the teacher .safetensors instead)")
    return tpath


def _output_path(out: str | Path | None, src: Path, fmt: Format, precision: str, force: bool) -> Path:
    default = artifact_name(src.stem, fmt, precision)
    path = src.parent / default if out is None else Path(out)
    if path.is_dir():
        path = path / default
    if path.suffix != fmt.suffix:
        raise UserError(f"--out {path} does not end in {fmt.suffix} (the {fmt.name} suffix)")
    return check_output_file(path, "--out")


def _check_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"{path} exists: pass --force to overwrite it")


def _pending(dest: Path) -> Path:
    """The marker that stands beside `dest` while its artifact and sidecar are being published."""
    return dest.with_name(f".{dest.name}.publishing")


def _work_prefix(dest: Path) -> str:
    return f".spofa-export-{dest.name}-"


def _clean_leftovers(dest: Path, warnings: list[str]) -> None:
    """Remove what a killed export to `dest` left: temp files, its work folder, a half-published pair.

    Runs under the target's lock, so nothing removed here belongs to a live export.
    """
    side = sidecar_path(dest)
    for pattern in (f".{dest.name}.*.tmp", f".{side.name}.*.tmp"):
        for tmp in dest.parent.glob(pattern):
            tmp.unlink(missing_ok=True)
    for work in dest.parent.glob(_work_prefix(dest) + "*"):
        shutil.rmtree(work, ignore_errors=True)
    marker = _pending(dest)
    if not marker.exists():
        return
    if dest.is_file() and side.is_file() and _pair_complete(dest, side):
        marker.unlink()  # killed after the sidecar: the pair is whole
        return
    for f in (dest, side, marker):
        f.unlink(missing_ok=True)
    warnings.append(f"removed {dest.name} and its sidecar, left half written by an interrupted export")


def _pair_complete(dest: Path, side: Path) -> bool:
    try:
        want = read_json(side).get("sha256")
    except UserError:
        return False
    return want is not None and want == file_digest(dest)["sha256"]


def _batch_profile(batch: int | None, dynamic_batch) -> BatchProfile:
    if batch is not None and dynamic_batch is not None:
        raise UserError("give --batch N (fixed) or --dynamic-batch MIN:OPT:MAX, not both")
    if batch is not None:
        return BatchProfile.fixed(batch)
    if dynamic_batch is None or isinstance(dynamic_batch, str):
        return BatchProfile.parse(dynamic_batch or DEFAULT_BATCH)
    try:
        lo, opt, hi = (int(v) for v in dynamic_batch)
    except (TypeError, ValueError):
        raise UserError(f"dynamic_batch must be (min, opt, max), got {dynamic_batch!r}") from None
    return BatchProfile.dynamic_range(lo, opt, hi)


def _check_dependencies(fmt: Format, precision: str, slim: bool | None, quantizer: str, device: str) -> None:
    """Fail before any work when something the export needs is missing."""
    if fmt.name == "pt2":
        pt2_export.require_toolchain(device)
        pt2_export.check_precision(precision, device)
        return
    if fmt.name == "trt":
        fmt.require()
        trt_export.require_gpu()
        if trt_export.onnx_precision_for(precision) in ("fp16", "bf16"):
            onnx_export.require_autocast(f"{precision} on TensorRT {trt_export.trt_version()[0]} (strongly typed)")
    else:
        fmt.require(precision)
        if precision in ("fp16", "bf16"):
            onnx_export.require_autocast(f"{precision} ONNX")
    if slim and not onnx_export.slim_available():
        raise MissingDependency("onnxslim is not installed: pip install 'spofa-deploy[slim]' (or pass --no-slim)")
    if precision == "int8":
        resolve_quantizer(quantizer, fmt.name)


def _tool_versions(*extra: str) -> dict:
    out = versions()
    for dist in extra:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _sidecar(meta: dict, *, fmt: str, precision: str, opset: int, batch: BatchProfile, source: Path,
             artifact: Path, **extra) -> dict:
    # The source's own digest describes the source: it is kept as source_sha256; `_publish` adds the artifact's.
    base = {k: v for k, v in meta.items() if k not in ("versions", "saved_at", *DIGEST_KEYS)}
    src = source.name if source.resolve().parent == artifact.resolve().parent else str(source.resolve())
    return {**base, "format": fmt, "precision": precision, **({"opset": opset} if opset is not None else {}),
            "batch": batch.to_dict(),
            "input": onnx_export.INPUT_NAME, "output": onnx_export.OUTPUT_NAME, "source": src,
            "source_sha256": meta.get("sha256"),
            "exported": datetime.now().isoformat(timespec="seconds"),
            "versions": _tool_versions("onnxslim", "nvidia-modelopt"), "source_versions": meta.get("versions"),
            **{k: v for k, v in extra.items() if v is not None}}


def _publish(tmp_file: Path, dest: Path, sidecar: dict) -> None:
    """Move the finished file into place, then write its sidecar with the file's digest.

    A marker stands beside `dest` in between: a kill there leaves the new artifact under the
    old sidecar (or none), which every reader refuses by the digest, and which the next export
    to `dest` removes (`_clean_leftovers`).
    """
    digest = file_digest(tmp_file)
    marker = _pending(dest)
    write_json(marker, digest)
    with atomic_path(dest) as tmp:
        os.replace(tmp_file, tmp)
    _after_artifact(dest)
    write_json(sidecar_path(dest), {**sidecar, **digest})
    marker.unlink()


def _after_artifact(dest: Path) -> None:
    """A seam between the two renames of `_publish` (fault injection in tests)."""


def _parity_images(meta: dict, n: int, seed: int, warnings: list[str]) -> tuple[np.ndarray, str]:
    try:
        return load_images(meta, "val", n, seed=seed).images, "val"
    except UserError as e:
        warnings.append(f"validation images unavailable ({e}): parity checked on random inputs")
        size, chans = int(meta["img_size"]), int(meta.get("in_chans", 3))
        return np.random.default_rng(seed).standard_normal((n, chans, size, size), dtype=np.float32), "random"


class _Gate:
    """The accuracy gate of one export (`export.gate`): scores the artifact against PyTorch on val images."""

    def __init__(self, model, meta: dict, max_drop: float, samples: int, seed: int, warnings: list[str]):
        self.model, self.meta, self.max_drop, self.samples, self.seed = model, meta, max_drop, samples, seed
        self.warnings = warnings

    def scores(self, predictors: dict) -> gates.Scores | None:
        """Val top-1 of PyTorch and each predictor, or None (with a warning) without validation images."""
        try:
            return gates.score(self.model, self.meta, predictors, self.samples, self.seed)
        except UserError as e:
            self.warnings.append(f"accuracy not measured: validation images unavailable ({e})")
            return None

    def judge(self, predict, checked_on: str) -> GateResult | None:
        """The gate's result for one predictor; None where it is disabled (--max-drop 0) or cannot run."""
        if self.max_drop <= 0:
            return None
        scores = self.scores({"artifact": predict})
        return gates.verdict(scores, "artifact", self.max_drop, checked_on) if scores else None


def _aside(dest: Path) -> Path:
    """Where a refused artifact is kept: `student.int8.onnx` -> `student.int8.refused.onnx`."""
    return dest.with_name(f"{dest.stem}.refused{dest.suffix}")


def _install(files: list[tuple[Path, Path, dict]], result: ExportResult) -> None:
    """Publish each (file, dest, sidecar) with the gate's result; set aside and refuse when the gate fails.

    Raises:
        UserError: the gate failed: the files are published under `_aside` names, never at `dest`.
    """
    gate = result.gate
    entry = {"gate": gate.to_dict()} if gate is not None else {}
    if gate is None or gate.passed:
        for file, dest, side in files:
            _publish(file, dest, {**side, **entry})
        return
    for file, dest, side in files:  # overwrites what an earlier refusal set aside
        _publish(file, _aside(dest), {**side, **entry, "refused": True})
    raise UserError(gates.refusal(gate, result.precision, _aside(files[-1][1]).name))


@dataclass(frozen=True)
class _Int8Options:
    """How an INT8 ONNX is calibrated and judged (the `export_model` keywords of the same names)."""

    calib_data: str | None
    calib_samples: int
    quantizer: str
    keep_ends: bool
    seed: int
    target: str  # the export format: onnx or trt


def _int8_onnx(fp32: Path, dest: Path, meta: dict, result: ExportResult, opts: _Int8Options, gate: _Gate,
               fixed: int | None) -> dict:
    """Calibrate and quantize `fp32` into `dest`; its val top-1 against PyTorch and its payoff into `result`."""
    calib = calibration_set(meta, opts.calib_data, opts.calib_samples, opts.seed)
    info = quantize_int8(fp32, dest, calib.images, quantizer=opts.quantizer, target=opts.target,
                         keep_ends=opts.keep_ends, calib_data=calib.spec, notes=result.warnings)
    onnx_export.check_onnx(dest)
    result.quantization = info.to_dict()
    written, kernels = onnx_export.ort_session(dest, fused=False), onnx_export.ort_session(dest)
    scores = gate.scores({"written": lambda x: onnx_export.run_onnx(written, x, fixed),
                          "kernels": lambda x: onnx_export.run_onnx(kernels, x, fixed)})
    if scores is not None:
        result.fp32_top1, result.eval_samples = scores.reference, scores.n
        result.int8_top1, result.int8_top1_ort_kernels = scores.top1["written"], scores.top1["kernels"]
        # The Q/DQ arithmetic as written is what the graph means and what TensorRT reproduces.
        result.gate = gates.verdict(scores, "written", gate.max_drop, "onnxruntime-cpu, Q/DQ as written")
        if result.int8_top1 - result.int8_top1_ort_kernels > INT8_WARN_DROP:
            result.warnings.append(f"ONNX Runtime's fused int8 CPU kernels score {result.int8_top1_ort_kernels:.2f}% "
                                   f"here (vs {result.int8_top1:.2f}% with the Q/DQ as written): int16 saturation on "
                                   "CPUs without VNNI; TensorRT is not affected")
    if opts.target == "onnx":
        _int8_payoff(fp32, dest, meta, result)
    return {**info.to_dict(), "fp32_top1": result.fp32_top1, "int8_top1": result.int8_top1,
            "int8_top1_ort_kernels": result.int8_top1_ort_kernels, "eval_samples": result.eval_samples,
            "payoff": result.payoff}


def _int8_payoff(fp32: Path, int8: Path, meta: dict, result: ExportResult) -> None:
    """INT8 against fp32 where the ONNX runs (ONNX Runtime CPU): size and latency, said plainly when worse."""
    batch = result.batch
    lo, hi = (batch["min"], batch["max"]) if batch["dynamic"] else (batch["opt"], batch["opt"])
    shape = (int(meta.get("in_chans", 3)), int(meta["img_size"]), int(meta["img_size"]))
    result.payoff = payoffs.int8_payoff(fp32, int8, shape, payoffs.payoff_batches(lo, hi))
    result.warnings.extend(payoffs.slower(result.payoff))


def _engine(onnx_file: Path, dest: Path, work: Path, side: dict, extra: dict, result: ExportResult,
            check: _ParityCheck, gate: _Gate, *, onnx_prec: str, workspace_gib: float, timing_cache,
            tf32: bool) -> None:
    """Build the engine from the ONNX, check and gate it on the GPU, publish both (the ONNX kept beside it)."""
    src, precision = side["source"], result.precision
    onnx_dest = dest.parent / artifact_name(src.stem, FORMATS["onnx"], onnx_prec)
    cache = None if timing_cache in (None, False) else timing_cache  # True: the default, keyed by version and GPU
    plan = work / "model.engine"
    engine = trt_export.build_engine(onnx_file, plan, precision, side["batch"], workspace_gib=workspace_gib,
                                     timing_cache=cache, tf32=tf32)
    result.warnings.extend(engine.pop("warnings", []))
    result.engine = engine
    where = f"tensorrt {engine.get('tensorrt')} on {engine.get('gpu')}"
    # The engine's own output, on the GPU that built it: the one check a bf16 graph can have here.
    result.parity_engine = check.engine(plan, where, tf32=engine.get("tf32", False))
    if result.parity_engine.top1_agreement < 99.0:
        result.warnings.append(f"engine top-1 agrees with PyTorch on {result.parity_engine.top1_agreement:.1f}% "
                               f"of {result.parity_engine.n} images only")
    if precision != "fp32":  # the engine, not its ONNX in ORT CPU, is what the gate judges
        result.gate = gate.judge(trt_export.engine_predictor(plan, trust=True), where)
    if onnx_dest.exists():  # an intermediate, regenerated from the same source: replaced, with a note
        result.warnings.append(f"replaced {onnx_dest.name} with the ONNX this engine is built from")
    onnx_name = (_aside(onnx_dest) if result.gate and not result.gate.passed else onnx_dest).name
    _install([(onnx_file, onnx_dest, _sidecar(**side, fmt="onnx", precision=onnx_prec, artifact=onnx_dest, **extra)),
              (plan, dest, _sidecar(**side, fmt="trt", precision=precision, artifact=dest, onnx=onnx_name,
                                    parity_engine=result.parity_engine.to_dict(), **engine, **extra))], result)
    result.onnx_path = onnx_dest


def _pt2(model, meta: dict, src: Path, dest: Path, profile: BatchProfile, device: str, result: ExportResult,
         check: _ParityCheck, gate: _Gate) -> None:
    """Compile the .pt2 in a temp folder, check and gate it against PyTorch, publish it with its sidecar."""
    with tempfile.TemporaryDirectory(prefix=_work_prefix(dest), dir=dest.parent) as work:
        pkg = Path(work) / "model.pt2"
        facts = pt2_export.export_pt2(model, pkg, img_size=int(meta["img_size"]), batch=profile,
                                      precision=result.precision, device=device, in_chans=int(meta.get("in_chans", 3)))
        result.warnings.extend(facts.pop("warnings"))
        for k in ("precision", "batch", "input", "output"):  # `_sidecar` writes these itself
            facts.pop(k)
        result.parity = check.pt2(pkg, profile, device)
        if result.precision == "fp32" and not result.parity.passed:
            raise UserError(f"the .pt2 package differs from PyTorch beyond tolerance: {result.parity.describe()}"
                            f"{_flips(result.parity)}: nothing written")
        if result.parity.top1_agreement < 99.0:
            result.warnings.append(f".pt2 top-1 agrees with PyTorch on {result.parity.top1_agreement:.1f}% "
                                   f"of {result.parity.n} images only")
        if result.precision != "fp32":
            result.gate = gate.judge(pt2_export.pt2_predictor(pkg, profile, device=device), result.parity.checked_on)
        _install([(pkg, dest, _sidecar(meta, fmt="pt2", precision=result.precision, opset=None, batch=profile,
                                       source=src, artifact=dest, parity=result.parity.to_dict(), **facts))], result)


class _ParityCheck:
    """The exported model against PyTorch on the same images: in ONNX Runtime CPU, or on a built engine."""

    def __init__(self, model, meta: dict, n: int, seed: int, warnings: list[str], fixed: int | None,
                 tolerance: dict):
        self.images, self.kind = _parity_images(meta, n, seed, warnings)
        self.reference = onnx_export.torch_logits(model, self.images)
        self.fixed, self.tolerance = fixed, tolerance

    def onnx(self, path: Path, fused: bool = True) -> Parity:
        return onnx_export.parity(self.reference, onnx_export.ort_session(path, fused=fused), self.images,
                                  self.fixed, self.kind, **self.tolerance)

    def pt2(self, path: Path, batch: BatchProfile, device: str) -> Parity:
        return pt2_export.parity_pt2(self.reference, path, self.images, batch, self.kind, device=device,
                                     **self.tolerance)

    def engine(self, path: Path, where: str, tf32: bool = False) -> Parity:
        # The plan has no sidecar yet (it is published after this check): built here a moment ago, so trusted.
        tolerance = ({k: max(v, trt_export.TF32_TOLERANCE[k]) for k, v in self.tolerance.items()} if tf32
                     else self.tolerance)  # an fp32 engine's TF32 layers: TF32-sized, not an fp32 failure
        return onnx_export.compare_logits(self.reference, trt_export.engine_logits(path, self.images, trust=True), self.kind,
                                          checked_on=where, **tolerance)


def _flips(p: Parity) -> str:
    return f"; {p.decisive_disagreements} decisive top-1 flip(s)" if p.decisive_disagreements else ""


def _fp32_onnx(model, meta: dict, path: Path, profile: BatchProfile, check: _ParityCheck, *, opset: int,
               exporter: str, slim: bool) -> tuple[Parity, dict]:
    """Export, check and optionally slim the fp32 ONNX at `path`, then check it against PyTorch.

    Returns:
        Its parity, and the sidecar entries of how it was made (slim, slim_nodes, exporter).
    """
    onnx_export.export_onnx(model, path, img_size=int(meta["img_size"]), batch=profile, opset=opset,
                            exporter=exporter, in_chans=int(meta.get("in_chans", 3)))
    onnx_export.check_onnx(path)
    nodes = onnx_export.slim_onnx(path) if slim else None
    onnx_export.check_onnx(path)
    parity = check.onnx(path, fused=not meta.get("qat"))  # a QAT graph is Q/DQ: judged as written, like int8
    # A QAT graph may differ by a rounding step where PyTorch's fake quant and ORT's QuantizeLinear break a tie
    # differently: beyond the fp32 tolerance, but it fails only on a decisive top-1 flip.
    if not parity.passed and not (meta.get("qat") and parity.decisive_disagreements == 0):
        raise UserError(f"ONNX Runtime output differs from PyTorch beyond tolerance: {parity.describe()}"
                        f"{_flips(parity)}: nothing written (try --no-slim or another --opset)")
    return parity, {"slim": nodes is not None, "slim_nodes": list(nodes) if nodes else None, "exporter": exporter}


def _reduced_onnx(fp32: Path, onnx_prec: str, meta: dict, result: ExportResult, check: _ParityCheck,
                  int8: _Int8Options, gate: _Gate, extra: dict) -> Path:
    """The ONNX of `onnx_prec` made from `fp32` (Q/DQ, AutoCast, or `fp32` itself); its parity and gate into `result`."""
    if onnx_prec == "int8" and meta.get("qat"):  # a QAT student exports its own Q/DQ: nothing to calibrate
        extra["int8"] = _qat_onnx(fp32, meta, result, check.fixed, gate)
        return fp32
    if onnx_prec == "int8":
        final = fp32.with_name("int8.onnx")
        extra["int8"] = _int8_onnx(fp32, final, meta, result, int8, gate, check.fixed)
        result.parity = check.onnx(final, fused=False)
        return final
    if onnx_prec in ("fp16", "bf16"):
        final = fp32.with_name(f"{onnx_prec}.onnx")
        onnx_export.autocast(fp32, final, onnx_prec)
        onnx_export.check_onnx(final)
        # ORT's CPU provider has no bf16 Conv kernel: such a graph is checked on its engine only.
        if onnx_export.ort_runs(onnx_prec):
            session = onnx_export.ort_session(final)
            result.parity = check.onnx(final)
            result.gate = gate.judge(lambda x: onnx_export.run_onnx(session, x, check.fixed), "onnxruntime-cpu")
        else:
            result.parity = None
        return final
    return fp32


def _onnx_artifact(model, meta: dict, src: Path, dest: Path, fmt: Format, profile: BatchProfile,
                   result: ExportResult, check: _ParityCheck, *, opset: int, exporter: str, slim: bool,
                   int8: _Int8Options, gate: _Gate, workspace_gib: float, timing_cache, tf32: bool) -> None:
    """fp32 ONNX -> [INT8 / AutoCast] -> the `.onnx`, or the engine built from it; gated, published with sidecars."""
    with tempfile.TemporaryDirectory(prefix=_work_prefix(dest), dir=dest.parent) as work:
        fp32 = Path(work) / "fp32.onnx"
        fp32_parity, extra = _fp32_onnx(model, meta, fp32, profile, check, opset=opset, exporter=exporter, slim=slim)
        # The ONNX the artifact is (format onnx) or is built from (format trt).
        onnx_prec = trt_export.onnx_precision_for(result.precision) if fmt.name == "trt" else result.precision
        result.parity = fp32_parity
        final = _reduced_onnx(fp32, onnx_prec, meta, result, check, int8, gate, extra)
        if final != fp32:
            extra["parity_fp32"] = fp32_parity.to_dict()
        result.opset = onnx_export.model_opset(onnx.load(str(final), load_external_data=False))
        extra["parity"] = result.parity.to_dict() if result.parity else None
        if result.parity is None:
            extra["parity_note"] = f"{onnx_prec} ONNX not run by ONNX Runtime CPU (no kernels): checked on the engine"
        side = dict(meta=meta, opset=result.opset, batch=profile, source=src)
        if fmt.name == "onnx":
            _install([(final, dest, _sidecar(**side, fmt="onnx", precision=result.precision, artifact=dest,
                                             **extra))], result)
        else:
            _engine(final, dest, Path(work), side, extra, result, check, gate, onnx_prec=onnx_prec,
                    workspace_gib=workspace_gib, timing_cache=timing_cache, tf32=tf32)


def _load_source(src: Path, precision: str):
    """The model to export: a QAT student (`spofa qat`, fake quantizers inside: int8 only) or a plain timm model."""
    if not read_model_meta(src).get("qat"):
        return load_model(src, exportable=True)
    if precision != "int8":
        raise UserError(f"{src.name} is a QAT student: it exports at --precision int8 only")
    from calibration.qat import load_qat_model

    return load_qat_model(src)


def _qat_onnx(qdq: Path, meta: dict, result: ExportResult, fixed: int | None, gate: _Gate) -> dict:
    """Check the Q/DQ graph a QAT student exported (TensorRT's rules); its val top-1 and gate into `result`.

    The gate's PyTorch model is the QAT student itself (fake quantizers in): what was exported.
    """
    from calibration.quantize import check_trt_qdq

    problems = check_trt_qdq(onnx.load(str(qdq)))
    if problems:
        raise UserError(f"the QAT student's ONNX is not TensorRT-compatible: {'; '.join(problems[:3])}")
    settings = meta["qat_settings"]
    result.quantization = {"quantizer": "qat", "calib_samples": settings["calib_samples"],
                           "calib_data": settings["calib_data"],
                           "excluded_nodes": settings.get("kept_float", [])}  # (module names: float in training)
    session = onnx_export.ort_session(qdq, fused=False)
    scores = gate.scores({"written": lambda x: onnx_export.run_onnx(session, x, fixed)})
    if scores is not None:
        result.int8_top1, result.eval_samples = scores.top1["written"], scores.n
        result.fp32_top1 = settings["fp32_top1"]  # (the student before QAT, in PyTorch, on the same val split)
        result.gate = gates.verdict(scores, "written", gate.max_drop, "onnxruntime-cpu, Q/DQ as written")
    return {**result.quantization, "qat": True, "qat_settings": settings, "int8_top1": result.int8_top1,
            "eval_samples": result.eval_samples}


def export_model(source: Path | str | None, fmt: str, precision: str = "fp32", *, batch: int | None = None,
                 dynamic_batch: tuple[int, int, int] | str | None = None, opset: int = onnx_export.MIN_OPSET,
                 out: Path | str | None = None, force: bool = False, calib_data: str | None = None,
                 calib_samples: int = 512, teacher: bool = False, quantizer: str = "auto", keep_ends: bool = True,
                 slim: bool | None = None, parity_samples: int = 64, parity_atol: float = onnx_export.PARITY_ATOL,
                 parity_rtol: float = onnx_export.PARITY_RTOL, eval_samples: int = gates.DEFAULT_SAMPLES,
                 max_drop: float = gates.DEFAULT_MAX_DROP, workspace_gib: float = 4.0, tf32: bool = True,
                 timing_cache: Path | None | bool = True, exporter: str = "torchscript", device: str = "cpu",
                 seed: int = 0) -> ExportResult:
    """Export a student (or its teacher) to ONNX or a TensorRT engine, with a JSON sidecar.

    Args:
        source: a `.safetensors` model, a run folder, or None for `runs/latest`.
        fmt: "onnx" or "trt" (see `export.formats.FORMATS`).
        precision: fp32 | fp16 | bf16 | int8 (what the format allows).
        batch: a fixed batch size (not with `dynamic_batch`).
        dynamic_batch: (min, opt, max) or "MIN:OPT:MAX": symbolic batch + TensorRT profile
            (default, with neither given: `DEFAULT_BATCH`).
        opset: ONNX opset, >= 17.
        out: output file or folder (default: beside the source, e.g. `student.int8.onnx`).
        force: overwrite an existing output.
        calib_data: data spec for INT8 calibration (default: the model's own data).
        calib_samples: calibration images (seeded, stratified, from the training split).
        teacher: export the run's teacher instead of the student.
        quantizer: auto (ModelOpt for TensorRT where its ONNX quantizer can run, ONNX Runtime's for
            ONNX: `calibration.quantize.resolve_quantizer`) | ort | modelopt.
        keep_ends: INT8 keeps the first conv and the classifier in fp32 (measured better).
        slim: simplify with onnxslim (None: when installed).
        parity_samples: validation images for the ORT-vs-PyTorch check.
        parity_atol, parity_rtol: the fp32 export fails where |ORT - PyTorch| > atol + rtol x the
            image's largest |logit|, or where a decisive top-1 differs (`onnx.compare_logits`).
        eval_samples: validation images of the accuracy gate (and of the INT8 top-1).
        max_drop: the accuracy gate of a reduced-precision export: refused (set aside as
            `<name>.refused<suffix>`, UserError) when its val top-1 is more than this many points
            below the PyTorch model's; 0 disables the refusal (`export.gate`).
        workspace_gib: TensorRT builder workspace.
        tf32: TensorRT may run fp32 layers in TF32 (its default; recorded in the sidecar, the engine's
            parity then judged at `tensorrt.TF32_TOLERANCE`); False clears the flag (trtexec's --noTF32).
        timing_cache: TensorRT timing cache file (True: one per TensorRT version and GPU
            architecture under `~/.cache/spofa/`, `tensorrt.default_timing_cache`; None/False: off).
        exporter: "torchscript" (default) or "dynamo", see `export/onnx.py`.
        device: the device a `.pt2` package is compiled for (cpu | cuda); other formats ignore it.
        seed: seed of every image draw.

    Raises:
        UserError: bad input (unknown format/precision, missing metadata, existing output, ...), or
            the accuracy gate refused the export.
        MissingDependency: TensorRT, a GPU, ModelOpt or onnxslim is needed and missing.
    """
    start = time.perf_counter()
    f = get_format(fmt)
    precision = f.check_precision(precision)
    if f.name != "pt2":
        onnx_export.check_opset(opset, exporter)
    profile = _batch_profile(batch, dynamic_batch)
    gates.check_max_drop(max_drop, eval_samples)
    _check_dependencies(f, precision, slim, quantizer, device)
    src = resolve_source(source, teacher)
    dest = _output_path(out, src, f, precision, force)
    with writing(dest, "spofa export"):
        notes: list[str] = []
        _clean_leftovers(dest, notes)
        _check_overwrite(dest, force)
        model, meta = _load_source(src, precision)
        result = ExportResult(path=dest, sidecar=sidecar_path(dest), format=f.name, precision=precision, size_bytes=0,
                              opset=None if f.name == "pt2" else opset, batch=profile.to_dict(), source=src,
                              warnings=notes)
        try:
            _export(model, meta, src, dest, f, profile, result, opset=opset, exporter=exporter, slim=slim,
                    int8=_Int8Options(calib_data, calib_samples, quantizer, keep_ends, seed, f.name),
                    parity=(parity_samples, seed, {"atol": parity_atol, "rtol": parity_rtol}),
                    gate=(max_drop, eval_samples), device=device,
                    workspace_gib=workspace_gib, timing_cache=timing_cache, tf32=tf32)
        except OSError as e:  # a full disk, a folder that became read-only: the output's problem, named so
            raise (os_error(e, dest) or e) from e
    result.size_bytes, result.seconds = dest.stat().st_size, time.perf_counter() - start
    return result


def _export(model, meta: dict, src: Path, dest: Path, f: Format, profile: BatchProfile, result: ExportResult, *,
            opset: int, exporter: str, slim: bool | None, int8: _Int8Options, parity: tuple, gate: tuple,
            device: str, workspace_gib: float, timing_cache, tf32: bool) -> None:
    """Build, check, gate and publish the artifact of format `f` (the work of `export_model`, under its lock)."""
    samples, seed, tolerance = parity
    check = _ParityCheck(model, meta, samples, seed, result.warnings, None if profile.dynamic else profile.opt,
                         tolerance)
    judge = _Gate(model, meta, *gate, seed, result.warnings)
    if f.name == "pt2":
        _pt2(model, meta, src, dest, profile, device, result, check, judge)
    else:
        _onnx_artifact(model, meta, src, dest, f, profile, result, check, opset=opset, exporter=exporter,
                       slim=onnx_export.slim_available() if slim is None else slim, int8=int8, gate=judge,
                       workspace_gib=workspace_gib, timing_cache=timing_cache, tf32=tf32)
