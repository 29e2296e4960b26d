"""The README's three-command session, typed as a user types it, chains with its defaults.

    spofa distill ...                      (tiny models, digits: the only flags are for speed)
    spofa export --format onnx             -> runs/latest/student.onnx (dynamic batch by default)
    spofa bench runs/latest/student.onnx   -> batch 1 and a large batch, student beside its teacher

The export and bench commands get no flag that changes what they do (only `--json` to read
the result, and shorter timing). The TensorRT session runs where TensorRT and a GPU exist.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

DISTILL = ["distill", "--teacher", "test_vit", "--student", "test_resnet", "--data", "digits", "--epochs", "1",
           "--teacher-epochs", "1", "--train-fraction", "0.1", "--batch-size", "32", "--workers", "0",
           "--no-pretrained"]
QUICK_TIMING = ["--warmup-s", "0.02", "--min-s", "0.1", "--min-iters", "3", "--rounds", "1", "--max-val", "64"]


def spofa(*args: str) -> None:
    """Run `spofa ARGS` in this process through the console-script entry point; fail on a non-zero exit."""
    from cli.main import main

    old = sys.argv
    sys.argv = ["spofa", *args]
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), f"spofa {' '.join(args)} exited {e.code}"
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory) -> Path:
    import os

    root = tmp_path_factory.mktemp("user")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        spofa(*DISTILL)
    finally:
        os.chdir(cwd)
    return root


def _bench_batches(path: Path) -> tuple[dict[str, list[int]], dict]:
    data = json.loads(path.read_text())
    return {r["role"]: [b["batch"] for b in r["batches"]] for r in data["results"]}, data


def test_distill_export_bench_onnx_chain_with_defaults(session_dir, monkeypatch):
    monkeypatch.chdir(session_dir)
    spofa("export", "--format", "onnx")
    assert Path("runs/latest/student.onnx").is_file()
    spofa("bench", "runs/latest/student.onnx", *QUICK_TIMING, "--json", "bench.json")
    batches, data = _bench_batches(Path("bench.json"))
    large = 256 if torch.cuda.is_available() else 64
    assert batches == {"student": [1, large], "teacher": [1, large]}
    s = next(r for r in data["results"] if r["role"] == "student")
    t = next(r for r in data["results"] if r["role"] == "teacher")
    assert (s["backend"], s["precision"]) == (t["backend"], t["precision"])  # like for like
    assert all(b["speedup_like_for_like"] and b["speedup_vs_teacher"] > 0 for b in s["batches"])
    assert s["accuracy"]["top1"] > 0 and t["accuracy"]["top1"] > 0


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT and a CUDA GPU (pip install 'tensorrt>=10' on an NVIDIA machine)")
def test_distill_export_bench_trt_chain_with_defaults(session_dir, monkeypatch):
    monkeypatch.chdir(session_dir)
    spofa("export", "--format", "trt")
    spofa("bench", "runs/latest/student.engine", *QUICK_TIMING, "--json", "bench-trt.json")
    batches, _ = _bench_batches(Path("bench-trt.json"))
    assert batches == {"student": [1, 256], "teacher": [1, 256]}


def test_distill_export_bench_pt2_chain(session_dir, monkeypatch):
    """The PyTorch deployment artifact: `spofa export --format pt2`, then bench it; the teacher is compiled the same way."""
    monkeypatch.chdir(session_dir)
    spofa("export", "--format", "pt2")
    side = json.loads(Path("runs/latest/student.pt2.json").read_text())
    assert side["format"] == "pt2" and side["parity"]["passed"] and side["device"] == "cpu"
    spofa("bench", "runs/latest/student.pt2", *QUICK_TIMING, "--json", "bench-pt2.json")
    batches, data = _bench_batches(Path("bench-pt2.json"))
    assert batches == {"student": [1, 64], "teacher": [1, 64]}
    s, t = (next(r for r in data["results"] if r["role"] == role) for role in ("student", "teacher"))
    assert s["backend"] == t["backend"] == "aoti" and Path(t["artifact"]).name == "teacher.pt2"
    assert all(b["speedup_like_for_like"] for b in s["batches"])
    assert any("compiled once, at export" in n for n in data["notes"])
