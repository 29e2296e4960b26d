"""Write the flag table of every `spofa` command into docs/commands/<command>.md, from the live CLI.

    python3 docs/gen_commands.py           # rewrite the tables (and add a page for a new command)
    python3 docs/gen_commands.py --check   # exit 1, naming the stale pages, if a table is out of date

The table sits between `<!-- flags:begin -->` and `<!-- flags:end -->` at the top of each page; the
hand-written text around it is left as it is. The table is built from the click command that Typer
makes of each subcommand (`typer.main.get_command`): every argument and option, its default and its
help text, as `spofa <command> --help` has them. `tests/test_docs.py` fails when a page differs from
what this script writes now.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "commands"
BEGIN = "<!-- flags:begin -->"
END = "<!-- flags:end -->"
NOTE = "<!-- generated from the CLI by `python3 docs/gen_commands.py`: do not edit by hand -->"


def commands() -> dict:
    """The click command of every visible `spofa` subcommand, by name."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from typer.main import get_command

    from cli.main import app

    group = get_command(app)
    return {name: cmd for name, cmd in group.commands.items() if not getattr(cmd, "hidden", False)}


def _cell(text: object) -> str:
    """One table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(param) -> str:
    if getattr(param, "required", False):
        return "required"
    value = param.default
    if callable(value):
        return "computed"
    secondary = list(getattr(param, "secondary_opts", None) or [])
    if getattr(param, "is_flag", False) and isinstance(value, bool):
        if secondary:
            return f"`{(param.opts if value else secondary)[0]}`"
        return "on" if value else "off"
    if value is None or value == ():
        return "-"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"`{getattr(value, 'value', value)}`"


def _flag(param) -> str:
    if param.param_type_name == "argument":
        return f"`{param.name.upper()}` (argument)"
    names = sorted(param.opts, key=len) + list(getattr(param, "secondary_opts", None) or [])
    return " / ".join(f"`{n}`" for n in names)


def flag_table(name: str, cmd) -> str:
    """The generated block of one command's page, markers included."""
    about = _cell((cmd.help or "").strip().split("\n\n")[0])
    lines = [BEGIN, NOTE, "", f"`spofa {name}`: {about}", "",
             "| flag | default | description |", "| --- | --- | --- |"]
    for p in cmd.params:
        if p.name == "help" or p.param_type_name not in ("argument", "option"):
            continue
        help_text = _cell(getattr(p, "help", None) or "")
        if getattr(p, "hidden", False):
            help_text = ("(hidden) " + help_text).strip()
        if getattr(p, "multiple", False):
            help_text = (help_text + " (may be repeated)").strip()
        lines.append(f"| {_flag(p)} | {_default(p)} | {help_text} |")
    if any(line.split(" | ")[1] == "-" for line in lines[7:]):
        lines += ["", "`-`: no fixed default in the CLI; the command decides (see the description and the text below)."]
    lines.append(END)
    return "\n".join(lines)


def render(page: str, block: str) -> str:
    """`page` with its generated block replaced by `block` (or `block` put under the title, if it has none)."""
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + block + tail
    title, _, body = page.partition("\n")
    return f"{title}\n\n{block}\n\n{body.lstrip()}" if title else block + "\n"


def expected_pages() -> dict[Path, str]:
    """Every page as this script would write it now."""
    out = {}
    for name, cmd in commands().items():
        path = PAGES / f"{name}.md"
        page = path.read_text(encoding="utf-8") if path.exists() else f"# spofa {name}\n"
        out[path] = render(page, flag_table(name, cmd))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if a page is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, text in expected_pages().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(("stale: " if args.check else "wrote ") + str(path.relative_to(ROOT)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
