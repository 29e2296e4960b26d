"""CPU threads: `--threads N` on the training commands, and the oversubscription probe (`spofa_deploy.machine`)."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from spofa_deploy import machine
from spofa_deploy.errors import UserError


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _machine(monkeypatch, load: float | None, cores: int) -> None:
    """Pretend the 1-minute load average is `load` (None: the OS has none) on `cores` usable cores."""
    if load is None:
        monkeypatch.delattr(os, "getloadavg", raising=False)
    else:
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(machine, "usable_cores", lambda: cores)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_set_threads_refuses_what_is_not_a_count(bad) -> None:
    with pytest.raises(UserError, match="--threads"):
        machine.set_threads(bad)


def test_set_threads_sets_torch_threads() -> None:
    machine.set_threads(2)
    assert torch.get_num_threads() == 2
    machine.set_threads(1)
    assert torch.get_num_threads() == 1


def test_usable_cores_is_the_affinity() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert machine.usable_cores() == expected >= 1


@pytest.mark.parametrize("load, cores, threads, crowded, suggest", [
    (3.1, 2, 2, True, 1),     # the machine: busier than its cores
    (1.0, 2, 2, True, 1),     # one other busy process on 2 cores: already 10-30x slower
    (0.3, 2, 2, False, 1),    # idle
    (3.1, 2, 1, False, 1),    # one thread: nothing to wait for, so no advice
    (10.0, 64, 64, True, 54),
    (0.8, 64, 64, False, 63),
])
def test_oversubscription_rule(load, cores, threads, crowded, suggest) -> None:
    c = machine.CpuLoad(load, cores, threads)
    assert c.oversubscribed is crowded
    assert c.suggested_threads == suggest
    line = c.line()
    assert "\n" not in line and f"load {load:.1f} on {cores} cores" in line
    assert (f"try --threads {suggest}" in line) is crowded


def test_probe_reads_the_load_average(monkeypatch) -> None:
    torch.set_num_threads(2)
    _machine(monkeypatch, 3.1, 2)
    advice = machine.oversubscribed()
    assert advice == ("load 3.1 on 2 cores, PyTorch uses 2 threads: other processes are using the CPU; PyTorch's "
                      "default threads can slow training 10-30x; try --threads 1")
    assert machine.load_report() == advice
    _machine(monkeypatch, 0.2, 2)
    assert machine.oversubscribed() is None
    assert machine.load_report().endswith("not oversubscribed")
    _machine(monkeypatch, None, 2)  # Windows: no load average, no advice, still a line
    assert machine.oversubscribed() is None and "no load average" in machine.load_report()


def test_doctor_shows_the_line(monkeypatch, capsys) -> None:
    from cli.cmd_doctor import doctor
    from spofa_deploy import doctor as d
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what a fresh process would use on 2 cores
    _machine(monkeypatch, 3.1, 2)
    cpu = {c.component: c for c in d.diagnose()}["CPU threads"]
    assert not cpu.usable and cpu.detail.startswith("load 3.1 on 2 cores") and "--threads 1" in cpu.disables
    doctor()
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: CPU: load 3.1 on 2 cores, PyTorch uses 2 threads: other processes are using the CPU" in out
    assert "try --threads 1" in out
    _machine(monkeypatch, 0.1, 2)
    doctor()
    assert "CPU: load 0.1 on 2 cores, PyTorch uses 2 threads: not oversubscribed" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- the option reaches the library

TRAINING = {  # command -> (args, "module:function" it calls)
    "teacher": (["teacher"], "spofa_deploy.teacher.stage:train_teacher"),
    "distill": (["distill"], "spofa_deploy.pipeline:distill"),
    "compare": (["compare"], "spofa_deploy.compare.run:run_compare"),
}


def _run(monkeypatch, capsys, command: str, *extra: str) -> tuple[int, int, str]:
    """`spofa COMMAND EXTRA` in-process, its library call replaced: (exit code, torch threads at the call, stderr)."""
    from cli.main import main

    args, target = TRAINING[command]
    module, name = target.split(":")
    seen = []

    def record(*a, **k):
        seen.append(torch.get_num_threads())
        raise SystemExit(0)  # stop before any printing of results

    monkeypatch.setattr(importlib.import_module(module), name, record)
    monkeypatch.setattr(sys, "argv", ["spofa", *args, *extra])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, seen[0] if seen else None, capsys.readouterr().err


@pytest.mark.parametrize("command", TRAINING)
def test_threads_reaches_the_library(command, monkeypatch, capsys) -> None:
    torch.set_num_threads(2)
    code, threads, err = _run(monkeypatch, capsys, command, "--threads", "1")
    assert (code, threads) == (0, 1), err
    torch.set_num_threads(1)
    code, threads, err = _run(monkeypatch, capsys, command, "--threads", "2")
    assert (code, threads) == (0, 2), err


@pytest.mark.parametrize("command", TRAINING)
def test_warning_once_when_crowded_and_threads_not_given(command, monkeypatch, capsys) -> None:
    torch.set_num_threads(2)
    _machine(monkeypatch, 3.1, 2)
    code, threads, err = _run(monkeypatch, capsys, command)
    assert code == 0 and threads == 2  # advice only: the default is left alone
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "load 3.1 on 2 cores" in warnings[0], err
    assert "--threads 1" in " ".join(err.split())
    code, threads, err = _run(monkeypatch, capsys, command, "--threads", "1")
    assert threads == 1 and "warning" not in err, err  # the user chose: no advice
