"""The teacher `spofa bench` compares a student with: the run's own, exported like the student.

`teacher_artifact` finds it (`--teacher`, or the `teacher_file` of the student's run); for an
exported student, `teacher_like` exports the teacher the same way (format, precision, batch
profile) and caches it beside the student, so both run on one backend.
"""
from __future__ import annotations

from pathlib import Path

from export.bench.target import Artifact, resolve_artifact
from export.formats import FORMATS, artifact_name
from spofa_deploy.errors import UserError


def teacher_artifact(student: Artifact, teacher: str | Path | None, notes: list[str], *,
                     like_student: bool = True) -> Artifact | None:
    """The teacher to compare with: `teacher` if given, else the `teacher_file` of the student's run.

    With `like_student`, an exported student gets its teacher exported the same way (format,
    precision, batch profile), so both run on one backend: see `teacher_like`.
    """
    if teacher is not None:
        return resolve_artifact(teacher, role="teacher")
    if student.meta.get("role") == "teacher":
        return None
    tfile = student.meta.get("teacher_file")
    if not tfile:
        notes.append("no teacher_file in the student's metadata: no teacher comparison (pass --teacher)")
        return None
    base = student.source.parent if student.source is not None else student.path.parent
    path = base / tfile
    if not path.is_file():
        notes.append(f"teacher {path} not found: no teacher comparison (pass --teacher)")
        return None
    if like_student and student.format != "torch":
        like = teacher_like(student, path, notes)
        if like is not None:
            return like
    return resolve_artifact(path, role="teacher")


def _profile(meta: dict) -> tuple | None:
    """(min, opt, max, dynamic) of an export's sidecar batch entry."""
    b = meta.get("batch")
    if not b:
        return None
    return int(b["min"]), int(b["opt"]), int(b["max"]), bool(b.get("dynamic", b["min"] != b["max"]))


def _export_options(student: Artifact) -> dict:
    """`export_model` keywords that reproduce how the student artifact was exported."""
    m = student.meta
    lo, opt, hi, dynamic = _profile(m) or (1, 1, 1, False)
    batch = dict(dynamic_batch=(lo, opt, hi)) if dynamic else dict(batch=opt)
    opts = dict(precision=student.precision or "fp32", opset=int(m.get("opset") or 17), slim=m.get("slim"),
                exporter=m.get("exporter", "torchscript"), **batch)
    if student.format == "pt2":
        opts["device"] = m.get("device", "cpu")
    if "int8" in m:
        q = m["int8"]
        opts.update(quantizer=q.get("quantizer", "auto"), calib_samples=int(q.get("calib_samples") or 512),
                    calib_data=q.get("calib_data") or None, keep_ends=bool(q.get("excluded_nodes", True)))
    if m.get("gate"):  # the student's accuracy gate, so a refused teacher is refused by the same rule
        opts.update(max_drop=float(m["gate"]["max_drop"]), eval_samples=int(m["gate"]["n"]))
    return opts


# What a build must share for two artifacts to be alike: the INT8 recipe, the opset, the typing, the tools.
_INT8_SETTINGS = ("quantizer", "calib_data", "calib_samples", "method", "high_precision", "target")
_BUILD_SETTINGS = ("opset", "exporter", "slim", "strongly_typed", "device", "torch", "tensorrt", "gpu",
                   "compute_capability")


def build_settings(meta: dict) -> dict:
    """The settings of an export's sidecar that change the artifact's speed or accuracy beyond the model itself."""
    q = meta.get("int8") or {}
    return {**{k: meta.get(k) for k in _BUILD_SETTINGS}, **{f"int8.{k}": q.get(k) for k in _INT8_SETTINGS},
            "int8.keep_ends": bool(q.get("excluded_nodes")) if q else None}


def settings_differ(cached: dict, wanted: dict) -> list[str]:
    """The build settings (`build_settings`) that `wanted` records and `cached` does not share, as `name a != b`.

    A setting `wanted` does not record (a sidecar of an older export) cannot be compared: it is left out.
    """
    got, want = build_settings(cached), build_settings(wanted)
    return [f"{k} {got[k]} != {want[k]}" for k in want if want[k] is not None and got[k] != want[k]]


def _reusable(cached: Artifact, source: Path, student: Artifact, notes: list[str]) -> bool:
    """A teacher exported earlier from this very teacher file, like this student, and not older than it.

    "Like" is every build setting: precision, batch profile and `build_settings` (an INT8 teacher of
    another quantizer or calibration set is another model to compare with). Says why one is not reused.
    """
    if cached.source is None or cached.source.resolve() != source.resolve():
        return False
    if cached.path.stat().st_mtime < source.stat().st_mtime:
        return False
    differ = settings_differ(cached.meta, student.meta)
    if cached.precision != student.precision or _profile(cached.meta) != _profile(student.meta):
        differ.insert(0, "precision or batch profile")
    if differ:
        notes.append(f"teacher: {cached.path.name} was exported with other settings than {student.path.name} "
                     f"({'; '.join(differ[:3])}): exported again")
    return not differ


def teacher_like(student: Artifact, source: Path, notes: list[str]) -> Artifact | None:
    """The teacher exported like the student, cached beside it (`teacher.onnx`, `teacher.fp16.engine`, ...).

    Reused while it was exported from the same teacher file with the same precision, batch
    profile and build settings (`build_settings`: quantizer, calibration, opset, typing, tools);
    otherwise exported now (as `spofa export --role teacher` would). Where the
    export fails, None with a note: the teacher then runs from its weights and the report
    marks the speed-ups as comparing different backends.
    """
    from spofa_deploy.console import console

    fmt = FORMATS[student.format]
    opts = _export_options(student)
    dest = student.path.parent / artifact_name(source.stem, fmt, opts["precision"])
    if dest.is_file():
        try:
            cached = resolve_artifact(dest, role="teacher")
        except UserError:
            cached = None
        if cached is not None and _reusable(cached, source, student, notes):
            notes.append(f"teacher: {dest.name}, exported earlier like {student.path.name} (reused)")
            return cached
    what = f"{fmt.name} {opts['precision']}"
    console.print(f"exporting the teacher {source.name} to {what} like {student.path.name}, for a like-for-like "
                  f"comparison (kept as {dest.name}) ...")
    try:
        from export.exporter import export_model

        export_model(source, fmt.name, out=dest, force=True, **opts)
        art = resolve_artifact(dest, role="teacher")
    except Exception as e:  # any failure leaves the eager teacher, said plainly, never a crash of the bench
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        notes.append(f"the teacher could not be exported to {what} ({reason}): it runs from {source.name}, "
                     "so its speed-ups compare different backends")
        return None
    notes.append(f"teacher: exported to {dest.name} like {student.path.name}")
    return art
