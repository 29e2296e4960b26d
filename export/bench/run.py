"""`spofa bench`'s entry points: `run_bench` (a model file), `measure` (a `BenchPlan`), `bench_models`
(in-memory PyTorch models).

Pipeline: the model file, described by its format's home (`export.artifact`) -> the plan
(`plan.plan_bench`: the teacher and how it is obtained, the variants and their runners, batch
sizes, data), shown as log records -> `measure`: the teacher's export where the plan has one,
the runners loaded, per batch size student and teacher timings interleaved over a few rounds and
pooled, then accuracy on the validation split through the same runners (`loop`) -> `BenchReport`
-> JSON / PNG (`report`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from export.artifact import model_file
from export.bench.loop import activate, agree_with_reference, bench_runners
from export.bench.plan import BenchOptions, BenchPlan, check_batches, plan_bench
from export.bench.report import TIMING_NOTE, BenchReport, write_plot, write_report_json
from export.bench.teacher import export_teacher
from export.bench.timing import TimingOptions, cpu_threads, torch_settings
from export.bench.variants import Candidate, bench_device, check_backends, default_precision, torch_candidate
from export.formats import format_for_path
from export.pytorch import TORCH_BACKENDS, TORCH_PRECISIONS
from spofa_deploy.errors import UserError
from spofa_deploy.machine import machine_info
from spofa_deploy.models import Preprocessing

__all__ = ["BenchOptions", "BenchPlan", "bench_models", "measure", "plan_bench", "run_bench"]
_log = logging.getLogger(__name__)


def run_bench(artifact: str | Path, *, teacher: str | Path | None = None,
              options: BenchOptions = BenchOptions()) -> BenchReport:
    """Bench a student artifact (and its run's teacher) for latency and accuracy: plan, show the plan, measure.

    Args:
        artifact: `.engine`, `.onnx`, `.pt2`, `.safetensors`, or a run folder (its student.safetensors).
        teacher: the teacher to compare with (default: `teacher_file` of the student's run).
        options: everything else (`BenchOptions`; `options.others`: more files of the same student, benched
            beside it).

    Raises:
        UserError: bad artifact, sidecar mismatch, engine refused, unsupported batch size, unknown backend,
            a `--with` file of another model.
    """
    opts = options.checked()
    with cpu_threads(opts.threads):
        bench_device(opts.device)  # (`cuda:N`: GPU N is current before an engine is held against this machine)
        path = model_file(artifact, "student")
        fmt = format_for_path(path)
        student = fmt.home.describe(path, trust=opts.trust_engine)
        plan = plan_bench(student, teacher=teacher, options=opts)
        for line in plan.lines():
            _log.info(line)
        return measure(plan)


def measure(plan: BenchPlan) -> BenchReport:
    """Carry out a plan: the teacher's export where it has one, then timing and accuracy; the report.

    The JSON and PNG are written where the plan's options ask for them.
    """
    opts = plan.options
    with cpu_threads(opts.threads):
        plan = _obtain_teacher(plan)
        activate(plan.candidates)
        data = _attach_val(plan) if plan.val else None
        results = bench_runners(plan.candidates, batch_sizes=plan.batches, timing=opts.timing,
                                eval_batch=opts.eval_batch, progress=opts.progress)
        if plan.reference is not None:
            agree_with_reference(results, str(plan.reference.path))
        report = BenchReport(results=results, settings=_settings(plan), machine=machine_info(), data=data,
                             notes=list(plan.notes))
    if opts.plot_path is not None:  # (first: a plot that cannot be drawn leaves a note the JSON keeps)
        write_plot(report, opts.plot_path)
    if opts.json_path is not None:
        write_report_json(report, opts.json_path)
    return report


def _obtain_teacher(plan: BenchPlan) -> BenchPlan:
    """The plan with its teacher export carried out and the teacher's variants made for what it produced."""
    if plan.teacher.how != "export":
        return plan
    return plan.with_teacher(export_teacher(plan.teacher))


def _attach_val(plan: BenchPlan) -> dict:
    """One validation dataset per distinct preprocessing, all on the same (sub)set of images, given to each
    runnable candidate; returns the report's `data` entry."""
    from spofa_deploy.data.datasets import stratified_subset
    from spofa_deploy.data.splits import load_splits

    arts = [a for a in (*plan.students, plan.reference, plan.teacher.artifact) if a is not None]
    spec, max_val = plan.val.spec, plan.val.max_val
    sets: dict[Preprocessing, object] = {}
    info: dict = {"spec": spec}
    idx = None
    for a in arts:
        key = Preprocessing.from_meta(a.meta, a.img_size)  # what makes two models' validation images differ
        if key in sets:
            continue
        splits = load_splits(spec, key, train_aug=False, seed=plan.val.seed)
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
    by_path = {str(a.path): sets[Preprocessing.from_meta(a.meta, a.img_size)] for a in arts}
    for c in plan.candidates:
        c.val = by_path[c.result.artifact] if c.runner is not None else None
    return info


def _settings(plan: BenchPlan) -> dict:
    o, art, tart = plan.options, plan.student, plan.teacher.artifact
    ref = plan.reference
    others = dict(others=[str(a.path) for a in plan.others], fp32_reference=str(ref.path) if ref else None)
    return dict(artifact=str(art.path), teacher=str(tart.path) if tart else None, backends=o.backends,
                batch_sizes=plan.batches, precisions=o.precisions, device=plan.device, **asdict(o.timing),
                max_val=o.max_val, eval_batch=o.eval_batch, threads=o.threads or torch.get_num_threads(),
                img_size=art.img_size, timing_note=TIMING_NOTE, **(others if plan.others else {}), **torch_settings())


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
    batch_sizes = check_batches(batch_sizes)
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
                                precision=prec, device=dev, img_size=img_size, compile_mode=compile_mode)
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
        activate(cands)
        results = bench_runners(cands, batch_sizes=batch_sizes, timing=timing, eval_batch=eval_batch,
                                progress=progress)
    return BenchReport(results=results, settings=settings, machine=machine_info(), data=None)
