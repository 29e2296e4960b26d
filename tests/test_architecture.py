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


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` a file imports when it is imported: module-level imports, `if TYPE_CHECKING:`
    blocks included (a type hint is a dependency too); imports inside functions are left out (lazy on purpose)."""
    out = set()

    def visit(nodes) -> None:
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                out.update(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in modules else n.module for a in n.names)
            elif isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            for block in ("body", "orelse", "handlers", "finalbody"):
                visit(getattr(n, block, []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return out & modules


def test_no_module_of_the_library_imports_itself_back() -> None:
    """No import cycle between the modules of `spofa_deploy` (each reads top to bottom without the others)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "spofa_deploy").rglob("*.py")}
    graph = {m: _module_imports(p, set(files)) - {m} for m, p in files.items()}
    cycles = []
    for start in graph:  # depth-first from each module: a path back to it is a cycle
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in path and nxt > start:  # (each cycle once: from its smallest module)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles
