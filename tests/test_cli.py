"""The `spofa` command line as real subprocesses: help, one end-to-end distill, and bad input.

Bad input must give exit code 2 and exactly one stderr line `error: ...` (no traceback), start no
training, create no file, and leave an existing run folder byte-for-byte as it was.

The subprocesses run concurrently (the end-to-end run in the background while the bad-input
commands run) with one intra-op thread each, to keep the wall time low on a shared 2-core box.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
# Printed right before a training loop starts (the teacher stage, then distillation).
TRAINING_STARTS = ("teacher stage", "distill:")
BASE = ["--teacher", "test_vit", "--student", "test_resnet", "--epochs", "1", "--teacher-epochs", "1",
        "--batch-size", "32", "--workers", "0"]


@dataclass
class Result:
    rc: int
    out: str
    err: str
    started_training: str | None
    timed_out: bool

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Cli:
    """`python -m cli.main ARGS` in `cwd`, started now; `.result()` waits for it.

    With `stop_if_training`, the process is killed as soon as stderr says a training loop starts
    (a bad input must be refused before that, and the test must not wait for a real training run).
    """

    def __init__(self, args: list[str], cwd: Path, stop_if_training: bool = False, timeout: float = 300):
        self.args, self.timeout, self.stop = [str(a) for a in args], timeout, stop_if_training
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", *self.args], cwd=cwd, env=ENV, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.out: list[str] = []
        self.err: list[str] = []
        self.started: str | None = None
        self.threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out, False), daemon=True),
                        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err, True), daemon=True)]
        for t in self.threads:
            t.start()
        self._result: Result | None = None

    def _pump(self, stream, buf: list[str], watch: bool) -> None:
        for line in stream:
            buf.append(line)
            if watch and self.started is None:
                text = " ".join("".join(buf).split())  # rich wraps long lines
                hit = next((m for m in TRAINING_STARTS if m in text), None)
                if hit:
                    self.started = hit
                    if self.stop:
                        self.proc.kill()

    def result(self) -> Result:
        if self._result is None:
            timed_out = False
            try:
                rc = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc, timed_out = self.proc.wait(), True
            for t in self.threads:
                t.join(30)
            self._result = Result(rc, "".join(self.out), "".join(self.err), self.started, timed_out)
        return self._result


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _teacher(folder: Path, classes: list[str]) -> Path:
    """An untrained test_vit teacher artifact (32 px) as `spofa teacher` writes it."""
    from spofa_deploy.artifacts import save_model
    from spofa_deploy.models import count_params, create_model, data_config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t = create_model("test_vit", len(classes), 32)
    path = folder / "teacher.safetensors"
    save_model(path, t, {"role": "teacher", "model": "test_vit", "num_classes": len(classes), "classes": classes,
                         "img_size": 32, **data_config(t), "data": "digits", "top1": 10.0, "top5": 50.0,
                         "saved": "model", "params": count_params(t)})
    return path


def _tree_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


# ---------------------------------------------------------------- fixtures: all commands start early, in parallel


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def one_class(work: Path) -> Path:
    """An image folder with a single class."""
    for i in range(4):
        _png(work / "one" / "train" / "only" / f"{i}.png", i)
    return work / "one"


@pytest.fixture(scope="module")
def e2e(work: Path) -> tuple[Cli, Path, Path]:
    """The end-to-end run, started in the background as soon as the module needs it."""
    cwd = work / "e2e"
    cwd.mkdir()
    out = cwd / "runs" / "x"
    return Cli(["distill", *BASE[:-4], "--batch-size", "64", "--workers", "0", "--out", out], cwd, timeout=500), cwd, out


@pytest.fixture(scope="module", autouse=True)
def _start_e2e_first(e2e):
    yield


def _bad_cases(work: Path, one_class: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra args, a word the error line must contain)."""
    t10 = _teacher(work / "t10", [str(i) for i in range(10)])
    t3 = _teacher(work / "t3", ["cat", "dog", "fox"])
    png = work / "png" / "teacher.png"  # a picture passed as the teacher (with a valid sidecar beside it)
    _png(png, 7)
    png.with_name("teacher.png.json").write_text(t10.with_suffix(".json").read_text())
    trunc = work / "trunc" / "teacher.safetensors"
    trunc.parent.mkdir()
    data = t10.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    trunc.with_suffix(".json").write_text(t10.with_suffix(".json").read_text())
    return {
        "unknown-student": (["--student", "resnet19"], "resnet18"),
        "unknown-teacher": (["--teacher", "vit_bb"], "vit_b"),
        "unknown-method": (["--method", "spofa2"], "spofa2"),
        "epochs-0": (["--epochs", "0"], "--epochs"),
        "lr-negative": (["--lr", "-1"], "--lr"),
        "batch-size-0": (["--batch-size", "0"], "--batch-size"),
        "device-cuda-without-gpu": (["--device", "cuda"], "cuda"),
        "data-missing-folder": (["--data", "imagefolder:/nonexistent/spofa-data"], "/nonexistent/spofa-data"),
        "data-one-class": (["--data", f"imagefolder:{one_class}"], "class"),
        "teacher-ckpt-png": (["--teacher-ckpt", png], "teacher.png"),
        "teacher-ckpt-truncated": (["--teacher-ckpt", trunc], "teacher.safetensors"),
        "teacher-classes-differ": (["--teacher-ckpt", t3.parent / "teacher.safetensors"], "classes"),
        "resume-without-run": (["--resume"], "run"),
    }


@pytest.fixture(scope="module")
def bad(work: Path, one_class: Path) -> dict[str, tuple[Result, Path, str]]:
    cases = _bad_cases(work, one_class)
    started = {}
    for name, (extra, word) in cases.items():
        if name == "device-cuda-without-gpu" and torch.cuda.is_available():
            continue
        cwd = work / "bad" / name
        cwd.mkdir(parents=True)
        started[name] = (Cli(["distill", *BASE, *extra], cwd, stop_if_training=True, timeout=300), cwd, word)
    return {name: (c.result(), cwd, word) for name, (c, cwd, word) in started.items()}


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command, options", [
    ("teacher", ["--teacher", "--data", "--epochs", "--img-size", "--teacher-weights", "--resume", "--device",
                 "--threads"]),
    ("distill", ["--teacher", "--student", "--data", "--method", "--epochs", "--batch-size", "--lr", "--device",
                 "--amp", "--out", "--resume", "--seed", "--teacher-ckpt", "--threads"]),
    ("compare", ["--methods", "--seeds", "--epochs", "--out", "--resume", "--threads"]),
])
def test_help(command: str, options: list[str], work: Path) -> None:
    r = Cli([command, "--help"], work, timeout=120).result()
    assert r.rc == 0, r.err
    for opt in options:
        assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", r.out), f"{command} --help lacks {opt}"
    assert "Traceback" not in r.err


# ---------------------------------------------------------------- bad input

XFAIL: dict[str, str] = {}  # every bad input below is refused before any work
BAD_NAMES = ["unknown-student", "unknown-teacher", "unknown-method", "epochs-0", "lr-negative", "batch-size-0",
             "device-cuda-without-gpu", "data-missing-folder", "data-one-class", "teacher-ckpt-png",
             "teacher-ckpt-truncated", "teacher-classes-differ", "resume-without-run"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
                                  if n in XFAIL else n for n in BAD_NAMES])
def test_bad_input(name: str, bad) -> None:
    if name == "device-cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    r, cwd, word = bad[name]
    assert not r.timed_out
    assert r.started_training is None, f"training started ({r.started_training!r}) instead of refusing:\n{r.err}"
    assert r.rc == 2, f"exit code {r.rc}\n{r.err}"
    assert "Traceback" not in r.err and "internal error" not in r.err
    lines = r.err_lines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr should be one error line:\n{r.err}"
    assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not _files_under(cwd), f"a refused command wrote files: {_files_under(cwd)}"


# ---------------------------------------------------------------- end to end


def test_distill_end_to_end(e2e) -> None:
    cli, cwd, out = e2e
    r = cli.result()
    assert not r.timed_out and r.rc == 0, f"exit {r.rc}\n{r.err[-3000:]}"
    for name in ("teacher.safetensors", "teacher.json", "student.safetensors", "student.json", "checkpoint-last.pt",
                 "metrics.jsonl", "trace.csv", "trace.png"):
        assert (out / name).is_file(), name
    assert (cwd / "runs" / "latest").resolve() == out.resolve()
    from spofa_deploy.artifacts import read_model_meta
    from spofa_deploy.run_dirs import latest_run

    assert latest_run(cwd / "runs") == out.resolve()
    # The teacher stage ran first (no teacher for this data yet) and is cached for later runs.
    assert (cwd / "runs" / "teachers" / "test_vit-digits-32px" / "teacher.safetensors").is_file()
    assert "teacher stage" in " ".join(r.err.split())
    meta = read_model_meta(out / "student.safetensors")
    assert (meta["model"], meta["teacher"], meta["method"], meta["num_classes"]) == ("test_resnet", "test_vit", "spofa", 10)
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if "event" not in e] == [1]
    # The summary on stdout: teacher and student rows with the student's top-1.
    assert f"{meta['top1']:.2f}%" in r.out, r.out
    assert "student" in r.out and "teacher" in r.out and "test_resnet" in r.out
    assert "Traceback" not in r.err and "error:" not in r.err


# ---------------------------------------------------------------- a failed command leaves an existing run untouched


def _refused_on_run(e2e, extra: list[str]) -> None:
    cli, cwd, out = e2e
    assert cli.result().rc == 0
    before = _tree_files(out)
    latest = os.readlink(cwd / "runs" / "latest")
    r = Cli(["distill", *BASE, "--out", out, *extra], cwd, timeout=200).result()
    assert r.rc == 2 and "Traceback" not in r.err, r.err
    assert r.err_lines()[-1].startswith("error: ")
    after = _tree_files(out)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed by a failed command: {changed}"
    assert os.readlink(cwd / "runs" / "latest") == latest


def test_refused_rerun_leaves_the_run_untouched(e2e) -> None:
    _refused_on_run(e2e, [])  # the folder holds a run and --resume is not given


def test_refused_resume_with_bad_data_leaves_the_run_untouched(e2e, one_class: Path) -> None:
    _refused_on_run(e2e, ["--resume", "--data", f"imagefolder:{one_class}"])


def test_refused_resume_with_bad_settings_leaves_the_run_untouched(e2e) -> None:
    _refused_on_run(e2e, ["--resume", "--batch-size", "0"])


# ---------------------------------------------------------------- options, in-process (the library call replaced)


def _spofa(monkeypatch, capsys, *args: str, target: str | None = None) -> tuple[int, list, str]:
    """`spofa ARGS` in this process with `target` ("module:function") recording its call instead of running."""
    import importlib

    from cli.main import main

    seen = []
    if target:
        module, name = target.split(":")

        def record(*a, **k):
            seen.append(k)
            raise SystemExit(0)  # stop before any printing of results

        monkeypatch.setattr(importlib.import_module(module), name, record)
    monkeypatch.setattr("spofa_deploy.machine.oversubscribed", lambda: None)  # no load warning on stderr
    monkeypatch.setattr(sys, "argv", ["spofa", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, seen, capsys.readouterr().err


def test_one_parser_for_choices_and_comma_lists() -> None:
    from cli import options as o
    from spofa_deploy.errors import UserError

    assert o.choice(" KD ", "--method", ("spofa", "ofa", "kd", "none")) == "kd"
    with pytest.raises(UserError) as e:
        o.choice("kd2", "--method", ("spofa", "ofa", "kd", "none"))
    assert str(e.value) == "unknown method 'kd2' for --method: choose from spofa, ofa, kd, none (did you mean 'kd'?)"
    with pytest.raises(UserError) as e:
        o.choice("maybe", "--on-nan", ("stop", "skip"), noun="on-NaN policy")
    assert str(e.value) == "unknown on-NaN policy 'maybe' for --on-nan: choose from stop, skip"  # nothing close
    assert o.comma_list("1, 8,64", "--batch", of=int, positive=True) == [1, 8, 64]
    assert o.comma_list("none,KD", "--methods", choices=("none", "kd"), noun="method") == ["none", "kd"]
    for value, kw, msg in [(" , ", {}, "--x is empty"),
                           ("1,x", {"of": int}, "--x must be comma-separated integers, got '1,x'"),
                           ("0.1,y", {"of": float}, "--x must be comma-separated numbers, got '0.1,y'"),
                           ("1,0", {"of": int, "positive": True}, "--x needs positive values, got '1,0'"),
                           ("1,nan", {"of": float, "positive": True}, "--x needs positive values, got '1,nan'"),
                           ("a,c", {"choices": ("a", "b")}, "unknown x 'c' for --x: choose from a, b")]:
        with pytest.raises(UserError) as e:
            o.comma_list(value, "--x", **kw)
        assert str(e.value) == msg


def test_distill_option_groups_reach_the_library(monkeypatch, capsys, tmp_path: Path) -> None:
    """Each option lands in its group (DataOptions, TeacherCacheOptions, TrainConfig x2, DistillConfig)."""
    from spofa_deploy.pipeline import DataOptions, TeacherCacheOptions

    code, seen, err = _spofa(monkeypatch, capsys, "distill", "--data", "digits", "--img-size", "24",
                             "--train-fraction", "0.5", "--skip-corrupt", "--teacher-cache", str(tmp_path),
                             "--teacher-cache-max-gb", "2", "--teacher-cache-format", "FP32", "--method", "KD",
                             "--opt", "adamw", "--epochs", "3", "--teacher-epochs", "2", "--teacher-batch-size", "8",
                             "--seed", "4", "--stage-eps", "1,2,3,4", "--kd-temperature", "2",
                             target="spofa_deploy.pipeline:distill")
    assert code == 0, err
    (k,) = seen
    assert k["data"] == DataOptions("digits", 24, train_fraction=0.5, skip_corrupt=True)
    assert k["cache"] == TeacherCacheOptions(tmp_path, max_gb=2.0, format="fp32")
    assert k["method"] == k["loss"].method == "kd" and k["loss"].kd_temperature == 2.0
    assert k["loss"].stage_eps == (1.0, 2.0, 3.0, 4.0)
    assert (k["train"].optimizer, k["train"].epochs, k["train"].seed) == ("adamw", 3, 4)
    t = k["teacher"].train  # the teacher recipe, with the shared options
    assert (t.optimizer, t.epochs, t.batch_size, t.seed) == ("adamw", 2, 8, 4)
    code, seen, err = _spofa(monkeypatch, capsys, "distill", "--teacher-cache-format", "fp16",
                             target="spofa_deploy.pipeline:distill")
    assert code == 0 and seen[0]["cache"] is None and seen[0]["data"] == DataOptions(), err  # no folder, no cache
    code, seen, err = _spofa(monkeypatch, capsys, "teacher", "--data", "digits", "--img-size", "16", "--skip-corrupt",
                             "--epochs", "2", target="spofa_deploy.teacher.stage:train_teacher")
    assert code == 0, err
    assert seen[0]["data"] == DataOptions("digits", 16, skip_corrupt=True) and seen[0]["teacher"].train.epochs == 2


@pytest.mark.parametrize("args, role", [([], "student"), (["--role", "teacher"], "teacher"),
                                        (["--role", "Student"], "student")])
def test_export_role(args, role, monkeypatch, capsys) -> None:
    code, seen, err = _spofa(monkeypatch, capsys, "export", "--format", "onnx", *args,
                             target="export.exporter:export_model")
    assert code == 0 and seen[0]["teacher"] is (role == "teacher") and not err.strip(), err


def test_export_teacher_flag_is_a_deprecated_alias(monkeypatch, capsys) -> None:
    """`spofa export --teacher` still exports the teacher for one release, with a one-line note on stderr."""
    for extra in ([], ["--role", "teacher"]):
        code, seen, err = _spofa(monkeypatch, capsys, "export", "--format", "onnx", "--teacher", *extra,
                                 target="export.exporter:export_model")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 0 and seen[0]["teacher"] is True, err
        assert len(lines) == 1 and "deprecated" in lines[0] and "--role teacher" in lines[0], err
    code, seen, err = _spofa(monkeypatch, capsys, "export", "--format", "onnx", "--teacher", "--role", "student",
                             target="export.exporter:export_model")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and not seen and lines[-1].startswith("error: ") and "--role student" in lines[-1], err


def test_export_help_shows_role_not_teacher(work: Path) -> None:
    r = Cli(["export", "--help"], work, timeout=120).result()
    assert r.rc == 0, r.err
    assert re.search(r"(?<![\w-])--role(?![\w-])", r.out)
    assert not re.search(r"(?<![\w-])--teacher(?![\w-])", r.out), "the deprecated --teacher is hidden"
