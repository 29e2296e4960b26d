"""`export_model`: the one library entry point of `spofa export` (ONNX, TensorRT, .pt2).

student.safetensors + student.json
  -> the format's home builds the artifact (`export.formats`: `export.onnx`, `export.tensorrt`, `export.pt2`)
  -> parity against PyTorch on real val images, through the runner `spofa bench` times (fails beyond
     1e-3 + 1e-4 x the logit scale, or on a decisive top-1 flip: `export.parity.compare_logits`)
  -> reduced precision: the accuracy gate (`export.gate`): val top-1 of the artifact vs PyTorch;
     beyond `max_drop` the artifact is set aside as `<name>.refused<suffix>` and the export fails
  -> `<artifact>.json` sidecar (what was checked where: `parity`, `parity_fp32`, `parity_engine`, `gate`)

The default batch is dynamic (`export.options.DEFAULT_BATCH`, 1..256): one artifact serves `spofa bench`'s
batch-1 latency and its large-batch throughput, and a TensorRT engine gets that profile.

Every file is written under a temp name and renamed when complete, so a failed export leaves
no partial file; intermediates live in a hidden temp folder beside the output. An artifact and
its sidecar appear as a pair: the artifact first, the sidecar (with the artifact's SHA-256) last,
under a marker file, so the next export to that place removes the pair a killed export left half
published, with any temp files. One export writes a target at a time (`run_dirs.writing`).
Warnings are log records (`logging`); those of one export are also kept in its `ExportResult.warnings`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from calibration.dataset import load_images
from spofa_deploy.artifacts import (DIGEST_KEYS, INPUT_NAME, OUTPUT_NAME, atomic_path, check_output_file, file_digest,
                                    read_json, read_model_meta, sidecar_path, versions, write_json)
from spofa_deploy.errors import UserError, os_error
from spofa_deploy.run_dirs import latest_run, writing
from spofa_deploy.run_files import STUDENT_FILE, TEACHER_FILE

from . import gate as gates
from .artifact import Artifact, BatchProfile
from .formats import FORMATS, Format, artifact_name, format_for_path, get_format
from .gate import GateResult
from .options import ExportOptions
from .parity import Parity, compare_logits, torch_logits
from .runner import Runner

_log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What `export_model` wrote and measured."""

    path: Path
    sidecar: Path
    format: str
    precision: str
    size_bytes: int
    opset: int | None
    batch: dict
    source: Path
    parity: Parity | None = None  # the artifact (or its ONNX) vs PyTorch (None: ORT CPU cannot run a bf16 ONNX)
    parity_engine: Parity | None = None  # a TensorRT engine vs PyTorch, on the GPU
    fp32_top1: float | None = None  # val top-1 of the PyTorch model (int8 exports; QAT: before QAT)
    int8_top1: float | None = None  # same images, the Q/DQ model as written in ORT CPU (no int8 kernel fusion)
    int8_top1_ort_kernels: float | None = None  # same, through ORT's fused int8 CPU kernels
    eval_samples: int = 0
    gate: GateResult | None = None  # the accuracy gate (reduced precision): the artifact vs PyTorch
    payoff: dict | None = None  # INT8 ONNX vs fp32 ONNX: size and ORT CPU latency (`export.onnx.payoff`)
    onnx_path: Path | None = None  # engines: the ONNX they were built from
    quantization: dict | None = None
    engine: dict | None = None
    warnings: list[str] = field(default_factory=list)  # the warnings logged while it ran
    seconds: float = 0.0


def export_model(source: Path | str | None, options: ExportOptions, *, teacher: bool = False) -> ExportResult:
    """Export a student (or its teacher) to ONNX, a TensorRT engine or a `.pt2` package, with a JSON sidecar.

    Args:
        source: a `.safetensors` model, a run folder, or None for `runs/latest`.
        options: what to make and how (`ExportOptions` and its groups).
        teacher: export the teacher of that run (`teacher_file` in the student's metadata).

    Raises:
        UserError: bad input (unknown format/precision, missing metadata, existing output, ...), or
            the accuracy gate refused the export.
        MissingDependency: TensorRT, a GPU, ModelOpt or onnxslim is needed and missing.
    """
    start = time.perf_counter()
    fmt, profile = _checked(options)
    path = source_file(source, teacher)
    # The source, described once by the home of PyTorch weights; what follows uses this description.
    weights = FORMATS["torch"].home
    src = weights.describe(path)
    dest = _output_path(options.out, src.path, fmt, options.precision)
    with writing(dest, "spofa export"), _warnings() as said:
        for target in (dest, aside(dest)):  # (a refused export publishes under the aside name)
            _clean_leftovers(target)
        if dest.exists() and not options.force:
            raise UserError(f"{dest} exists: pass --force to overwrite it")
        result = ExportResult(path=dest, sidecar=sidecar_path(dest), format=fmt.name, precision=options.precision,
                              size_bytes=0, opset=None if fmt.name == "pt2" else options.opset,
                              batch=profile.to_dict(), source=src.path, warnings=said)
        try:
            fmt.home.export(ExportJob(src, dest, options, profile, result))
        except OSError as e:  # a full disk, a folder that became read-only: the output's problem, named so
            raise (os_error(e, dest) or e) from e
    result.size_bytes, result.seconds = dest.stat().st_size, time.perf_counter() - start
    return result


def _checked(options: ExportOptions) -> tuple[Format, BatchProfile]:
    """The format and batch profile of `options`, every option checked before any work."""
    fmt = get_format(options.format)
    fmt.check_precision(options.precision)
    profile = options.profile()
    options.check_gate()
    fmt.home.check_export(options)
    return fmt, profile


def source_file(source: str | Path | None, teacher: bool = False) -> Path:
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
    tpath = path.parent / (meta.get("teacher_file") or TEACHER_FILE)
    if not tpath.is_file():
        raise UserError(f"--teacher: {tpath} not found beside {path.name} (name the teacher .safetensors instead)")
    return tpath


def _output_path(out: str | Path | None, src: Path, fmt: Format, precision: str) -> Path:
    default = artifact_name(src.stem, fmt, precision)
    path = src.parent / default if out is None else Path(out)
    if path.is_dir():
        path = path / default
    if path.suffix != fmt.suffix:
        raise UserError(f"--out {path} does not end in {fmt.suffix} (the {fmt.name} suffix)")
    return check_output_file(path, "--out")


class _Said(logging.Handler):
    """Keeps the message of every warning logged by the library while an export runs."""

    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The warnings the export, the calibration and the training library log inside the block."""
    said: list[str] = []
    handler = _Said(said)
    loggers = [logging.getLogger(name) for name in ("export", "calibration", "spofa_deploy")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield said
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


# ------------------------------------------------------------------------------ one export under way

class ExportJob:
    """One export under way, handed to the format's home: the model and its metadata, where it goes, the
    options, and what every format shares (a work folder, the parity reference, the gate, publishing).

    Attributes:
        model: the PyTorch model (fp32, CPU, eval; a QAT student with its fake quantizers).
        meta: its sidecar.
        source: its `Artifact`.
        dest: the artifact's final path.
        options: the `ExportOptions`.
        profile: the batch profile.
        result: the `ExportResult` the home fills in.
        images, kind: the parity images and "val" or "random".
        reference: PyTorch's fp32 logits of `images`.
    """

    def __init__(self, source: Artifact, dest: Path, options: ExportOptions, profile: BatchProfile,
                 result: ExportResult):
        self.model, self.meta = _load_source(source, options.precision)
        self.source, self.dest, self.options, self.profile, self.result = source, dest, options, profile, result
        self.images, self.kind = _parity_images(self.meta, options.parity.samples, options.seed)
        self.reference = torch_logits(self.model, self.images)

    @property
    def precision(self) -> str:
        """The artifact's precision (fp32 | fp16 | bf16 | int8)."""
        return self.result.precision

    @property
    def fixed_batch(self) -> int | None:
        """The batch of a fixed-batch profile (None for a dynamic one)."""
        return None if self.profile.dynamic else self.profile.opt

    @contextlib.contextmanager
    def work(self) -> Iterator[Path]:
        """A hidden temp folder beside the output for the intermediates (removed afterwards)."""
        with tempfile.TemporaryDirectory(prefix=_work_prefix(self.dest), dir=self.dest.parent) as work:
            yield Path(work)

    def built(self, path: Path, fmt: str, precision: str, batch_range: tuple[int, int] | None, **meta) -> Artifact:
        """The `Artifact` of a file this export has just built (trusted: it has no sidecar yet)."""
        return Artifact(path=path, format=fmt, meta={**self.meta, "format": fmt, "precision": precision,
                                                     "batch": self.profile.to_dict(), **meta},
                        precision=precision, size_bytes=path.stat().st_size, batch_range=batch_range,
                        source=self.source.path)

    def parity(self, runner: Runner, checked_on: str, tolerance: dict | None = None) -> Parity:
        """The runner's logits of the parity images against PyTorch's (`compare_logits`)."""
        tol = tolerance or {"atol": self.options.parity.atol, "rtol": self.options.parity.rtol}
        return compare_logits(self.reference, runner.logits(self.images), self.kind, checked_on=checked_on, **tol)

    def scores(self, runners: dict[str, Runner]) -> gates.Scores | None:
        """Val top-1 of PyTorch and of each runner, or None (with a warning) without validation images; a runner that
        fails on them fails the export (a gate that could not judge is not passed)."""
        try:
            ds = gates.validation_split(self.meta)
        except UserError as e:
            _log.warning(f"accuracy not measured: validation images unavailable ({e})")
            return None
        return gates.score(self.model, ds, {k: r.logits for k, r in runners.items()}, self.options.gate.samples,
                           self.options.seed)

    def judge(self, runner: Runner, checked_on: str, name: str = "artifact") -> GateResult | None:
        """The gate's result for one runner; None where it is disabled (--max-drop 0) or cannot run."""
        if self.options.gate.max_drop <= 0:
            return None
        scores = self.scores({name: runner})
        return self.verdict(scores, name, checked_on) if scores else None

    def verdict(self, scores: gates.Scores, name: str, checked_on: str) -> GateResult:
        """The gate's result for runner `name` of `scores`."""
        return gates.verdict(scores, name, self.options.gate.max_drop, checked_on)

    def sidecar(self, fmt: str, precision: str, artifact: Path, **extra) -> dict:
        """The sidecar of an artifact of this export: the source's metadata, what was made, and `extra`."""
        # The source's own digest describes the source: it is kept as source_sha256; `_publish` adds the artifact's.
        base = {k: v for k, v in self.meta.items() if k not in ("versions", "saved_at", *DIGEST_KEYS)}
        src = self.source.path
        source = src.name if src.resolve().parent == artifact.resolve().parent else str(src.resolve())
        opset = {"opset": self.result.opset} if self.result.opset is not None else {}
        return {**base, "format": fmt, "precision": precision, **opset, "batch": self.profile.to_dict(),
                "input": INPUT_NAME, "output": OUTPUT_NAME, "source": source, "source_sha256": self.meta.get("sha256"),
                "exported": datetime.now().isoformat(timespec="seconds"),
                "versions": _tool_versions("onnxslim", "nvidia-modelopt"), "source_versions": self.meta.get("versions"),
                **{k: v for k, v in extra.items() if v is not None}}

    def install(self, files: list[tuple[Path, Path, dict]]) -> None:
        """Publish each (file, dest, sidecar) with the gate's result; set aside and refuse when the gate fails.

        Raises:
            UserError: the gate failed: the files are published under `aside` names, never at `dest`.
        """
        gate = self.result.gate
        entry = {"gate": gate.to_dict()} if gate is not None else {}
        if gate is None or gate.passed:
            for file, dest, side in files:
                _publish(file, dest, {**side, **entry})
            return
        for file, dest, side in files:  # overwrites what an earlier refusal set aside
            _publish(file, aside(dest), {**side, **entry, "refused": True})
        raise UserError(gates.refusal(gate, self.precision, aside(files[-1][1]).name))


def _load_source(source: Artifact, precision: str):
    """The model to export: a QAT student (`spofa qat`, fake quantizers inside: int8 only) or a plain timm model."""
    from spofa_deploy.artifacts import load_model

    if not source.meta.get("qat"):
        return load_model(source.path, exportable=True)
    if precision != "int8":
        raise UserError(f"{source.path.name} is a QAT student: it exports at --precision int8 only")
    from calibration.qat import load_qat_model

    return load_qat_model(source.path)


def _parity_images(meta: dict, n: int, seed: int) -> tuple[np.ndarray, str]:
    try:
        return load_images(meta, "val", n, seed=seed).images, "val"
    except UserError as e:
        _log.warning(f"validation images unavailable ({e}): parity checked on random inputs")
        size, chans = int(meta["img_size"]), int(meta.get("in_chans", 3))
        return np.random.default_rng(seed).standard_normal((n, chans, size, size), dtype=np.float32), "random"


def _tool_versions(*extra: str) -> dict:
    out = versions()
    for dist in extra:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------ publishing

def aside(dest: Path) -> Path:
    """Where a refused artifact is kept: `student.int8.onnx` -> `student.int8.refused.onnx`."""
    return dest.with_name(f"{dest.stem}.refused{dest.suffix}")


def _pending(dest: Path) -> Path:
    """The marker that stands beside `dest` while its artifact and sidecar are being published."""
    return dest.with_name(f".{dest.name}.publishing")


def _work_prefix(dest: Path) -> str:
    return f".spofa-export-{dest.name}-"


def _clean_leftovers(dest: Path) -> None:
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
    _log.warning(f"removed {dest.name} and its sidecar, left half written by an interrupted export")


def _pair_complete(dest: Path, side: Path) -> bool:
    try:
        want = read_json(side).get("sha256")
    except UserError:
        return False
    return want is not None and want == file_digest(dest)["sha256"]


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
