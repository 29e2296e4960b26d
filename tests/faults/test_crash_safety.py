"""Crash safety of `spofa distill`: SIGKILL during a step, an evaluation and a checkpoint write; a full disk.

A run killed in its first epoch (no checkpoint yet) is refused by --resume with one line and
can simply be started again. The other cases each start from a copy of the same run, killed inside step 3 of epoch 2 (so it holds the
epoch-1 checkpoint), injects one more fault while resuming it, then resumes it to the end.
Every time the files read back (JSON, metrics, checkpoint with weights_only=True, student via
`load_student`), the checkpoint on disk is never a half-written one, and the resumed run ends
bitwise equal to the uninterrupted reference run (`base`).
"""
from __future__ import annotations

import signal

import pytest

import faultkit as fk
from faultkit import CHECKPOINT, check_run_readable, copy_run, distill_args, job, sha, spofa, temp_files

KILLED = -signal.SIGKILL


def _resume(ctx, run, fault=None):
    return spofa(distill_args(ctx, run) + ["--resume"], fault=fault)


def _start(ctx, name):
    killed, src = ctx.result("killed")
    assert killed.rc == KILLED, f"the run to copy was not killed as planned\n{killed}"
    run = copy_run(src, ctx.root / "crash" / name)
    return run, check_run_readable(run)


@job("crash_step")
def _crash_step(ctx):
    run, before = _start(ctx, "step")
    return {"run": run, "epoch_before": before["epoch"], "resume": _resume(ctx, run)}


@job("crash_eval")
def _crash_eval(ctx):
    run, _ = _start(ctx, "eval")
    h = sha(run / CHECKPOINT)
    first = _resume(ctx, run, fault={"kill_eval": 0})  # as the resumed epoch 2's evaluation begins
    return {"run": run, "first": first, "ckpt_same": sha(run / CHECKPOINT) == h, "readable": _readable(run),
            "resume": _resume(ctx, run)}


@job("crash_ckpt")
def _crash_ckpt(ctx):
    run, _ = _start(ctx, "ckpt")
    h = sha(run / CHECKPOINT)
    first = _resume(ctx, run, fault={"ckpt_fault": "kill"})  # half the bytes written, then SIGKILL
    tmp = temp_files(run)
    return {"run": run, "first": first, "ckpt_same": sha(run / CHECKPOINT) == h, "tmp": tmp,
            "readable": _readable(run), "resume": _resume(ctx, run), "tmp_after": temp_files(run)}


@job("disk_full")
def _disk_full(ctx):
    run, _ = _start(ctx, "diskfull")
    h = sha(run / CHECKPOINT)
    r = _resume(ctx, run, fault={"ckpt_fault": "enospc"})  # half the bytes written, then ENOSPC
    return {"run": run, "result": r, "ckpt_same": sha(run / CHECKPOINT) == h, "tmp": temp_files(run),
            "readable": _readable(run)}


@job("crash_first_epoch")
def _crash_first_epoch(ctx):
    run = ctx.root / "crash" / "first_epoch"
    killed = spofa(distill_args(ctx, run), fault={"kill_step": 3})  # before any checkpoint exists
    files = sorted(p.name for p in run.iterdir())
    before = fk.tree_hash(run)
    resume = _resume(ctx, run)
    changed = fk.changed(before, fk.tree_hash(run))
    return {"run": run, "killed": killed, "files": files, "resume": resume, "changed": changed,
            "restart": spofa(distill_args(ctx, run))}


def _readable(run) -> str | None:
    try:
        check_run_readable(run)
    except Exception as e:  # noqa: BLE001 - reported by the test
        return f"{type(e).__name__}: {e}"
    return None


def _assert_matches_base(jobs, run) -> None:
    base, base_dir = jobs.result("base")
    assert base.rc == 0, f"reference run failed\n{base}"
    got, ref = check_run_readable(run), check_run_readable(base_dir)
    assert got["epoch"] == ref["epoch"] == 2
    diff = fk.state_diff({k: got[k] for k in ("net", "ema", "extra", "optimizer")},
                         {k: ref[k] for k in ("net", "ema", "extra", "optimizer")})
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    assert fk.safetensors_payload(run / "student.safetensors") == fk.safetensors_payload(base_dir / "student.safetensors")


@pytest.mark.uses("teacher", "crash_first_epoch")
def test_sigkill_in_the_first_epoch_then_resume_or_restart(jobs) -> None:
    c = jobs.result("crash_first_epoch")
    assert c["killed"].rc == KILLED, c["killed"]
    assert CHECKPOINT not in c["files"] and not any(f.endswith(".tmp") for f in c["files"]), c["files"]
    fk.assert_user_error(c["resume"], "--resume", f"no {CHECKPOINT}")  # nothing to resume: said clearly
    assert not c["changed"], c["changed"]
    assert c["restart"].rc == 0, c["restart"]  # the same --out can simply be started again
    check_run_readable(c["run"])


@pytest.mark.uses("killed", "base", "crash_step")
def test_sigkill_during_step_then_resume(jobs) -> None:
    c = jobs.result("crash_step")
    assert c["epoch_before"] == 1  # the killed run kept its epoch-1 checkpoint, readable
    assert c["resume"].rc == 0, c["resume"]
    _assert_matches_base(jobs, c["run"])


def _assert_killed_kept_resumed(c: dict, why: str) -> None:
    """The first run died by SIGKILL, its checkpoint is unchanged and readable, and --resume succeeded."""
    assert c["first"].rc == KILLED, c["first"]
    assert c["ckpt_same"], why
    assert c["readable"] is None, c["readable"]
    assert c["resume"].rc == 0, c["resume"]


@pytest.mark.uses("killed", "base", "crash_eval")
def test_sigkill_during_evaluation_then_resume(jobs) -> None:
    c = jobs.result("crash_eval")
    _assert_killed_kept_resumed(c, "the checkpoint changed although the run died before writing one")
    _assert_matches_base(jobs, c["run"])


@pytest.mark.uses("killed", "base", "crash_ckpt")
def test_sigkill_during_checkpoint_write_then_resume(jobs) -> None:
    c = jobs.result("crash_ckpt")
    _assert_killed_kept_resumed(c, "checkpoint-last.pt was modified by an interrupted write (not atomic)")
    # SIGKILL skips every cleanup: the half-written temp file stays, under a hidden temp name only.
    assert all(t.startswith(f".{CHECKPOINT}.") for t in c["tmp"]), c["tmp"]
    _assert_matches_base(jobs, c["run"])  # ... and it breaks nothing


@pytest.mark.uses("killed", "disk_full")
def test_disk_full_keeps_the_previous_checkpoint(jobs) -> None:
    c = jobs.result("disk_full")
    r = c["result"]
    assert r.rc != 0, r
    assert c["ckpt_same"], "checkpoint-last.pt changed after a failed write"
    assert c["tmp"] == [], f"temp files left behind: {c['tmp']}"
    assert c["readable"] is None, c["readable"]
    assert "Traceback" not in r.err, r
    errs = r.error_lines()  # one line (an internal error adds the --debug hint below it)
    assert len(errs) == 1, r
    assert "the disk is full" in errs[0].lower() and CHECKPOINT in errs[0], r


@pytest.mark.uses("killed", "disk_full")
def test_disk_full_is_a_user_error(jobs) -> None:
    fk.assert_user_error(jobs.result("disk_full")["result"], "the disk is full", "free space")
