"""Which variants `spofa bench` runs: backend, device and precision per model, and the teacher beside each.

A variant is one model on one backend at one precision; it becomes a `Candidate` holding its
runner, or no runner and a "skipped" result with the reason when the backend cannot run here
(it is never replaced by another backend). An explicit choice that cannot work (a backend
that cannot run the file, a precision the export does not have) is a `UserError`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from export.bench.report import VariantResult
from export.bench.runners import (
    TORCH_BACKENDS,
    TORCH_PRECISIONS,
    BackendUnavailable,
    OrtRunner,
    Pt2Runner,
    Runner,
    TorchRunner,
    TrtRunner,
    ort_cuda_reason,
    state_dict_bytes,
)
from export.bench.target import Artifact
from export import formats
from export.formats import FORMATS
from spofa_deploy.errors import UserError, check_choice
from spofa_deploy.machine import cuda_skip_reason, resolve_device

BACKENDS = ("auto", *formats.BACKENDS)  # the values of `spofa bench --backend`


@dataclass
class Candidate:
    """A variant to run: its runner (None when skipped) and its validation data."""

    result: VariantResult
    runner: Runner | None = None
    val: object | None = None  # a Dataset with this model's eval transform


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


def torch_candidate(model: nn.Module, *, role: str, name: str, backend: str, requested: str, precision: str,
                    device: str, img_size: int, artifact: str | None, size_bytes: int | None,
                    compile_mode: str | None, in_chans: int = 3) -> Candidate:
    """A PyTorch model on a torch backend; skipped (not run on the CPU) where it needs a missing GPU."""
    dev = "cuda" if backend == "torch-cudagraph" else device
    res = VariantResult(key=variant_key(role, backend, precision, dev), role=role, model=name, backend=backend,
                        backend_requested=requested, precision=precision, device=dev, artifact=artifact,
                        size_bytes=size_bytes)
    reason = cuda_skip_reason() if dev == "cuda" else None
    if reason:
        res.status, res.reason = "skipped", f"{backend} needs a CUDA GPU: {reason}"
        res.size_bytes = state_dict_bytes(model) if size_bytes is None else size_bytes
        return Candidate(res)
    runner = TorchRunner(model, backend=backend, device=dev, precision=precision, img_size=img_size,
                         in_chans=in_chans, name=name, size_bytes=size_bytes, compile_mode=compile_mode)
    res.size_bytes = runner.size_bytes
    return Candidate(res, runner)


def artifact_candidate(art: Artifact, *, role: str, backend: str, requested: str, precision: str | None,
                       device: str, trust_engine: bool, model_cache: dict, compile_mode: str | None,
                       threads: int | None = None) -> Candidate:
    """A model file on `backend`; safetensors loaded once (`model_cache`) and deep-copied for later backends."""
    if backend not in FORMATS[art.format].backends:
        raise UserError(f"backend {backend} cannot run {art.path.name} ({FORMATS[art.format].title}); "
                        f"use {' or '.join(FORMATS[art.format].backends)}"
                        + (" or export it with `spofa export`" if art.format == "torch" else ""))
    if art.format == "torch":
        prec = precision or default_precision(device)
        if prec not in TORCH_PRECISIONS:
            raise UserError(f"PyTorch backends run {', '.join(TORCH_PRECISIONS)}, not '{prec}' "
                            "(int8 comes from an INT8 ONNX/engine: `spofa export --precision int8`)")
        if art.path not in model_cache:
            from spofa_deploy.artifacts import load_model

            model_cache[art.path] = load_model(art.path, trust=trust_engine)[0]
            fresh = model_cache[art.path]
        else:
            fresh = copy.deepcopy(model_cache[art.path])
        return torch_candidate(fresh, role=role, name=art.model, backend=backend, requested=requested, precision=prec,
                               device=device, img_size=art.img_size, artifact=str(art.path),
                               size_bytes=art.size_bytes, compile_mode=compile_mode, in_chans=art.in_chans)
    prec = art.precision or "fp32"
    if precision is not None and precision != prec:
        raise UserError(f"{art.path.name} was exported at {prec}; --precision {precision} needs its own export "
                        f"(`spofa export --precision {precision}`)")
    # `device` is the backend's own (the caller resolved it with `_backend_device`).
    res = VariantResult(key=variant_key(role, backend, prec, device), role=role, model=art.model, backend=backend,
                        backend_requested=requested, precision=prec, device=device, artifact=str(art.path),
                        size_bytes=art.size_bytes)
    try:
        if backend.startswith("ort-"):
            runner = OrtRunner(art, device, threads)
        elif backend == "aoti":  # (a package for another torch, device or CPU is refused: UserError, exit 2)
            runner = Pt2Runner(art, device=device)
        else:
            runner = TrtRunner(art, trust=trust_engine)
    except BackendUnavailable as e:
        res.status, res.reason = "skipped", str(e)
        return Candidate(res)
    return Candidate(res, runner)


def _auto_backend(art: Artifact, device_opt: str, device: str, notes: list[str], role: str) -> str:
    if art.format == "torch":
        choice, why = "torch-eager", "PyTorch weights"
    elif art.format == "trt":
        choice, why = "trt", "TensorRT engine"
    elif art.format == "pt2":
        choice, why = "aoti", f"PyTorch AOTInductor package ({art.meta.get('device', 'cpu')})"
    else:
        if device == "cuda":
            reason = ort_cuda_reason()
        else:
            reason = f"--device {device_opt}" if device_opt.strip().lower() != "auto" else cuda_skip_reason()
        choice, why = ("ort-cuda", "ONNX with a usable CUDA provider") if reason is None else ("ort-cpu", f"ONNX; no ort-cuda: {reason}")
    notes.append(f"auto: {role} {art.path.name} -> {choice} ({why})")
    return choice


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


def artifact_candidates(art: Artifact, tart: Artifact | None, *, backends: Sequence[str],
                        precisions: Sequence[str | None], device_opt: str, device: str, teacher_backend: str | None,
                        notes: list[str], trust_engine: bool, compile_mode: str | None,
                        threads: int | None) -> list[Candidate]:
    """The student on each backend x precision, each paired with a teacher variant (shared, listed last).

    `device_opt` is the --device as given, `device` what it resolved to; "auto" backends are
    chosen (and the choice noted in `notes`) per artifact.
    """
    model_cache: dict = {}
    cands: list[Candidate] = []
    teachers: dict[str, Candidate] = {}
    for requested in backends:
        backend = _auto_backend(art, device_opt, device, notes, "student") if requested == "auto" else requested
        bdev = _backend_device(backend, device_opt, device, art)
        for prec in precisions:
            c = artifact_candidate(art, role="student", backend=backend, requested=requested, precision=prec,
                                   device=bdev, trust_engine=trust_engine, model_cache=model_cache,
                                   compile_mode=compile_mode, threads=threads)
            if any(x.result.key == c.result.key for x in cands):
                continue
            cands.append(c)
            if tart is None:
                continue
            tb = _teacher_backend(tart, backend, bdev, teacher_backend)
            if tb not in FORMATS[tart.format].backends:
                raise UserError(f"teacher backend {tb} cannot run {tart.path.name} ({FORMATS[tart.format].title})")
            tdev = _backend_device(tb, "auto", bdev, tart)
            tprec = c.result.precision if (tart.format == "torch" and c.result.precision in TORCH_PRECISIONS) else None
            if tart.format == "torch" and tprec is None:
                tprec = default_precision(tdev)
            probe_key = variant_key("teacher", tb, tprec or tart.precision, tdev)
            if probe_key not in teachers:
                teachers[probe_key] = artifact_candidate(
                    tart, role="teacher", backend=tb, requested=tb, precision=tprec, device=tdev,
                    trust_engine=trust_engine, model_cache=model_cache, compile_mode=compile_mode, threads=threads)
            c.result.teacher = teachers[probe_key].result.key
    return cands + list(teachers.values())
