"""`spofa bench`: latency and accuracy of a student artifact beside its teacher.

Pipeline: resolve the artifact (+ sidecar checks, `export.artifact`) -> pick backends and
build runners (`export.variants`; PyTorch runners from `spofa_deploy.bench`, ONNX Runtime and
TensorRT from `export.runtimes`) -> per batch size, interleave student and teacher timings
over a few rounds and pool them -> accuracy on the validation split through the same
runners -> `BenchReport` -> table / JSON / PNG (`export.report`).

Entry points: `run_bench` (model files), `bench_models` (in-memory PyTorch models) and
`bench_runners` (the timing and accuracy loop both use).
"""
from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from export.artifact import Artifact, resolve_artifact
from export.report import TIMING_NOTE, Accuracy, BatchResult, BenchReport, VariantResult, write_plot, write_report_json
from export.variants import (
    Candidate,
    artifact_candidates,
    bench_device,
    check_backends,
    default_precision,
    teacher_artifact,
    torch_candidate,
)
from spofa_deploy.bench import TORCH_BACKENDS, TORCH_PRECISIONS, LatencyStats, Runner, TimedStep, measure_step
from spofa_deploy.machine import machine_info
from spofa_deploy.accuracy import topk_correct
from spofa_deploy.errors import UserError
from spofa_deploy.models import Preprocessing


# =========================================================================== timing and accuracy

@contextlib.contextmanager
def cpu_threads(n: int | None, cudnn_benchmark: bool = True):
    """Temporarily set PyTorch's CPU threads (None: leave as is) and cuDNN autotuning.

    cuDNN benchmark mode is on while benching, as in timm's benchmark script: each
    fixed input shape gets its fastest convolution algorithm, as a deployment would.
    """
    if n is not None and n < 1:
        raise UserError("--threads must be >= 1")
    old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if n is not None:
        torch.set_num_threads(n)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench


def _torch_settings() -> dict:
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def evaluate(runner: Runner, dataset, batch_size: int, progress=None, task=None) -> Accuracy:
    """Top-1 / top-5 of `runner` over `dataset` (in order); predictions kept for agreement.

    A short last batch is padded to `batch_size` (and the padding dropped) where the
    runner has fixed shapes or does not accept that size.
    """
    from spofa_deploy.data import make_loader

    loader = make_loader(dataset, batch_size, train=False, workers=0 if len(dataset) <= 4096 else None)
    correct1 = correct5 = n = 0
    preds, k5 = [], 1
    for x, y in loader:
        b = x.shape[0]
        if b != batch_size and (runner.fixed_shapes or not runner.batch_sizes_supported(b)):
            x = torch.cat([x, x[-1:].expand(batch_size - b, *x.shape[1:])])
        logits = runner(x)[:b].float()
        k5 = min(5, logits.shape[1])
        c1, c5 = topk_correct(logits, y)
        correct1, correct5 = correct1 + int(c1), correct5 + int(c5)
        preds.append(logits.topk(1, dim=1).indices[:, 0].numpy())
        n += b
        if progress is not None:
            progress.advance(task, b)
    if n == 0:
        raise UserError("the validation split is empty")
    return Accuracy(top1=100.0 * correct1 / n, top5=100.0 * correct5 / n, n=n, k5=k5, preds=np.concatenate(preds))


def _eval_batch(runner: Runner, wanted: int) -> int:
    rng = getattr(runner, "batch_range", None)
    if rng is None:
        return wanted
    return min(max(wanted, rng[0]), rng[1])


def _fail_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def bench_runners(candidates: list[Candidate], *, batch_sizes: Sequence[int], warmup_s: float = 1.0,
                  min_s: float = 3.0, min_iters: int = 50, rounds: int = 3, eval_batch: int = 64,
                  progress: bool = True) -> list[VariantResult]:
    """Time and evaluate prepared candidates; fills and returns their `VariantResult`s.

    Per batch size every runnable candidate is timed in turn, `rounds` times (A B A B ...),
    each round taking 1/rounds of `min_s` and `min_iters`; the rounds are pooled, so slow
    drift (clocks, thermals, other tenants) affects student and teacher alike.
    """
    from spofa_deploy.console import progress as make_progress

    if rounds < 1:
        raise UserError("--rounds must be >= 1")
    for c in candidates:
        if c.runner is None:
            continue
        bad = [b for b in batch_sizes if not c.runner.batch_sizes_supported(b)]
        if bad:
            rng = getattr(c.runner, "batch_range", None)
            allowed = f"{rng[0]}..{rng[1]}" if rng else "its fixed size"
            raise UserError(f"{c.result.model} ({c.result.backend}) accepts batch sizes {allowed}; "
                            f"--batch asked for {', '.join(map(str, bad))}")
    live = [c for c in candidates if c.runner is not None]
    r_min_s, r_iters = min_s / rounds, max(1, math.ceil(min_iters / rounds))
    prog = make_progress(transient=True)
    prog.disable = not progress
    with prog:
        t_time = prog.add_task("timing", total=len(live) * len(batch_sizes) * rounds, info="")
        for b in batch_sizes:
            steps: dict[int, TimedStep] = {}
            parts: dict[int, list[LatencyStats]] = {}
            for i, c in enumerate(live):
                if c.result.status != "ok":
                    continue
                prog.update(t_time, info=f"batch {b}: preparing {c.result.model} {c.result.backend}")
                try:
                    steps[i] = c.runner.prepare(b)
                except UserError:
                    raise
                except Exception as e:  # e.g. compile or capture failure: report it, keep the others
                    c.result.status, c.result.reason = "failed", f"prepare at batch {b}: {_fail_reason(e)}"
            for r in range(rounds):
                for i, step in steps.items():
                    c = live[i]
                    if c.result.status != "ok":
                        continue
                    prog.update(t_time, info=f"batch {b} round {r + 1}/{rounds}: {c.result.role} {c.result.backend}")
                    try:
                        st = measure_step(step, batch=b, warmup_s=warmup_s if r == 0 else warmup_s / rounds,
                                          min_s=r_min_s, min_iters=r_iters)
                    except Exception as e:
                        c.result.status, c.result.reason = "failed", f"timing at batch {b}: {_fail_reason(e)}"
                        continue
                    parts.setdefault(i, []).append(st)
                    prog.advance(t_time)
            for i, ps in parts.items():
                if live[i].result.status == "ok":
                    compile_s = getattr(live[i].runner, "compile_seconds", {}).get(b)  # never inside the latency
                    live[i].result.batches.append(BatchResult(batch=b, latency=LatencyStats.pool(ps), compile_s=compile_s))
            steps.clear()
            for c in live:
                c.runner.release()
        to_eval = [c for c in live if c.val is not None and c.result.status == "ok"]
        if to_eval:
            t_acc = prog.add_task("accuracy", total=sum(len(c.val) for c in to_eval), info="")
            for c in to_eval:
                prog.update(t_acc, info=f"{c.result.role} {c.result.model} {c.result.backend}")
                try:
                    c.result.accuracy = evaluate(c.runner, c.val, _eval_batch(c.runner, eval_batch), prog, t_acc)
                except UserError:
                    raise
                except Exception as e:
                    c.result.status, c.result.reason = "failed", f"accuracy: {_fail_reason(e)}"
                finally:
                    c.runner.release()
    _pair(candidates)
    return [c.result for c in candidates]


def _pair(candidates: list[Candidate]) -> None:
    """Speed-ups (teacher median / student median, same batch, same clock) and top-1 agreement."""
    by_key = {c.result.key: c.result for c in candidates}
    for c in candidates:
        s = c.result
        t = by_key.get(s.teacher) if s.teacher else None
        if s.role != "student" or t is None or t.status != "ok" or s.status != "ok":
            continue
        for br in s.batches:
            tb = t.batch(br.batch)
            if tb is None:
                continue
            br.teacher_median_ms = tb.latency.median_ms
            if tb.latency.timing == br.latency.timing and br.latency.median_ms > 0:
                br.speedup_vs_teacher = tb.latency.median_ms / br.latency.median_ms
                # Like for like: one backend, one precision, one device. Otherwise the ratio is still
                # shown, marked, because it mixes the runtime's speed into the models' difference.
                same = (s.backend, s.precision, s.device) == (t.backend, t.precision, t.device)
                br.speedup_like_for_like = same
        if s.accuracy and t.accuracy:
            s.accuracy.teacher_top1 = t.accuracy.top1
            if s.accuracy.preds is not None and t.accuracy.preds is not None and len(s.accuracy.preds) == len(t.accuracy.preds):
                s.accuracy.agreement = 100.0 * float(np.mean(s.accuracy.preds == t.accuracy.preds))


# =========================================================================== entry points

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


def _check_timing(warmup_s: float, min_s: float, min_iters: int) -> None:
    if warmup_s < 0 or min_s < 0:
        raise UserError("--warmup-s and --min-s must be >= 0")
    if min_iters < 1:
        raise UserError("--min-iters must be >= 1")


def _model_name(model: nn.Module, name: str | None) -> str:
    return name or getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__


def bench_models(teacher_model: nn.Module | None, student_model: nn.Module, *, img_size: int,
                 backends: Sequence[str] = ("torch-eager",), batch_sizes: Sequence[int] = (1, 8, 64),
                 precision: str | None = None, device: str = "auto", warmup_s: float = 1.0, min_s: float = 3.0,
                 min_iters: int = 50, rounds: int = 3, student_name: str | None = None,
                 teacher_name: str | None = None, student_val=None, teacher_val=None, eval_batch: int = 64,
                 compile_mode: str | None = None, threads: int | None = None, progress: bool = True) -> BenchReport:
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
    _check_timing(warmup_s, min_s, min_iters)
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
    settings = dict(batch_sizes=batch_sizes, backends=backends, precision=prec, device=dev, warmup_s=warmup_s,
                    min_s=min_s, min_iters=min_iters, rounds=rounds, img_size=img_size, eval_batch=eval_batch,
                    threads=threads or torch.get_num_threads(), timing_note=TIMING_NOTE)
    with cpu_threads(threads):
        settings.update(_torch_settings())
        results = bench_runners(cands, batch_sizes=batch_sizes, warmup_s=warmup_s, min_s=min_s,
                                min_iters=min_iters, rounds=rounds, eval_batch=eval_batch, progress=progress)
    return BenchReport(results=results, settings=settings, machine=machine_info())




def _val_sets(spec: str, arts: list[Artifact], max_val: int | None) -> tuple[dict, dict]:
    """One validation dataset per distinct preprocessing, all on the same (sub)set of images."""
    from spofa_deploy.data import load_splits, stratified_subset

    sets: dict[tuple, object] = {}
    info: dict = {"spec": spec}
    idx = None
    for a in arts:
        key = Preprocessing.from_meta(a.meta, a.img_size)  # what makes two models' validation images differ
        if key in sets:
            continue
        m = a.meta
        splits = load_splits(spec, key, train_aug=False)
        if splits.num_classes != int(m["num_classes"]):
            raise UserError(f"data {spec} has {splits.num_classes} classes but {a.path.name} has {m['num_classes']}: "
                            "pass the --data it was trained on")
        val = splits.val
        if max_val is not None:
            if idx is None:
                idx = stratified_subset(val.labels, max_val, seed=0)
            val = val.subset(idx)
        info["val_size"] = len(val)
        sets[key] = val
    return {a.path: sets[Preprocessing.from_meta(a.meta, a.img_size)] for a in arts}, info


# The large batch of the default (1 and this): throughput where the hardware allows it, minutes not hours on a CPU.
LARGE_BATCH = {"cuda": 256, "cpu": 64}


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


def run_bench(artifact: str | Path, *, teacher: str | Path | None = None, data: str | None = None,
              backends: Sequence[str] = ("auto",), batch_sizes: Sequence[int] | None = None,
              precisions: Sequence[str] | None = None, warmup_s: float = 1.0, min_s: float = 3.0,
              min_iters: int = 50, rounds: int = 3, max_val: int | None = None, device: str = "auto",
              teacher_backend: str | None = None, accuracy: bool = True, eval_batch: int = 64,
              compile_mode: str | None = None, trust_engine: bool = False, threads: int | None = None,
              json_path: str | Path | None = None, plot_path: str | Path | None = None,
              progress: bool = True) -> BenchReport:
    """Bench a student artifact (and its run's teacher) for latency and accuracy.

    Args:
        artifact: `.engine`, `.onnx`, `.safetensors`, or a run folder (its student.safetensors).
        teacher: the teacher to compare with (default: `teacher_file` of the student's run).
        data: data spec for accuracy (default: the one in the metadata).
        backends: backends for the student ("auto" = the artifact's natural runtime).
        batch_sizes: batch sizes to time (default: 1 and a large batch the artifacts accept, `default_batches`).
        precisions: PyTorch autocast precisions (fp32/bf16/fp16); for ONNX/engines, must match the export.
        warmup_s, min_s, min_iters: the timing method (see `spofa_deploy.bench.measure`).
        rounds: interleaved student/teacher rounds per batch size.
        max_val: evaluate on a stratified subset of this many validation images.
        device: auto | cpu | cuda | cuda:N (PyTorch backends; others have a fixed device).
        teacher_backend: force the teacher's backend (default: the student's; an exported student's teacher is
            exported the same way and cached beside it, `variants.teacher_like`).
        accuracy: evaluate accuracy (needs the data).
        eval_batch: batch size of the accuracy pass.
        compile_mode: `torch.compile` mode for torch-compile.
        trust_engine: passed to `TrtRunner`.
        threads: CPU threads for PyTorch and ONNX Runtime (default: their own defaults).
        json_path, plot_path: also write the JSON report / the accuracy-latency PNG.
        progress: show transient progress bars on stderr.

    Raises:
        UserError: bad artifact, sidecar mismatch, engine refused, unsupported batch size, unknown backend.
    """
    with cpu_threads(threads):
        return _run_bench(artifact, teacher=teacher, data=data, backends=backends, batch_sizes=batch_sizes,
                          precisions=precisions, warmup_s=warmup_s, min_s=min_s, min_iters=min_iters, rounds=rounds,
                          max_val=max_val, device=device, teacher_backend=teacher_backend, accuracy=accuracy,
                          eval_batch=eval_batch, compile_mode=compile_mode, trust_engine=trust_engine,
                          threads=threads, json_path=json_path, plot_path=plot_path, progress=progress)


def _run_bench(artifact, *, teacher, data, backends, batch_sizes, precisions, warmup_s, min_s, min_iters, rounds,
               max_val, device, teacher_backend, accuracy, eval_batch, compile_mode, trust_engine, threads,
               json_path, plot_path, progress) -> BenchReport:
    backends = check_backends(backends)
    batch_sizes = _check_batches(batch_sizes) if batch_sizes is not None else None
    _check_timing(warmup_s, min_s, min_iters)
    if max_val is not None and max_val < 1:
        raise UserError("--max-val must be >= 1")
    for flag, out in (("--json", json_path), ("--plot", plot_path)):
        if out is not None and not Path(out).parent.is_dir():  # fail now, not after minutes of timing
            raise UserError(f"{flag}: folder {Path(out).parent} does not exist")
    if teacher_backend is not None:
        teacher_backend = check_backends([teacher_backend])[0]
        if teacher_backend == "auto":
            teacher_backend = None
    precs = [p.strip().lower() for p in precisions] if precisions else [None]
    dev = bench_device(device)
    notes: list[str] = []
    art = resolve_artifact(artifact, trust=trust_engine)
    if art.meta.get("trusted_without_sidecar") and accuracy:
        notes.append(f"{art.path.name} has no sidecar (--trust): no preprocessing metadata, accuracy not measured")
        accuracy = False
    tart = teacher_artifact(art, teacher, notes, like_student=teacher_backend is None)
    for a in (art, tart):
        if a is not None and a.format == "pt2" and a.meta.get("compile_seconds") is not None:
            notes.append(f"{a.path.name}: compiled once, at export, in {a.meta['compile_seconds']:.0f} s (not in the latency)")
    arts = [art] + ([tart] if tart else [])
    for a in arts:
        if a.batch_range and batch_sizes:  # checked before any runtime loads: holds where TensorRT is missing too
            bad = [b for b in batch_sizes if not a.batch_range[0] <= b <= a.batch_range[1]]
            if bad:
                what = "fixed batch" if a.format == "onnx" else "engine profile"
                raise UserError(f"{a.path.name} accepts batch {a.batch_range[0]}..{a.batch_range[1]} ({what}); "
                                f"--batch asked for {', '.join(map(str, bad))}")
    if tart is not None and tart.img_size != art.img_size:
        notes.append(f"teacher input {tart.img_size}px, student {art.img_size}px: each timed at its own size")

    cands = artifact_candidates(art, tart, backends=backends, precisions=precs, device_opt=device, device=dev,
                                teacher_backend=teacher_backend, notes=notes, trust_engine=trust_engine,
                                compile_mode=compile_mode, threads=threads)
    batch_sizes = batch_sizes or default_batches(cands, arts, notes)
    data_info = None
    spec = data or art.meta.get("data")
    if accuracy and spec:
        by_path, data_info = _val_sets(spec, arts, max_val)
        for c in cands:
            c.val = by_path[Path(c.result.artifact)] if c.runner is not None else None
    elif accuracy:
        notes.append("no data spec in the metadata and no --data: accuracy not measured")

    settings = dict(artifact=str(art.path), teacher=str(tart.path) if tart else None, backends=backends,
                    batch_sizes=batch_sizes, precisions=precisions, device=dev, warmup_s=warmup_s, min_s=min_s,
                    min_iters=min_iters, rounds=rounds, max_val=max_val, eval_batch=eval_batch,
                    threads=threads or torch.get_num_threads(), img_size=art.img_size, timing_note=TIMING_NOTE,
                    **_torch_settings())
    results = bench_runners(cands, batch_sizes=batch_sizes, warmup_s=warmup_s, min_s=min_s, min_iters=min_iters,
                            rounds=rounds, eval_batch=eval_batch, progress=progress)
    report = BenchReport(results=results, settings=settings, machine=machine_info(), data=data_info, notes=notes)
    if json_path is not None:
        write_report_json(report, json_path)
    if plot_path is not None:
        write_plot(report, plot_path)
    return report
