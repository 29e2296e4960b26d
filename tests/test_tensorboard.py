"""TensorBoard scalars of a run, where TensorBoard is installed; said once where it is not."""
from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import pytest

from spofa_deploy.train import tensorboard
def _scalars(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_a_distillation_writes_its_trace_and_epochs_as_scalars(tiny_run: Path) -> None:
    pytest.importorskip("tensorboard")
    scalars = _scalars(tiny_run / tensorboard.FOLDER)
    with open(tiny_run / "trace.csv") as f:
        rows = list(csv.DictReader(f))
    numeric = {k for r in rows for k, v in r.items() if k not in ("step", "epoch") and v not in ("", None)}
    assert any(k.startswith("alpha") for k in numeric) and any(k.startswith("gnorm") for k in numeric)
    assert {f"trace/{k}" for k in numeric} <= set(scalars)  # losses, gradient norms, MEMA weights, rate
    assert [s.step for s in scalars["trace/loss"]] == [int(r["step"]) for r in rows]
    epochs = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "val_top1" in e]
    # (TensorBoard keeps float32)
    assert [s.value for s in scalars["epoch/val_top1"]] == pytest.approx([e["val_top1"] for e in epochs], rel=1e-6)
    assert {"epoch/ema_top1", "epoch/lr", "epoch/train_loss"} <= set(scalars)


def test_without_tensorboard_a_run_says_so_once_and_writes_none(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    monkeypatch.setattr(tensorboard, "_said_missing", False)
    with caplog.at_level(logging.INFO, logger="spofa_deploy"):  # (the library's one output channel)
        assert tensorboard.TensorBoard.open(tmp_path / "a") is None
        assert tensorboard.TensorBoard.open(tmp_path / "b") is None
    assert caplog.text.count("TensorBoard is not installed") == 1
    assert not (tmp_path / "a" / tensorboard.FOLDER).exists()


def test_a_run_folder_tensorboard_cannot_write_costs_only_its_scalars(tmp_path: Path, caplog) -> None:
    import os

    pytest.importorskip("tensorboard")
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/run-\xff"))  # not UTF-8: TensorBoard's writer refuses the path
    with caplog.at_level(logging.INFO, logger="spofa_deploy"):
        assert tensorboard.TensorBoard.open(odd) is None
    assert "no TensorBoard scalars for this run" in caplog.text
