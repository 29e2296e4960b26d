"""The names of the files in a run folder (docs/CONTRACTS.md), and the files of a training run:
`checkpoint-last.pt`, `metrics.jsonl`, `trace.csv`.

Checkpoints are plain dicts of tensors and numbers, written atomically and loaded with
`weights_only=True`; metrics are rewritten whole (atomically) after every epoch; the trace
gets one appended row per logged step.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from spofa_deploy.artifacts import atomic_path
from spofa_deploy.errors import UserError, load_error_line

# A training run (`spofa teacher`, `spofa distill`).
CHECKPOINT = "checkpoint-last.pt"
METRICS = "metrics.jsonl"
TRACE = "trace.csv"
TRACE_PLOT = "trace.png"
STUDENT_FILE = "student.safetensors"  # (+ student.json, its metadata; safetensors files carry a JSON sidecar)
TEACHER_FILE = "teacher.safetensors"
# A compare folder (`spofa compare`): its settings and progress, and one record per finished run in the run's folder.
COMPARE = "compare.json"
DONE = "done.json"
RUN_LOG = "log.txt"  # a run's console output when the compare trains several at once (--jobs)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write a checkpoint atomically: a reader sees the previous file or this one, never a part."""
    # Through a Python file object: torch's own writer reports a full disk as an obscure RuntimeError,
    # a Python write as OSError (ENOSPC), which `atomic_path` turns into a one-line user error.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path) -> dict:
    """Load a training checkpoint safely (`weights_only=True`: tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"no checkpoint to resume from: {path}") from e
    except Exception as e:  # truncated zip, a PNG, a pickle with code in it: never execute, just refuse
        raise UserError(f"{path} is not a readable spofa checkpoint ({load_error_line(e)})") from e


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """`metrics.jsonl`: one JSON object per history record (epochs and events), rewritten atomically."""
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))


class TraceWriter:
    """Appends rows to trace.csv; on resume keeps only rows up to the checkpoint's step."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path, self.fields = path, None
        if keep_until_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            kept = [r for r in rows if int(r["step"]) <= keep_until_step]
            if kept:
                self.fields = list(kept[0])
                self._rewrite(kept)
            else:
                path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        new = self.fields is None
        self.fields = self.fields or list(row)
        extra = [k for k in row if k not in self.fields]
        if extra:  # a column that starts later (gradient norms every N logged steps): widen the file once
            rows = list(csv.DictReader(io.StringIO(self.path.read_text()))) if self.path.exists() else []
            self.fields += extra
            self._rewrite(rows)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
