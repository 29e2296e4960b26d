"""Every flag of `spofa teacher`, `spofa distill`, `spofa compare` and `spofa qat` reaches the library.

Each command runs in this process with the one library function it calls replaced by a recorder, once with
no flag and once per flag with a value other than its default: the call must change, and the value given
must arrive (as a field of an option group, or an argument). A flag whose value goes nowhere, e.g. after a
dataclass field was renamed, fails here naming the flag.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import COMMANDS, app

# The library function each command calls, replaced by the recorder.
TARGETS = {"teacher": "spofa_deploy.teacher.stage:train_teacher",
           "distill": "spofa_deploy.pipeline:distill",
           "compare": "spofa_deploy.compare.run:run_compare",
           "qat": "calibration.qat:qat"}
# Text options take a value the command accepts, with the form it arrives in; numbers, paths and switches
# get generic values (below). A new text option needs its line here.
TEXT = {"--teacher": ("vit_s", "vit_s"), "--student": ("resnet18", "resnet18"), "--data": ("cifar10", "cifar10"),
        "--method": ("KD", "kd"), "--device": ("cpu", "cpu"), "--amp": ("BF16", "bf16"), "--opt": ("AdamW", "adamw"),
        "--on-nan": ("skip", "skip"), "--teacher-cache-format": ("fp32", "fp32"),
        "--stage-eps": ("1,2,3,4", (1.0, 2.0, 3.0, 4.0)), "--methods": ("kd,ofa", ("kd", "ofa")),
        "--lr-sweep": ("0.3,0.7", (0.3, 0.7))}
OWN_TEXT = {("teacher", "--opt"): ("SGD", "sgd")}  # (the teacher recipe's optimizer is adamw)
# Flags whose effect is not their value: --ablations adds methods.
EFFECT_ONLY = {"--ablations"}
# Flags a command uses after its library call: qat's export of the QAT student (tests/test_qat.py runs it).
AFTER_THE_CALL = {"qat": {"--export", "--no-export", "--force"}}
# Options a command starts from: distill's --teacher-cache-* set nothing without a cache folder.
BASE = {"distill": ["--teacher-cache", "{tmp}/cache"], "compare": ["--out", "{tmp}/compare"]}


def _leaves(x, path: str = "") -> dict:
    """Every value in `x` by its path: dataclass fields and dict items unfolded, lists and tuples kept whole."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    elif isinstance(x, dict):
        items = x
    else:
        return {path: str(x) if isinstance(x, Path) else x}
    out = {}
    for key, value in items.items():
        out.update(_leaves(value, f"{path}.{key}" if path else str(key)))
    return out


@pytest.fixture
def call(monkeypatch, tmp_path: Path):
    """`call(command, *args)`: what the command hands the library (its call, the threads it sets, a relaunch)."""
    seen: dict = {}

    class Called(Exception):
        pass

    def record(*args, **kwargs):
        seen["call"] = {"args": dict(enumerate(args)), **kwargs}
        raise Called

    for target in TARGETS.values():
        module, name = target.split(":")
        monkeypatch.setattr(importlib.import_module(module), name, record)
    monkeypatch.setattr("spofa_deploy.machine.apply_threads", lambda n: seen.update(threads=n))
    monkeypatch.setattr("spofa_deploy.train.distributed.relaunch_with_torchrun",
                        lambda nproc, argv: seen.update(relaunch=nproc) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    # A compare folder to resume (--resume): its settings are CompareConfig's defaults.
    from spofa_deploy.compare.config import CompareConfig

    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text(json.dumps({"config": dataclasses.asdict(CompareConfig())}))

    def run(command: str, *args: str) -> dict:
        seen.clear()
        argv = [command, *(a.format(tmp=tmp_path) for a in BASE.get(command, [])), *args]
        monkeypatch.setattr(sys, "argv", ["spofa", *argv])  # (what --nproc hands torchrun)
        result = CliRunner().invoke(app, argv)
        assert isinstance(result.exception, Called) or "relaunch" in seen, (argv, result.output, result.exception)
        return _leaves({k: v for k, v in seen.items()})

    return run


def _kind(command: str, name: str) -> type:
    """The Python type of a command's option (its annotation without Annotated and Optional)."""
    module = dict((name, mod) for mod, name in COMMANDS)[command]
    fn = getattr(importlib.import_module(module), command)
    hint = typing.get_type_hints(fn)[name]  # (Annotated stripped)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def _value(command: str, param, tmp_path: Path) -> tuple[list[str], object]:
    """The command-line words that give `param` a value other than its default, and the value as it arrives."""
    flag = max(param.opts, key=len)
    if param.is_flag:
        on = not param.default if param.default is not None else False
        words = param.opts if on else (param.secondary_opts or param.opts)
        return [words[0]], on
    kind = _kind(command, param.name)
    if kind is int:
        n = 3 if param.default != 3 else 4
        return [flag, str(n)], n
    if kind is float:
        x = 0.25 if param.default != 0.25 else 0.5
        return [flag, str(x)], x
    if kind is Path:
        return [flag, str(tmp_path / f"given{flag}")], str(tmp_path / f"given{flag}")
    if (command, flag) in OWN_TEXT or flag in TEXT:
        text, arrives = OWN_TEXT.get((command, flag)) or TEXT[flag]
        return [flag, text], arrives
    pytest.fail(f"`spofa {command} {flag}` takes text: give it a value in TEXT")


@pytest.mark.parametrize("command", sorted(TARGETS))
def test_every_flag_reaches_the_library(command: str, call, tmp_path: Path) -> None:
    params = [p for p in get_command(app).commands[command].params if p.param_type_name == "option" and p.name != "help"]
    base = call(command)
    missing = []
    for param in params:
        if set(param.opts) & AFTER_THE_CALL.get(command, set()):
            continue
        words, arrives = _value(command, param, tmp_path)
        got = call(command, *words)
        changed = {k: v for k, v in got.items() if base.get(k, "(absent)") != v}
        if not changed or (words[0] not in EFFECT_ONLY and arrives not in changed.values()):
            missing.append(f"{' '.join(words)} -> changed {changed or 'nothing'}")
    assert not missing, f"flags of `spofa {command}` that reach nothing the library receives: {missing}"


def test_nproc_is_taken_out_of_the_relaunched_command_in_both_spellings() -> None:
    from cli.cmd_train import without_option

    argv = ["distill", "--nproc", "2", "--epochs", "3", "--nproc=4", "--nproc-x", "1"]
    assert without_option(argv, "--nproc") == ["distill", "--epochs", "3", "--nproc-x", "1"]
