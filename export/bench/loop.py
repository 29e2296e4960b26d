"""The timing and accuracy loop of `spofa bench` (`bench_runners`), shared by `run_bench` and `bench_models`.

Per batch size every runnable candidate is prepared, then timed in turn, `rounds` times
(A B A B ...), each round a share of the timing budget (`TimingOptions.round`); the rounds
are pooled, so slow drift (clocks, thermals, other tenants) affects student and teacher
alike. Accuracy runs through the same runners afterwards; students are then paired with
their teachers (speed-up, top-1 agreement).
"""
from __future__ import annotations

import numpy as np
import torch

from export.bench.report import Accuracy, BatchResult, VariantResult
from export.bench.timing import LatencyStats, TimingOptions, measure
from export.bench.variants import Candidate
from export.runner import BackendUnavailable, Runner, TimedStep
from spofa_deploy.accuracy import topk_correct
from spofa_deploy.errors import UserError


def activate(candidates: list[Candidate]) -> None:
    """Load every candidate's runner; one whose backend turns out to be missing here is skipped with the reason."""
    for c in candidates:
        if c.runner is None:
            continue
        try:
            c.runner.activate()
        except BackendUnavailable as e:
            c.result.status, c.result.reason = "skipped", str(e)
            c.runner = None


def evaluate(runner: Runner, dataset, batch_size: int, progress=None, task=None) -> Accuracy:
    """Top-1 / top-5 of `runner` over `dataset` (in order); predictions kept for agreement.

    A short last batch is padded to `batch_size` (and the padding dropped) where the
    runner has fixed shapes or does not accept that size.
    """
    from spofa_deploy.data.loaders import make_loader

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
    """`wanted`, moved into the runner's batch range."""
    if runner.batch_range is None:
        return wanted
    return min(max(wanted, runner.batch_range[0]), runner.batch_range[1])


def _fail_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_batch_sizes(candidates: list[Candidate], batch_sizes: list[int]) -> None:
    for c in candidates:
        bad = [b for b in batch_sizes if c.runner is not None and not c.runner.batch_sizes_supported(b)]
        if bad:
            rng = c.runner.batch_range
            allowed = f"{rng[0]}..{rng[1]}" if rng else "its fixed size"
            raise UserError(f"{c.result.model} ({c.result.backend}) accepts batch sizes {allowed}; "
                            f"--batch asked for {', '.join(map(str, bad))}")


def _time_batch(live: list[Candidate], b: int, timing: TimingOptions, prog, task) -> None:
    """Prepare every candidate at batch `b`, time them interleaved, and append the pooled results. A candidate that
    fails at `b` (out of memory at a large batch, a capture failure) keeps its other batches (`batch_failures`)."""
    failed: set[int] = set()

    def fail(i: int, why: str) -> None:
        failed.add(i)
        live[i].result.batch_failures[b] = why

    steps: dict[int, TimedStep] = {}
    parts: dict[int, list[LatencyStats]] = {}
    for i, c in enumerate(live):
        if c.result.status != "ok":
            continue
        prog.update(task, info=f"batch {b}: preparing {c.result.model} {c.result.backend}")
        try:
            steps[i] = c.runner.prepare(b)
        except UserError:
            raise
        except Exception as e:  # e.g. compile or capture failure: report it, keep the others
            fail(i, f"prepare: {_fail_reason(e)}")
    for r in range(timing.rounds):
        for i, step in steps.items():
            c = live[i]
            if i in failed:
                continue
            prog.update(task, info=f"batch {b} round {r + 1}/{timing.rounds}: {c.result.role} {c.result.backend}")
            try:
                st = measure(step, batch=b, timing=timing.round(r))
            except Exception as e:
                fail(i, f"timing: {_fail_reason(e)}")
                continue
            parts.setdefault(i, []).append(st)
            prog.advance(task)
    for i, ps in parts.items():
        c = live[i]
        if i not in failed:  # compile / capture time is reported apart, never inside the latency
            c.result.batches.append(BatchResult(batch=b, latency=LatencyStats.pool(ps),
                                                compile_s=c.runner.compile_seconds.get(b),
                                                cuda_graph=c.runner.cuda_graph))
    steps.clear()
    for c in live:
        c.runner.release()


def _evaluate_all(live: list[Candidate], eval_batch: int, prog) -> None:
    to_eval = [c for c in live if c.val is not None and c.result.status == "ok"]
    if not to_eval:
        return
    task = prog.add_task("accuracy", total=sum(len(c.val) for c in to_eval), info="")
    for c in to_eval:
        prog.update(task, info=f"{c.result.role} {c.result.model} {c.result.backend}")
        try:
            c.result.accuracy = evaluate(c.runner, c.val, _eval_batch(c.runner, eval_batch), prog, task)
        except UserError:
            raise
        except Exception as e:
            c.result.status, c.result.reason = "failed", f"accuracy: {_fail_reason(e)}"
        finally:
            c.runner.release()


def bench_runners(candidates: list[Candidate], *, batch_sizes: list[int], timing: TimingOptions,
                  eval_batch: int = 64, progress: bool = True) -> list[VariantResult]:
    """Time and evaluate the candidates (their runners active: `activate`); fills and returns their `VariantResult`s.

    Raises:
        UserError: a batch size a runner does not accept, or a runner's own UserError.
    """
    from spofa_deploy.console import progress as make_progress

    _check_batch_sizes(candidates, batch_sizes)
    live = [c for c in candidates if c.runner is not None]
    prog = make_progress(transient=True)
    prog.disable = not progress
    try:
        with prog:
            task = prog.add_task("timing", total=len(live) * len(batch_sizes) * timing.rounds, info="")
            for b in batch_sizes:
                _time_batch(live, b, timing, prog, task)
            for c in live:  # a variant that ran at no batch at all has failed
                if c.result.status == "ok" and not c.result.batches and c.result.batch_failures:
                    b, why = next(iter(c.result.batch_failures.items()))
                    c.result.status, c.result.reason = "failed", f"at batch {b}: {why}"
            _evaluate_all(live, eval_batch, prog)
    finally:
        for c in live:
            c.runner.deactivate()
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
            s.accuracy.agreement = _agreement(s.accuracy.preds, t.accuracy.preds)


def agree_with_reference(results: list[VariantResult], reference: str) -> None:
    """Each student's top-1 agreement with the fp32 reference file's (`Accuracy.agreement_fp32`): its variant on
    the same backend where it has one, else its first; only where both saw the same images."""
    refs = [r for r in results if r.role == "student" and r.artifact == reference and r.accuracy is not None
            and r.accuracy.preds is not None]
    for r in results:
        if r.role != "student" or r.accuracy is None or r.accuracy.preds is None or not refs:
            continue
        ref = next((x for x in refs if x.backend == r.backend), refs[0])
        r.accuracy.agreement_fp32 = _agreement(r.accuracy.preds, ref.accuracy.preds)


def _agreement(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Top-1 agreement (%) of two prediction arrays; None unless both saw the same images."""
    if a is None or b is None or len(a) != len(b):
        return None
    return 100.0 * float(np.mean(a == b))
