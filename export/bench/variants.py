"""Which variants `spofa bench` runs: backend, device and precision per model, and the teacher beside each.

A variant is one model on one backend at one precision; it becomes a `Candidate` holding its
runner (made by the format's home, not yet activated), or no runner and a "skipped" result with
the reason when the backend cannot run here (it is never replaced by another backend). An
explicit choice that cannot work (a backend that cannot run the file, a precision the export
does not have) is a `UserError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from export import formats
from export.artifact import Artifact
from export.bench.report import VariantResult
from export.formats import FORMATS
from export.pytorch import TORCH_BACKENDS, TORCH_PRECISIONS, TorchRunner
from export.runner import Runner, RunOptions
from spofa_deploy.errors import UserError, check_choice
from spofa_deploy.machine import cuda_skip_reason, resolve_device

BACKENDS = ("auto", *formats.BACKENDS)  # the values of `spofa bench --backend`


@dataclass
class Candidate:
    """A variant to run: its runner (None when skipped), its validation data, and why "auto" chose it."""

    result: VariantResult
    runner: Runner | None = None
    val: object | None = None  # a Dataset with this model's eval transform
    note: str | None = None


def variant_key(role: str, backend: str, precision: str, device: str) -> str:
    """The key of a variant in the report (`student:ort-cpu:fp32:cpu`)."""
    return f"{role}:{backend}:{precision}:{device}"


def check_backends(backends: Iterable[str]) -> list[str]:
    """Backend names normalised and de-duplicated; an unknown one is a UserError with a suggestion."""
    out = []
    for b in backends:
        b = check_choice(b, BACKENDS, "--backend", noun="backend")
        if b not in out:
            out.append(b)
    if not out:
        raise UserError("no backend given")
    return out


def bench_device(device: str) -> str:
    """The device of the PyTorch backends as a report string ("cpu" or "cuda"); `cuda:N` makes GPU N current."""
    dev = resolve_device(device)
    if dev.index is not None:
        torch.cuda.set_device(dev)
    return dev.type


def default_precision(device: str) -> str:
    # bf16 autocast is how PyTorch inference is run on current GPUs; fp32 on CPU.
    return "bf16" if device == "cuda" else "fp32"


def _candidate(runner: Runner, role: str, requested: str, artifact: str | None) -> Candidate:
    """The candidate of a runner: skipped, with the reason, where its backend cannot run here."""
    res = VariantResult(key=variant_key(role, runner.backend, runner.precision, runner.device), role=role,
                        model=runner.name, backend=runner.backend, backend_requested=requested,
                        precision=runner.precision, device=runner.device, artifact=artifact,
                        size_bytes=runner.size_bytes)
    reason = runner.unavailable()
    if reason:
        res.status, res.reason = "skipped", reason
        return Candidate(res)
    return Candidate(res, runner)


def torch_candidate(model: nn.Module, *, role: str, name: str, backend: str, precision: str, device: str,
                    img_size: int, compile_mode: str | None) -> Candidate:
    """An in-memory PyTorch model on a torch backend; skipped (not run on the CPU) where it needs a missing GPU."""
    dev = "cuda" if backend == "torch-cudagraph" else device
    runner = TorchRunner(model, backend=backend, device=dev, precision=precision, img_size=img_size, name=name,
                         compile_mode=compile_mode)
    return _candidate(runner, role, backend, None)


def artifact_candidate(art: Artifact, *, role: str, backend: str, requested: str, precision: str | None,
                       device: str, options: RunOptions) -> Candidate:
    """A model file on `backend` and the device the caller resolved (`_backend_device`), its runner made by its
    format's home."""
    fmt = FORMATS[art.format]
    if backend not in fmt.backends:
        raise UserError(f"backend {backend} cannot run {art.path.name} ({fmt.title}); "
                        f"use {' or '.join(fmt.backends)}"
                        + (" or export it with `spofa export`" if art.format == "torch" else ""))
    if art.format == "torch":
        prec = precision or default_precision(device)
        if prec not in TORCH_PRECISIONS:
            raise UserError(f"PyTorch backends run {', '.join(TORCH_PRECISIONS)}, not '{prec}' "
                            "(int8 comes from an INT8 ONNX/engine: `spofa export --precision int8`)")
    else:
        prec = art.precision or "fp32"
        if precision is not None and precision != prec:
            raise UserError(f"{art.path.name} was exported at {prec}; --precision {precision} needs its own export "
                            f"(`spofa export --precision {precision}`)")
    runner = fmt.home.runner(art, backend, device, prec, options)
    return _candidate(runner, role, requested, str(art.path))


def _auto_backend(art: Artifact, device_opt: str, device: str, role: str) -> tuple[str, str]:
    """The backend "auto" picks for `art`, and the note that says why."""
    if art.format == "torch":
        choice, why = "torch-eager", "PyTorch weights"
    elif art.format == "trt":
        choice, why = "trt", "TensorRT engine"
    elif art.format == "pt2":
        choice, why = "aoti", f"PyTorch AOTInductor package ({art.meta.get('device', 'cpu')})"
    else:
        if device == "cuda":
            from export.onnx import ort_cuda_reason

            reason = ort_cuda_reason()
        else:
            reason = f"--device {device_opt}" if device_opt.strip().lower() != "auto" else cuda_skip_reason()
        choice, why = ("ort-cuda", "ONNX with a usable CUDA provider") if reason is None else ("ort-cpu", f"ONNX; no ort-cuda: {reason}")
    return choice, f"auto: {role} {art.path.name} -> {choice} ({why})"


def _backend_device(backend: str, device_opt: str, device: str, art: Artifact | None = None) -> str:
    """The device a backend runs on; a contradiction with an explicit --device is the user's error."""
    fixed = {"ort-cpu": "cpu", "ort-cuda": "cuda", "trt": "cuda", "torch-cudagraph": "cuda",
             "aoti": art.meta.get("device", "cpu") if art is not None else None}.get(backend)
    if fixed is None:
        return device
    if device_opt.strip().lower() != "auto" and fixed != device:
        raise UserError(f"backend {backend} runs on {fixed}, but --device {device_opt} was given")
    return fixed


def _teacher_backend(tart: Artifact, student_backend: str, student_device: str, override: str | None) -> str:
    if override:
        return override
    if tart.format == "torch":
        # Same family where possible: a PyTorch student's teacher runs on the same torch backend.
        return student_backend if student_backend in TORCH_BACKENDS else "torch-eager"
    if tart.format == "onnx":
        return "ort-cuda" if student_device == "cuda" else "ort-cpu"
    return FORMATS[tart.format].backends[0]  # trt, aoti


def plan_candidates(art: Artifact, tart: Artifact | None, *, backends: Sequence[str],
                    precisions: Sequence[str | None], device_opt: str, device: str, teacher_backend: str | None,
                    options: RunOptions, others: Sequence[Artifact] = ()) -> list[Candidate]:
    """The student on each backend x precision, each paired with a teacher variant (shared, listed last).

    `device_opt` is the --device as given, `device` what it resolved to; "auto" backends are
    chosen per artifact, the choice noted on the candidate. `others` (more files of the same
    student, `--with`) get their variants too, after `art`'s; their keys then name each file.
    """
    cands: list[Candidate] = []
    teachers: dict[str, Candidate] = {}
    for a in (art, *others):
        for requested in backends:
            backend, note = _auto_backend(a, device_opt, device, "student") if requested == "auto" else (requested, None)
            bdev = _backend_device(backend, device_opt, device, a)
            for prec in precisions:
                c = artifact_candidate(a, role="student", backend=backend, requested=requested, precision=prec,
                                       device=bdev, options=options)
                c.note = note
                if others:  # several student files can share backend and precision (PTQ and QAT INT8)
                    c.result.key = file_key(c.result.key, a)
                if any(x.result.key == c.result.key for x in cands):
                    continue
                cands.append(c)
                if tart is not None:
                    t = _teacher_candidate(tart, c, bdev, teacher_backend, teachers, options)
                    c.result.teacher = t.result.key
    return cands + list(teachers.values())


def file_key(key: str, art: Artifact) -> str:
    """A variant key that names its file (`student[student.int8.onnx]:ort-cpu:int8:cpu`)."""
    role, rest = key.split(":", 1)
    return f"{role}[{art.path.name}]:{rest}"


def _teacher_candidate(tart: Artifact, student: Candidate, device: str, override: str | None,
                       teachers: dict[str, Candidate], options: RunOptions) -> Candidate:
    """The teacher variant beside a student variant: one per key, shared by the students it suits."""
    tb = _teacher_backend(tart, student.result.backend, device, override)
    if tb not in FORMATS[tart.format].backends:
        raise UserError(f"teacher backend {tb} cannot run {tart.path.name} ({FORMATS[tart.format].title})")
    tdev = _backend_device(tb, "auto", device, tart)
    precision = student.result.precision
    tprec = precision if (tart.format == "torch" and precision in TORCH_PRECISIONS) else None
    if tart.format == "torch" and tprec is None:
        tprec = default_precision(tdev)
    key = variant_key("teacher", tb, tprec or tart.precision, tdev)
    if key not in teachers:
        teachers[key] = artifact_candidate(tart, role="teacher", backend=tb, requested=tb, precision=tprec,
                                           device=tdev, options=options)
    return teachers[key]
