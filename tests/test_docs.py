"""The documentation matches the live CLI, and its links lead somewhere.

- every `spofa` command has a page docs/commands/<command>.md, and every page a command;
- each page's flag table (between `<!-- flags:begin -->` and `<!-- flags:end -->`) is what
  `python3 docs/gen_commands.py` writes from the CLI now (a flag added, renamed, or given another
  default or help text fails here until the pages are regenerated);
- every relative link and image in README.md and docs/ points to an existing file (and heading);
- the README keeps the set-up and test commands that `.ci/run` runs, and stays short;
- the user documentation names no issue numbers.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def _generator():
    spec = importlib.util.spec_from_file_location("gen_commands", DOCS / "gen_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()
COMMANDS = sorted(GEN.commands())


def _block(text: str) -> str | None:
    if GEN.BEGIN not in text or GEN.END not in text:
        return None
    return GEN.BEGIN + text.split(GEN.BEGIN, 1)[1].split(GEN.END, 1)[0] + GEN.END


def test_the_cli_has_the_commands_we_expect() -> None:
    assert {"teacher", "distill", "export", "bench", "compare", "doctor"} <= set(COMMANDS)


def test_every_command_has_a_page_and_every_page_a_command() -> None:
    pages = {p.stem for p in GEN.PAGES.glob("*.md")}
    missing = sorted(set(COMMANDS) - pages)
    orphans = sorted(pages - set(COMMANDS))
    assert not missing, f"no page for {missing}: run `python3 docs/gen_commands.py`, then describe them"
    assert not orphans, f"pages for commands the CLI does not have: {orphans}"


@pytest.mark.parametrize("name", COMMANDS)
def test_flag_table_is_current(name: str) -> None:
    path = GEN.PAGES / f"{name}.md"
    if not path.exists():
        pytest.fail(f"no {path.relative_to(ROOT)}: run `python3 docs/gen_commands.py`")
    text = path.read_text(encoding="utf-8")
    current = _block(text)
    assert current is not None, f"{path.relative_to(ROOT)} has no {GEN.BEGIN} ... {GEN.END} block"
    wanted = GEN.flag_table(name, GEN.commands()[name])
    assert current == wanted, (f"the flag table of {path.relative_to(ROOT)} differs from the CLI: "
                               "run `python3 docs/gen_commands.py`")
    assert text.lstrip().startswith(f"# spofa {name}\n"), "a page starts with its title"
    head = text.split(GEN.BEGIN, 1)[0].strip()
    assert head == f"# spofa {name}", "the flag table comes first, right under the title"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_is_in_its_table(name: str) -> None:
    """The table names every option of the command (a check on the generator itself)."""
    block = GEN.flag_table(name, GEN.commands()[name])
    for p in GEN.commands()[name].params:
        if p.param_type_name == "option" and p.name != "help":
            for opt in list(p.opts) + list(p.secondary_opts or []):
                assert f"`{opt}`" in block, f"{opt} missing from the table of spofa {name}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_has_its_help(name: str) -> None:
    """Each option reaches Typer with its own `typer.Option` (shared option groups included): it has a help text."""
    bare = [p.opts[0] for p in GEN.commands()[name].params
            if p.param_type_name == "option" and p.name != "help" and not (p.help or "").strip()]
    assert not bare, f"spofa {name}: options without help text: {bare}"


def test_generator_leaves_the_prose_alone() -> None:
    page = "# spofa x\n\nbefore\n" + GEN.BEGIN + "\nold\n" + GEN.END + "\n\nprose `--flag` | kept\n"
    out = GEN.render(page, GEN.BEGIN + "\nnew\n" + GEN.END)
    assert out == "# spofa x\n\nbefore\n" + GEN.BEGIN + "\nnew\n" + GEN.END + "\n\nprose `--flag` | kept\n"


# ---------------------------------------------------------------- links

def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), *sorted(GEN.PAGES.glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces -> '-'."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"#{1,6} (.+)", line)
        if m and not in_code:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # fenced code
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))  # indented code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    bad = []
    for link in _links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            bad.append(f"{link}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{link}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


def test_readme_links_every_command_page_and_doc() -> None:
    links = set(_links(README))
    wanted = {f"docs/commands/{n}.md" for n in COMMANDS} | {
        f"docs/{n}.md" for n in ("results", "method", "architecture", "faults", "status", "CONTRACTS")}
    assert not wanted - links, f"README.md does not link {sorted(wanted - links)}"


# ---------------------------------------------------------------- the README itself

def test_readme_has_the_commands_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("python3 -m pip install -e '.[dev]'", "python3 -m pytest -q"):
        assert command in ci, f".ci/run no longer runs {command}: update this test and the README together"
        assert f"    {command}\n" in text, f"README.md must show `{command}` on a line of its own"


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines (at most {README_MAX_LINES}): "
                                   "move reference text to docs/commands/ and measurements to docs/results.md")


def test_readme_session_has_its_machine_date_and_commit() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## The three commands, as typed", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\bon \d{4}-\d{2}-\d{2} at commit [0-9a-f]{7,}\b", section), "the session says when and where"
    for command in ("$ spofa distill", "$ spofa export", "$ spofa bench"):
        assert command in section, f"the logged session lacks `{command}`"


@pytest.mark.parametrize("path", [p for p in _doc_files() if p.name != "CONTRACTS.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_in_user_docs(path: Path) -> None:
    hits = re.findall(r"(?i)\bissues?[ #-]?\d+", path.read_text(encoding="utf-8"))
    assert not hits, f"{path.relative_to(ROOT)} names issue numbers {hits}: keep the facts, drop the history"
