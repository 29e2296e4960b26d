"""Numerical faults in `spofa distill`: NaN/Inf in the loss or the gradients, and an exploding loss.

The faults are injected by tests/faults/inject.py through the training loop's hooks (the loss of
chosen steps multiplied by NaN or by 1000 in `on_loss`, or the gradients made NaN in backward);
the CLI itself is unchanged.
"""
from __future__ import annotations

import pytest

import faultkit as fk
from faultkit import CHECKPOINT, STEPS_PER_EPOCH, copy_run, distill_args, events, job, sha, spofa, temp_files


def _snapshot(run) -> dict:
    return {n: sha(run / n) for n in (CHECKPOINT, "student.safetensors", "student.json")}


@job("nan_stop")
def _nan_stop(ctx):
    """The killed run resumed (policy stop, the default) with a NaN loss at step 2 of epoch 2."""
    _, src = ctx.result("killed")
    run = copy_run(src, ctx.root / "nan" / "stop")
    before = _snapshot(run)
    r = spofa(distill_args(ctx, run) + ["--resume", "--on-nan", "stop"], fault={"nan_loss": [2]})
    return {"run": run, "result": r, "same": before == _snapshot(run), "tmp": temp_files(run)}


@job("nan_stop_then_skip")
def _nan_stop_then_skip(ctx):
    """After that stop, the user resumes with --on-nan skip (the same bad step comes again)."""
    run = copy_run(ctx.result("nan_stop")["run"], ctx.root / "nan" / "stop_then_skip")
    return {"run": run, "result": spofa(distill_args(ctx, run) + ["--resume", "--on-nan", "skip"],
                                        fault={"nan_loss": [2]})}


@job("nan_skip", priority=1)
def _nan_skip(ctx):
    """A fresh 1-epoch run with --on-nan skip: loss x1000 at step 1, NaN loss at step 3, NaN gradient at step 5."""
    run = ctx.root / "nan" / "skip"
    r = spofa(distill_args(ctx, run, 1, "--on-nan", "skip"),
              fault={"scale_loss": {"1": 1000.0}, "nan_loss": [3], "nan_grad": [5]})
    return {"run": run, "result": r}


@job("nan_skip_limit")
def _nan_skip_limit(ctx):
    """A fresh 1-epoch run with --on-nan skip and a NaN loss on every step from step 2 on."""
    run = ctx.root / "nan" / "skip_limit"
    return {"run": run, "result": spofa(distill_args(ctx, run, 1, "--on-nan", "skip"), fault={"nan_loss_from": 2})}


@pytest.mark.uses("killed", "nan_stop")
def test_nan_loss_stop_keeps_the_last_checkpoint(jobs) -> None:
    c = jobs.result("nan_stop")
    fk.assert_user_error(c["result"], "non-finite", "checkpoint is kept")
    assert c["same"], "checkpoint or student changed although training stopped on a NaN"
    assert c["tmp"] == []
    nonfinite = events(c["run"], "nonfinite")
    assert [e["step"] for e in nonfinite] == [STEPS_PER_EPOCH + 2], nonfinite
    assert fk.check_run_readable(c["run"])["epoch"] == 1


@pytest.mark.uses("killed", "nan_stop", "nan_stop_then_skip")
def test_resume_after_a_nan_stop_with_on_nan_skip(jobs) -> None:
    c = jobs.result("nan_stop_then_skip")
    assert c["result"].rc == 0, c["result"]
    assert [e["step"] for e in events(c["run"], "nonfinite")] == [STEPS_PER_EPOCH + 2]


@pytest.mark.uses("teacher", "nan_skip")
def test_nan_skip_counts_skipped_steps_and_logs_a_loss_spike(jobs) -> None:
    c = jobs.result("nan_skip")
    r, run = c["result"], c["run"]
    assert r.rc == 0, r
    assert "Traceback" not in r.err
    nonfinite = events(run, "nonfinite")
    assert [e["step"] for e in nonfinite] == [3, 5], nonfinite  # NaN loss, then NaN gradient with a finite loss
    spikes = events(run, "loss_spike")
    assert [e["step"] for e in spikes] == [1], spikes
    assert spikes[0]["loss"] > 100 * spikes[0]["running_mean"]
    ckpt = fk.check_run_readable(run)
    assert fk.all_finite(ckpt), "a skipped NaN step reached the weights, the optimizer or the MEMA state"


@pytest.mark.uses("teacher", "nan_skip_limit")
def test_nan_skip_stops_after_five_in_a_row(jobs) -> None:
    c = jobs.result("nan_skip_limit")
    fk.assert_user_error(c["result"], "non-finite")
    steps = [e["step"] for e in events(c["run"], "nonfinite")]
    assert steps == [2, 3, 4, 5, 6, 7], steps  # 5 skipped, the 6th in a row stops the run
    assert not (c["run"] / CHECKPOINT).exists() and temp_files(c["run"]) == []
