"""The CLI's error policy for every exception, every command, in-process (`cli.main.main` with sys.argv).

Each command's library function is replaced by one that raises; the policy must hold whatever
it raises: an internal error exits 1 with one stderr line and the `--debug` hint (no traceback),
`--debug` adds the traceback, a UserError or a bad flag exits 2 with one `error:` line, Ctrl-C
(KeyboardInterrupt, click's / typer's Abort) exits 130, typer's Exit keeps its code. Runs on
whichever typer/click is installed (vendored click in typer >= 0.20, or click itself).
"""
from __future__ import annotations

import importlib
import sys

import pytest

from spofa_deploy.errors import UserError

# command -> (its arguments, "module:function" of the one library call it makes)
COMMANDS = {
    "teacher": (["teacher"], "spofa_deploy.teacher.stage:train_teacher"),
    "distill": (["distill"], "spofa_deploy.pipeline:distill"),
    "export": (["export", "student.safetensors", "--format", "onnx"], "export.exporter:export_model"),
    "bench": (["bench", "student.onnx"], "export.bench.run:run_bench"),
    "compare": (["compare"], "spofa_deploy.compare.run:run_compare"),
    "qat": (["qat"], "calibration.qat:qat"),
    "doctor": (["doctor"], "spofa_deploy.doctor:diagnose"),
}


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """No oversubscription warning: the stderr these tests count must not depend on the machine's load."""
    import spofa_deploy.machine as machine

    monkeypatch.setattr(machine, "oversubscribed", lambda: None)


def _raise_in(monkeypatch, command: str, exc: BaseException) -> list[str]:
    """Make `command`'s library call raise `exc` (it is looked up at call time); returns the command's args."""
    args, target = COMMANDS[command]
    module, name = target.split(":")

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(importlib.import_module(module), name, boom)
    return args


@pytest.mark.parametrize("command", COMMANDS)
def test_internal_error_is_one_line_with_the_debug_hint(command, spofa, monkeypatch) -> None:
    args = _raise_in(monkeypatch, command, RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for head"))
    r = spofa(*args)
    assert r.code == 1, r
    lines = r.err_lines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.err}"
    assert lines[0].startswith("internal error: RuntimeError: Error(s) in loading state_dict: size mismatch"), lines
    assert "--debug" in lines[0]
    assert "Traceback" not in r.err


@pytest.mark.parametrize("command", COMMANDS)
def test_debug_shows_the_traceback(command, spofa, monkeypatch) -> None:
    args = _raise_in(monkeypatch, command, RuntimeError("boom"))
    r = spofa("--debug", *args)
    assert r.code == 1, r
    assert "Traceback (most recent call last)" in r.err and "RuntimeError: boom" in r.err, r.err
    assert r.err_lines()[-1].startswith("internal error: RuntimeError: boom"), r.err


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_exits_130(command, spofa, monkeypatch) -> None:
    args = _raise_in(monkeypatch, command, KeyboardInterrupt())
    r = spofa(*args)
    assert r.code == 130, r
    assert r.err_lines() == ["interrupted"], r.err


@pytest.mark.parametrize("command", COMMANDS)
def test_user_error_exits_2_with_one_line(command, spofa, monkeypatch) -> None:
    args = _raise_in(monkeypatch, command, UserError("--data: folder not found: /nowhere"))
    r = spofa(*args)
    assert r.code == 2, r
    assert r.err_lines() == ["error: --data: folder not found: /nowhere"], r.err


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_exits_2_with_one_line(command, spofa) -> None:
    r = spofa(*COMMANDS[command][0], "--bogus")
    assert r.code == 2, r
    lines = r.err_lines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bogus" in lines[0], r.err
    assert "Traceback" not in r.err


def test_bad_option_value_exits_2_with_one_line(spofa) -> None:
    r = spofa("distill", "--threads", "0")
    assert r.code == 2, r
    lines = r.err_lines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--threads" in lines[0], r.err


def test_aborts_from_click_and_typer_exit_130(spofa, monkeypatch) -> None:
    import typer

    aborts = {getattr(typer, "Abort", None)}
    try:  # click itself, where installed (typer >= 0.20 vendors its own copy)
        from click.exceptions import Abort
        aborts.add(Abort)
    except ImportError:
        pass
    for abort in aborts - {None}:
        args = _raise_in(monkeypatch, "doctor", abort())
        r = spofa(*args)
        assert r.code == 130 and r.err_lines()[-1] == "interrupted", (abort, r)


def test_typer_exit_keeps_its_code(spofa, monkeypatch) -> None:
    import typer

    args = _raise_in(monkeypatch, "doctor", typer.Exit(3))
    assert spofa(*args).code == 3
    args = _raise_in(monkeypatch, "doctor", typer.Exit())
    r = spofa(*args)
    assert r.code == 0 and not r.err_lines(), r


def test_help_and_no_arguments(spofa) -> None:
    r = spofa("--help")
    assert r.code == 0 and "distill" in r.out and "error" not in r.err, r
    r = spofa()  # no_args_is_help: the help, exit 0 (click < 8.2) or 2 (click >= 8.2), never an error line
    assert r.code in (0, 2), r
    assert "Usage" in r.out + r.err and "distill" in r.out + r.err
    assert "error:" not in r.err and "Traceback" not in r.err


def test_exceptions_named_like_clicks_elsewhere_are_internal_errors(spofa, monkeypatch) -> None:
    """Classes are matched by name only within click / typer: another library's `Exit` is a bug, not an exit."""
    Exit = type("Exit", (Exception,), {"__module__": "somelib.errors"})
    args = _raise_in(monkeypatch, "doctor", Exit("no"))
    r = spofa(*args)
    assert r.code == 1 and r.err_lines()[0].startswith("internal error: Exit: no"), r


def test_an_exception_without_a_message(spofa, monkeypatch) -> None:
    args = _raise_in(monkeypatch, "distill", AssertionError())
    r = spofa(*args)
    assert r.code == 1 and len(r.err_lines()) == 1 and r.err_lines()[0].startswith("internal error: AssertionError ("), r


def test_resume_with_another_method_ends_in_one_clean_line(tmp_path) -> None:
    """Issue 13's example, end to end: a `--method kd` run resumed with the default method (spofa).

    Its checkpoint has no SPOFA heads. Whether that is refused up front (exit 2) or fails while
    loading the checkpoint (exit 1), the user sees one error line and no traceback.
    """
    import os
    import re
    import subprocess
    from pathlib import Path

    import torch

    from spofa_deploy.artifacts import save_model
    from spofa_deploy.models import count_params, create_model, data_config

    repo = Path(__file__).resolve().parents[1]
    classes = [str(i) for i in range(10)]
    torch.manual_seed(0)
    teacher = create_model("test_vit", 10, 32)
    tpath = tmp_path / "teacher" / "teacher.safetensors"
    tpath.parent.mkdir()
    save_model(tpath, teacher, {"role": "teacher", "model": "test_vit", "num_classes": 10, "classes": classes,
                                "img_size": 32, **data_config(teacher), "data": "digits", "params": count_params(teacher)})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    common = ["distill", "--teacher", "test_vit", "--student", "test_resnet", "--data", "digits", "--teacher-ckpt",
              str(tpath), "--train-fraction", "0.1", "--batch-size", "32", "--workers", "0", "--device", "cpu",
              "--out", str(tmp_path / "R")]

    def spofa(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *common, *args], cwd=tmp_path, env=env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=300)

    first = spofa("--method", "kd", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    r = spofa("--epochs", "2", "--resume")
    assert r.returncode in (1, 2), f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(internal )?error: ", line)]
    assert len(errors) == 1 and errors[0] == lines[-1], r.stderr
    if r.returncode == 1:
        assert "--debug" in errors[0], errors
