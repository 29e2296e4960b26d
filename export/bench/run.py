"""`spofa bench`'s entry points: `run_bench` (model files) and `bench_models` (in-memory PyTorch models).

Pipeline: resolve the artifact (+ sidecar checks, `target`) and its teacher (`teacher`) ->
pick backends and build runners (`variants`, `runners`) -> per batch size, interleave student
and teacher timings over a few rounds and pool them, then accuracy on the validation split
through the same runners (`loop`) -> `BenchReport` -> table / JSON / PNG (`report`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from export.bench.loop import bench_runners
from export.bench.report import TIMING_NOTE, BenchReport, write_plot, write_report_json
from export.bench.runners import TORCH_BACKENDS, TORCH_PRECISIONS
from export.bench.target import Artifact, resolve_artifact
from export.bench.teacher import teacher_artifact
from export.bench.timing import TimingOptions, cpu_threads, torch_settings
from export.bench.variants import (
    Candidate,
    artifact_candidates,
    bench_device,
    check_backends,
    default_precision,
    torch_candidate,
)
from spofa_deploy.artifacts import check_output_file
from spofa_deploy.errors import UserError
from spofa_deploy.machine import machine_info
from spofa_deploy.models import Preprocessing

# The large batch of the default (1 and this): throughput where the hardware allows it, minutes not hours on a CPU.
LARGE_BATCH = {"cuda": 256, "cpu": 64}


@dataclass(frozen=True)
class BenchOptions:
    """Everything `spofa bench` takes besides the artifact and its teacher (one field per CLI option).

    Attributes:
        data: data spec for accuracy (default: the one in the metadata).
        backends: backends for the student ("auto" = the artifact's natural runtime).
        batch_sizes: batch sizes to time (default: 1 and a large batch the artifacts accept, `default_batches`).
        precisions: PyTorch autocast precisions (fp32/bf16/fp16); for ONNX/engines, must match the export.
        timing: the timing method (`TimingOptions`: warm-up, minimum time and iterations, rounds).
        max_val: evaluate on a stratified subset of this many validation images.
        device: auto | cpu | cuda | cuda:N (PyTorch backends; others have a fixed device).
        teacher_backend: force the teacher's backend (default: the student's; an exported student's
            teacher is exported the same way and cached beside it, `teacher.teacher_like`).
        accuracy: evaluate accuracy (needs the data).
        eval_batch: batch size of the accuracy pass.
        compile_mode: `torch.compile` mode for torch-compile.
        trust_engine: run an engine or `.pt2` without its sidecar (`--trust`).
        threads: CPU threads for PyTorch and ONNX Runtime (default: their own defaults).
        json_path, plot_path: also write the JSON report / the accuracy-latency PNG.
        progress: show transient progress bars on stderr.
    """

    data: str | None = None
    backends: Sequence[str] = ("auto",)
    batch_sizes: Sequence[int] | None = None
    precisions: Sequence[str] | None = None
    timing: TimingOptions = field(default_factory=TimingOptions)
    max_val: int | None = None
    device: str = "auto"
    teacher_backend: str | None = None
    accuracy: bool = True
    eval_batch: int = 64
    compile_mode: str | None = None
    trust_engine: bool = False
    threads: int | None = None
    json_path: str | Path | None = None
    plot_path: str | Path | None = None
    progress: bool = True


def _check_batches(batch_sizes: Iterable[int]) -> list[int]:
    out = []
    for b in batch_sizes:
        if int(b) < 1:
            raise UserError(f"batch sizes must be >= 1, got {b}")
        if int(b) not in out:
            out.append(int(b))
    if not out:
        raise UserError("no batch size given")
    return out


def _model_name(model: nn.Module, name: str | None) -> str:
    return name or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__


def bench_models(teacher_model: nn.Module | None, student_model: nn.Module, *, img_size: int,
                 backends: Sequence[str] = ("torch-eager",), batch_sizes: Sequence[int] = (1, 8, 64),
                 precision: str | None = None, device: str = "auto", timing: TimingOptions = TimingOptions(),
                 student_name: str | None = None, teacher_name: str | None = None, student_val=None,
                 teacher_val=None, eval_batch: int = 64, compile_mode: str | None = None, threads: int | None = None,
                 progress: bool = True) -> BenchReport:
    """Bench in-memory PyTorch models (no artifacts): student beside teacher per torch backend.

    Each backend in `backends` (torch-eager, torch-compile, torch-cudagraph) runs both
    models, interleaved per batch size. Accuracy is measured when `student_val` (a dataset
    with the student's eval transform) is given; `teacher_val` defaults to it.

    Example (GPU):
        bench_models(timm.create_model("vit_base_patch16_224"), timm.create_model("mobilenetv3_large_100"),
                     img_size=224, backends=["torch-eager", "torch-cudagraph", "torch-compile"],
                     batch_sizes=[1, 256], device="cuda", precision="bf16")
    """
    backends = check_backends(backends)
    bad = [b for b in backends if b not in TORCH_BACKENDS]
    if bad:
        raise UserError(f"bench_models runs PyTorch backends ({', '.join(TORCH_BACKENDS)}), not {', '.join(bad)}")
    batch_sizes = _check_batches(batch_sizes)
    dev = bench_device(device)
    prec = precision or default_precision(dev)
    if prec not in TORCH_PRECISIONS:
        raise UserError(f"PyTorch backends run {', '.join(TORCH_PRECISIONS)}, not '{prec}'")
    models = [("student", student_model, _model_name(student_model, student_name), student_val)]
    if teacher_model is not None:
        models.append(("teacher", teacher_model, _model_name(teacher_model, teacher_name),
                       teacher_val if teacher_val is not None else student_val))
    cands: list[Candidate] = []
    for i, b in enumerate(backends):
        pair = []
        for role, model, name, val in models:  # the first backend runs the models given, later ones copies
            c = torch_candidate(model if i == 0 else copy.deepcopy(model), role=role, name=name, backend=b,
                                requested=b, precision=prec, device=dev, img_size=img_size, artifact=None,
                                size_bytes=None, compile_mode=compile_mode)
            c.val = val
            pair.append(c)
        if len(pair) == 2:
            pair[0].result.teacher = pair[1].result.key
        cands.extend(pair)
    settings = dict(batch_sizes=batch_sizes, backends=backends, precision=prec, device=dev, **asdict(timing),
                    img_size=img_size, eval_batch=eval_batch, threads=threads or torch.get_num_threads(),
                    timing_note=TIMING_NOTE)
    with cpu_threads(threads):
        settings.update(torch_settings())
        results = bench_runners(cands, batch_sizes=batch_sizes, timing=timing, eval_batch=eval_batch,
                                progress=progress)
    return BenchReport(results=results, settings=settings, machine=machine_info())


def _val_sets(spec: str, arts: list[Artifact], max_val: int | None) -> tuple[dict, dict]:
    """One validation dataset per distinct preprocessing, all on the same (sub)set of images."""
    from spofa_deploy.data.splits import load_splits
    from spofa_deploy.data.datasets import stratified_subset

    sets: dict[Preprocessing, object] = {}
    info: dict = {"spec": spec}
    idx = None
    for a in arts:
        key = Preprocessing.from_meta(a.meta, a.img_size)  # what makes two models' validation images differ
        if key in sets:
            continue
        splits = load_splits(spec, key, train_aug=False)
        if splits.num_classes != int(a.meta["num_classes"]):
            raise UserError(f"data {spec} has {splits.num_classes} classes but {a.path.name} has "
                            f"{a.meta['num_classes']}: pass the --data it was trained on")
        val = splits.val
        if max_val is not None:
            if idx is None:
                idx = stratified_subset(val.labels, max_val, seed=0)
            val = val.subset(idx)
        info["val_size"] = len(val)
        sets[key] = val
    return {a.path: sets[Preprocessing.from_meta(a.meta, a.img_size)] for a in arts}, info


def default_batches(cands: list[Candidate], arts: list[Artifact], notes: list[str]) -> list[int]:
    """Batch 1 and a large batch, inside what every artifact accepts (fixed ONNX batch, engine profile)."""
    on_gpu = any(c.result.device == "cuda" for c in cands if c.runner is not None)
    large = LARGE_BATCH["cuda" if on_gpu else "cpu"]
    lo, hi = 1, large
    for a in arts:
        if a.batch_range:
            lo, hi = max(lo, a.batch_range[0]), min(hi, a.batch_range[1])
    if lo > hi:
        ranges = ", ".join(f"{a.path.name} {a.batch_range[0]}..{a.batch_range[1]}" for a in arts if a.batch_range)
        raise UserError(f"no batch size suits both models ({ranges}): pass --batch, or re-export one of them")
    if hi < large:
        narrow = next(a for a in arts if a.batch_range and a.batch_range[1] == hi)
        notes.append(f"largest batch {hi}: {narrow.path.name} accepts {narrow.batch_range[0]}..{hi}, so no throughput "
                     f"at batch {large} (export with the default dynamic batch, or pass --batch)")
    return sorted({lo, hi})


def _checked(options: BenchOptions) -> BenchOptions:
    """`options` normalised (backends, batch sizes, teacher backend); bad values are UserErrors."""
    backends = check_backends(options.backends)
    batch_sizes = _check_batches(options.batch_sizes) if options.batch_sizes is not None else None
    if options.max_val is not None and options.max_val < 1:
        raise UserError("--max-val must be >= 1")
    for flag, out in (("--json", options.json_path), ("--plot", options.plot_path)):
        if out is not None:  # fail now, not after minutes of timing
            check_output_file(out, flag)
    teacher_backend = check_backends([options.teacher_backend])[0] if options.teacher_backend is not None else None
    return replace(options, backends=backends, batch_sizes=batch_sizes,
                   teacher_backend=None if teacher_backend == "auto" else teacher_backend)


def _targets(artifact: str | Path, teacher: str | Path | None, opts: BenchOptions,
             notes: list[str]) -> tuple[Artifact, Artifact | None, bool]:
    """The student and teacher artifacts, checked against the batch sizes asked; and whether to measure accuracy."""
    art = resolve_artifact(artifact, trust=opts.trust_engine)
    accuracy = opts.accuracy
    if art.meta.get("trusted_without_sidecar") and accuracy:
        notes.append(f"{art.path.name} has no sidecar (--trust): no preprocessing metadata, accuracy not measured")
        accuracy = False
    tart = teacher_artifact(art, teacher, notes, like_student=opts.teacher_backend is None)
    for a in (art, tart):
        if a is not None and a.format == "pt2" and a.meta.get("compile_seconds") is not None:
            notes.append(f"{a.path.name}: compiled once, at export, in {a.meta['compile_seconds']:.0f} s (not in the latency)")
    for a in (art, tart):
        if a is not None and a.batch_range and opts.batch_sizes:  # checked before any runtime loads
            bad = [b for b in opts.batch_sizes if not a.batch_range[0] <= b <= a.batch_range[1]]
            if bad:
                what = "fixed batch" if a.format == "onnx" else "engine profile"
                raise UserError(f"{a.path.name} accepts batch {a.batch_range[0]}..{a.batch_range[1]} ({what}); "
                                f"--batch asked for {', '.join(map(str, bad))}")
    if tart is not None and tart.img_size != art.img_size:
        notes.append(f"teacher input {tart.img_size}px, student {art.img_size}px: each timed at its own size")
    return art, tart, accuracy


def run_bench(artifact: str | Path, *, teacher: str | Path | None = None,
              options: BenchOptions = BenchOptions()) -> BenchReport:
    """Bench a student artifact (and its run's teacher) for latency and accuracy.

    Args:
        artifact: `.engine`, `.onnx`, `.pt2`, `.safetensors`, or a run folder (its student.safetensors).
        teacher: the teacher to compare with (default: `teacher_file` of the student's run).
        options: everything else (`BenchOptions`).

    Raises:
        UserError: bad artifact, sidecar mismatch, engine refused, unsupported batch size, unknown backend.
    """
    with cpu_threads(options.threads):
        return _run_bench(artifact, teacher, _checked(options))


def _run_bench(artifact: str | Path, teacher: str | Path | None, opts: BenchOptions) -> BenchReport:
    notes: list[str] = []
    dev = bench_device(opts.device)
    art, tart, accuracy = _targets(artifact, teacher, opts, notes)
    arts = [art] + ([tart] if tart else [])
    precisions = [p.strip().lower() for p in opts.precisions] if opts.precisions else [None]
    cands = artifact_candidates(art, tart, backends=opts.backends, precisions=precisions, device_opt=opts.device,
                                device=dev, teacher_backend=opts.teacher_backend, notes=notes,
                                trust_engine=opts.trust_engine, compile_mode=opts.compile_mode, threads=opts.threads)
    batch_sizes = list(opts.batch_sizes or default_batches(cands, arts, notes))
    data_info = None
    spec = opts.data or art.meta.get("data")
    if accuracy and spec:
        by_path, data_info = _val_sets(spec, arts, opts.max_val)
        for c in cands:
            c.val = by_path[Path(c.result.artifact)] if c.runner is not None else None
    elif accuracy:
        notes.append("no data spec in the metadata and no --data: accuracy not measured")
    settings = dict(artifact=str(art.path), teacher=str(tart.path) if tart else None, backends=opts.backends,
                    batch_sizes=batch_sizes, precisions=opts.precisions, device=dev, **asdict(opts.timing),
                    max_val=opts.max_val, eval_batch=opts.eval_batch, threads=opts.threads or torch.get_num_threads(),
                    img_size=art.img_size, timing_note=TIMING_NOTE, **torch_settings())
    results = bench_runners(cands, batch_sizes=batch_sizes, timing=opts.timing, eval_batch=opts.eval_batch,
                            progress=opts.progress)
    report = BenchReport(results=results, settings=settings, machine=machine_info(), data=data_info, notes=notes)
    if opts.json_path is not None:
        write_report_json(report, opts.json_path)
    if opts.plot_path is not None:
        write_plot(report, opts.plot_path)
    return report
