"""Shared fixtures: one tiny trained run (teacher + student) reused by many tests."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Offline by design: never let a test wait on the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: on small shared machines two OpenMP threads spin-wait and run up to 10x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real (tiny) `spofa distill` run on digits: test_vit teacher -> test_resnet student, 32 px.

    Returns the run folder with teacher.safetensors/json, student.safetensors/json,
    checkpoint-last.pt, metrics.jsonl and trace.csv.
    """
    from spofa_deploy.pipeline import DataOptions, TeacherOptions, distill
    from spofa_deploy.train.loop import TrainConfig

    root = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(root)  # the teacher cache goes to ./runs/teachers
    try:
        teacher = TeacherOptions(name="test_vit", pretrained=False,
                                 train=TrainConfig(epochs=3, lr=2e-3, batch_size=64, optimizer="adamw", workers=0, log_every=5))
        r = distill(student="test_resnet", teacher=teacher, data=DataOptions("digits"), method="spofa",
                    train=TrainConfig(epochs=3, lr=3e-3, batch_size=64, optimizer="adamw", workers=0, log_every=5),
                    out=root / "runs" / "tiny")
    finally:
        os.chdir(cwd)
    return r.run_dir


@dataclass
class Run:
    """What `spofa ARGS` did in this process: its exit code and output."""

    code: int
    out: str
    err: str

    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    def error(self) -> str:
        """The last stderr line (where the error policy puts its one line)."""
        lines = self.err_lines()
        return lines[-1] if lines else ""


@pytest.fixture
def spofa(capsys, monkeypatch):
    """Run `spofa ARGS` in this process, through `cli.main.main` and its error policy; returns a `Run`."""
    from cli.main import main

    def run(*args) -> Run:
        monkeypatch.setattr(sys, "argv", ["spofa", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run
