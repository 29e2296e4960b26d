"""DDP on CPU with gloo and 2 processes against one process over the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "ddp_worker.py")
STEPS_PER_EPOCH = 5  # 144 training images (train_fraction 0.1) / global batch 32


def _run(out: Path, nproc: int, epochs: int = 1, stop_at: int = -1, resume: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [WORKER, str(out), str(epochs), str(stop_at), "resume" if resume else "fresh"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300).returncode


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert _run(out, 1, epochs=2) == 0
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    assert _run(out, 2, epochs=2) == 0
    return out


def test_ddp_weights_match_single_process(single, ddp):
    one = torch.load(single / "rank0.pt")["net"]
    for r in (0, 1):
        two = torch.load(ddp / f"rank{r}.pt")["net"]
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs on rank {r}")


def test_mema_baselines_identical_on_every_rank(single, ddp):
    b0 = torch.load(ddp / "rank0.pt")["baselines"]
    b1 = torch.load(ddp / "rank1.pt")["baselines"]
    assert len(b0) == len(b1) == 2 * STEPS_PER_EPOCH
    for step, (x, y) in enumerate(zip(b0, b1)):
        assert torch.equal(x, y), f"baselines differ between ranks after step {step}"
    # And they are the single-process baselines (the all-reduced batch statistics).
    ref = torch.load(single / "rank0.pt")["baselines"]
    for x, y in zip(b0, ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert not torch.equal(b0[0], b0[-1])  # they moved


def test_only_rank0_writes(ddp):
    w0 = torch.load(ddp / "rank0.pt")["writes"]
    w1 = torch.load(ddp / "rank1.pt")["writes"]
    assert any(p.endswith("checkpoint-last.pt") for p in w0) and any(p.endswith("metrics.jsonl") for p in w0)
    assert w1 == []
    lines = (ddp / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per epoch, not one per rank


def test_resume_two_rank_checkpoint_on_one_rank(single, tmp_path):
    # Crash both ranks at the first step of epoch 2, then finish on a single process.
    assert _run(tmp_path, 2, epochs=2, stop_at=STEPS_PER_EPOCH) != 0
    assert (tmp_path / "run" / "checkpoint-last.pt").is_file()
    assert _run(tmp_path, 1, epochs=2, resume=True) == 0
    resumed = torch.load(tmp_path / "rank0-resumed.pt")["net"]
    ref = torch.load(single / "rank0.pt")["net"]
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
