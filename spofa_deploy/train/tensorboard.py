"""TensorBoard scalars of every training run (teacher stage and distillation), where TensorBoard is installed.

Each trace row (losses, per-term gradient norms, MEMA weights, rate) and each epoch's metrics (accuracy,
loss, rate) of a run go to `<run>/tensorboard/` as `trace/<field>` and `epoch/<field>` at the run's step:

    tensorboard --logdir runs/
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from spofa_deploy.train.hooks import Hooks

_log = logging.getLogger(__name__)

FOLDER = "tensorboard"
_said_missing = False  # the note that TensorBoard is missing is said once per process


class TensorBoard:
    """A run's TensorBoard writer, fed through the training loop's `on_record` seam."""

    def __init__(self, writer) -> None:
        self.writer = writer

    @classmethod
    def open(cls, run_dir: str | Path) -> "TensorBoard | None":
        """The writer of `run_dir`, or None (said once) where the `tensorboard` package is not installed."""
        global _said_missing
        try:
            from torch.utils.tensorboard import SummaryWriter  # (needs the tensorboard package)
        except ImportError:
            if not _said_missing:
                _said_missing = True
                _log.info("note: TensorBoard is not installed, so runs write no TensorBoard scalars "
                          "(pip install 'tensorboard>=2.14'); metrics.jsonl and trace.csv have them all")
            return None
        try:
            return cls(SummaryWriter(str(Path(run_dir) / FOLDER)))
        except (OSError, UnicodeError) as e:  # TensorBoard's writer takes UTF-8 paths only; a full or read-only disk
            _log.info(f"note: no TensorBoard scalars for this run ({type(e).__name__}: {e})")
            return None

    def hooks(self) -> Hooks:
        return Hooks(on_record=self.record)

    def record(self, kind: str, step: int, record: dict) -> None:
        """Every finite number of a trace row or an epoch record, as `<kind>/<field>` at `step`."""
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        if kind == "epoch":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
