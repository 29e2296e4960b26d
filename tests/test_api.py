"""The Python API example of docs/api.md, run as written with tiny models (only its first line is replaced)."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_session_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    first, rest = code.split("\n", 1)
    assert first.startswith("STUDENT, TEACHER, EPOCHS, TEACHER_EPOCHS = ")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile('STUDENT, TEACHER, EPOCHS, TEACHER_EPOCHS = "test_resnet", "test_vit", 1, 1\n' + rest,
                 str(DOC), "exec"), scope)
    run, onnx, report, model = scope["run"], scope["onnx"], scope["report"], scope["model"]
    assert run.student_path.is_file() and 0.0 <= run.student["top1"] <= 100.0
    assert onnx.path.suffix == ".onnx" and onnx.parity is not None and onnx.path.is_file()
    roles = {r.role for r in report.results if r.status == "ok"}
    assert roles == {"student", "teacher"}
    student = next(r for r in report.results if r.role == "student")
    assert student.batch(1).speedup_vs_teacher is not None
    # The ONNX student on the validation split, through ONNX Runtime: what training recorded, within one image.
    assert abs(student.accuracy.top1 - run.student["top1"]) <= 100.0 / student.accuracy.n + 1e-9
    assert type(model).__name__ == "ResNet"
    out = capsys.readouterr().out
    assert "student " in out and "speed-up" in out
