"""The import direction docs/architecture.md draws: `cli` -> `export` -> `calibration` -> `spofa_deploy`."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only the packages listed for it (besides itself, the standard library and third parties).
ALLOWED = {"spofa_deploy": set(), "calibration": {"spofa_deploy"}, "export": {"spofa_deploy", "calibration"},
           "cli": {"spofa_deploy", "export", "calibration"}}


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in a file, function-level (lazy) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    ours = set(ALLOWED)
    bad = {f"{p.relative_to(ROOT)} imports {name}" for p in (ROOT / package).rglob("*.py")
           for name in _imported_packages(p) & ours if name != package and name not in ALLOWED[package]}
    assert not bad, sorted(bad)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from export.formats import FORMATS\n    import cli.main\n")
    assert _imported_packages(f) == {"export", "cli"}
