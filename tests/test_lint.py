"""The code passes the project's lint rules (`[tool.ruff]` in pyproject.toml: errors, not style)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (it comes with the [dev] extra)")
def test_ruff_finds_nothing() -> None:
    out = subprocess.run(["ruff", "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
