"""Shared fixtures: one tiny trained run (teacher + student) reused by many tests."""
from __future__ import annotations

import os
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
    from spofa_deploy.train import TrainConfig

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
