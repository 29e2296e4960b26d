"""The teacher `spofa bench` compares a student with, and how it is obtained (`TeacherStep`).

`plan_teacher` finds it (`--teacher`, or the `teacher_file` of the student's run). For an exported
student the teacher is exported the same way (format, precision, batch profile, build settings:
`options_like`) and cached beside it, so both run on one backend: an export made earlier in that
way is reused, otherwise the plan holds the export as a step of its own, which `export_teacher`
carries out before anything is timed. Where that export fails, the teacher runs from its weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from export.artifact import Artifact, BatchProfile, describe
from export.formats import FORMATS, artifact_name
from export.options import ExportOptions, GateOptions, Int8Options, TrtOptions
from spofa_deploy.artifacts import read_model_meta
from spofa_deploy.errors import UserError

_log = logging.getLogger(__name__)


@dataclass
class TeacherStep:
    """The teacher of a bench and how it is obtained.

    Attributes:
        how: "given" (--teacher), "run" (the run's teacher file), "reused" (exported earlier like the
            student), "export" (to be exported like the student: `options`), "exported", "eager" (its
            export failed: it runs from its weights) or "none".
        artifact: the teacher that runs (for "export": as it will be once exported); None for "none".
        source: its `.safetensors` (what is exported; what runs where the export fails).
        like: the student file it is exported like.
        options: how it is exported ("export").
        notes: what the step found, for the report.
    """

    how: str
    artifact: Artifact | None = None
    source: Path | None = None
    like: Path | None = None
    options: ExportOptions | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the plan."""
        if self.artifact is None:
            return "none"
        name = self.artifact.path.name
        if self.how == "export":
            return (f"{self.source.name}, to be exported to {self.options.format} {self.options.precision} like "
                    f"{self.like.name} (as {name})")
        return {"given": f"{name} (--teacher)", "run": f"{name} (the run's teacher)",
                "reused": f"{name} (exported earlier like {self.like.name if self.like else 'the student'})",
                "exported": f"{name} (exported like the student)", "eager": f"{name} (its export failed)"}[self.how]


def plan_teacher(student: Artifact, teacher: str | Path | None, *, like_student: bool = True) -> TeacherStep:
    """The teacher to compare with: `teacher` if given, else the `teacher_file` of the student's run.

    With `like_student`, an exported student gets its teacher exported the same way (`plan_like`).
    """
    if teacher is not None:
        return TeacherStep("given", describe(teacher, role="teacher"))
    if student.meta.get("role") == "teacher":
        return TeacherStep("none")
    tfile = student.meta.get("teacher_file")
    if not tfile:
        return TeacherStep("none", notes=["no teacher_file in the student's metadata: no teacher comparison "
                                          "(pass --teacher)"])
    base = student.source.parent if student.source is not None else student.path.parent
    path = base / tfile
    if not path.is_file():
        return TeacherStep("none", notes=[f"teacher {path} not found: no teacher comparison (pass --teacher)"])
    if like_student and student.format != "torch":
        return plan_like(student, path)
    return TeacherStep("run", describe(path, role="teacher"), source=path)


def options_like(student: Artifact, dest: Path) -> ExportOptions:
    """The `ExportOptions` that reproduce how the student artifact was exported, written to `dest`."""
    m = student.meta
    p = BatchProfile.of_meta(m) or BatchProfile(1, 1, 1, False)
    batch = dict(dynamic_batch=(p.min, p.opt, p.max)) if p.dynamic else dict(batch=p.opt)
    int8, gate = Int8Options(), GateOptions()
    if "int8" in m:
        q = m["int8"]
        quantizer = q.get("quantizer", "auto")
        int8 = Int8Options(quantizer="auto" if quantizer == QAT else quantizer,  # (a teacher is not fine-tuned)
                           calib_samples=int(q.get("calib_samples") or 512),
                           calib_data=q.get("calib_data") or None, keep_ends=bool(q.get("excluded_nodes", True)))
    trt = TrtOptions(tf32=bool(m.get("tf32", True)), workspace_gib=float(m.get("workspace_gib") or 4.0))
    if m.get("gate"):  # the student's accuracy gate, so a refused teacher is refused by the same rule
        gate = GateOptions(max_drop=float(m["gate"]["max_drop"]), samples=int(m["gate"]["n"]))
    return ExportOptions(student.format, student.precision or "fp32", **batch, opset=int(m.get("opset") or 17),
                         slim=m.get("slim"), exporter=m.get("exporter", "torchscript"),
                         device=m.get("device", "cpu") if student.format == "pt2" else "cpu",
                         out=dest, force=True, int8=int8, gate=gate, trt=trt)


# What a build must share for two artifacts to be alike: the INT8 recipe, the opset, the typing, the tools.
_INT8_SETTINGS = ("quantizer", "calib_data", "calib_samples", "method", "high_precision", "target")
_BUILD_SETTINGS = ("opset", "exporter", "slim", "strongly_typed", "tf32", "device", "torch", "tensorrt", "gpu",
                   "compute_capability")
QAT = "qat"  # the int8 quantizer a QAT student records: its teacher gets post-training INT8 instead


def build_settings(meta: dict) -> dict:
    """The settings of an export's sidecar that change the artifact's speed or accuracy beyond the model itself
    (a QAT student's INT8 recipe cannot be a teacher's: not compared)."""
    q = meta.get("int8") or {}
    if q.get("quantizer") == QAT:
        q = {}
    return {**{k: meta.get(k) for k in _BUILD_SETTINGS}, **{f"int8.{k}": q.get(k) for k in _INT8_SETTINGS},
            "int8.keep_ends": bool(q.get("excluded_nodes")) if q else None}


def settings_differ(cached: dict, wanted: dict) -> list[str]:
    """The build settings (`build_settings`) that `wanted` records and `cached` does not share, as `name a != b`.

    A setting `wanted` does not record (a sidecar of an older export) cannot be compared: it is left out.
    """
    got, want = build_settings(cached), build_settings(wanted)
    return [f"{k} {got[k]} != {want[k]}" for k in want if want[k] is not None and got[k] != want[k]]


def _differs(cached: Artifact, source: Path, student: Artifact) -> list[str] | None:
    """Why a teacher exported earlier is not like this student (empty: it is); None where it is another
    teacher's, or older than its source.

    "Like" is every build setting: precision, batch profile and `build_settings` (an INT8 teacher of
    another quantizer or calibration set is another model to compare with).
    """
    if cached.source is None or cached.source.resolve() != source.resolve():
        return None
    if cached.path.stat().st_mtime < source.stat().st_mtime:
        return None
    differ = settings_differ(cached.meta, student.meta)
    if cached.precision != student.precision or BatchProfile.of_meta(cached.meta) != BatchProfile.of_meta(student.meta):
        differ.insert(0, "precision or batch profile")
    return differ


def plan_like(student: Artifact, source: Path) -> TeacherStep:
    """The teacher exported like the student, cached beside it (`teacher.onnx`, `teacher.fp16.engine`, ...).

    Reused while it was exported from the same teacher file with the same precision, batch
    profile and build settings (`build_settings`: quantizer, calibration, opset, typing, tools);
    otherwise an export to carry out (as `spofa export --role teacher` would).
    """
    fmt = FORMATS[student.format]
    dest = student.path.parent / artifact_name(source.stem, fmt, student.precision or "fp32")
    notes = []
    cached = _cached(dest)
    differ = _differs(cached, source, student) if cached is not None else None
    if differ == []:
        return TeacherStep("reused", cached, source, student.path,
                           notes=[f"teacher: {dest.name}, exported earlier like {student.path.name} (reused)"])
    if differ:
        notes.append(f"teacher: {dest.name} was exported with other settings than {student.path.name} "
                     f"({'; '.join(differ[:3])}): exported again")
    options = options_like(student, dest)
    meta = {**read_model_meta(source), "format": fmt.name, "precision": options.precision,
            "batch": student.meta.get("batch"), "device": options.device}
    planned = Artifact(path=dest, format=fmt.name, meta=meta, precision=options.precision, size_bytes=0,
                       batch_range=student.batch_range, source=source)
    return TeacherStep("export", planned, source, student.path, options, notes)


def _cached(dest: Path) -> Artifact | None:
    if not dest.is_file():
        return None
    try:
        return describe(dest, role="teacher")
    except UserError:
        return None


def export_teacher(step: TeacherStep) -> TeacherStep:
    """Carry out an "export" step: the teacher exported like the student, or (where that fails, said plainly,
    never a crash of the bench) the teacher's weights, so its speed-ups compare different backends."""
    from export import exporter

    o, dest = step.options, step.artifact.path
    what = f"{o.format} {o.precision}"
    _log.info(f"exporting the teacher {step.source.name} to {what} like {step.like.name}, for a like-for-like "
              f"comparison (kept as {dest.name}) ...")
    try:
        exporter.export_model(step.source, o)
        art = describe(dest, role="teacher")
    except Exception as e:  # noqa: BLE001 - any failure leaves the eager teacher
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        note = (f"the teacher could not be exported to {what} ({reason}): it runs from {step.source.name}, "
                "so its speed-ups compare different backends")
        return replace(step, how="eager", artifact=describe(step.source, role="teacher"), notes=[note])
    return replace(step, how="exported", artifact=art,
                   notes=[f"teacher: exported to {dest.name} like {step.like.name}"])
