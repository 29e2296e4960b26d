"""The `spofa` command line: the app, the registration of the commands (one module per group:
`cmd_train` teacher + distill, `cmd_export`, `cmd_bench`, `cmd_compare`, `cmd_doctor`) and the error policy.

Error policy (`main`), for every exception: one line on stderr. A problem the user can fix
(`UserError`, a bad flag or value, an OS error such as a full disk or a read-only folder) prints
`error: ...` and exits 2; anything else prints
`internal error: ...` with the `--debug` hint and exits 1; `spofa --debug ...` adds the
traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SPOFA distillation of a ViT teacher into a CNN student, export to ONNX / TensorRT, benchmarks.")
_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug
    show_library_logs()


LIBRARIES = ("spofa_deploy", "export", "calibration")  # the packages that speak through `logging`


def show_library_logs(level: int = logging.INFO) -> None:
    """The library's one output channel is `logging`; the command line shows its records on stderr, one plain
    line each, warnings as `warning: <msg>` (one handler, however often this is called)."""
    from spofa_deploy.console import show_logs

    show_logs(LIBRARIES, level)


# One module per command group; each command parses options, calls one library function, prints.
COMMANDS = (("cli.cmd_train", "teacher"), ("cli.cmd_train", "distill"), ("cli.cmd_export", "export"),
            ("cli.cmd_bench", "bench"), ("cli.cmd_compare", "compare"), ("cli.cmd_doctor", "doctor"), ("cli.cmd_qat", "qat"))


def _register() -> None:
    for mod, name in COMMANDS:
        app.command(name)(getattr(importlib.import_module(mod), name))


_register()


def main() -> None:
    """Console-script entry point: run the command, then apply the error policy to whatever it raised."""
    _state["debug"] = False  # set by the root callback (main may run more than once in a process: tests)
    try:
        rv = app(standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            _abandon()
        raise
    except BaseException as e:  # noqa: BLE001 - every exception gets the policy, Ctrl-C included
        _abandon()
        sys.exit(_exit_code(e))
    # Without standalone mode click returns the code of an `Exit` (--help: 0); typer >= 0.20 also
    # turns Ctrl-C into Exit(130) here. A command itself returns None.
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv:
            _abandon()
        if rv == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(rv)


def _abandon() -> None:
    """A failed command leaves no empty run folder it made and no `runs/latest` pointing at a run with nothing
    to resume; its folder locks are released (the kernel would release them at exit anyway)."""
    if "spofa_deploy.run_dirs" in sys.modules:  # (a command that failed before it wrote anything)
        sys.modules["spofa_deploy.run_dirs"].abandon_runs()


def _is_click(e: BaseException, name: str) -> bool:
    """`e` is click's (or typer's vendored click's) exception class `name`, or a subclass of it.

    By name, not by import: typer >= 0.20 vendors click as `typer._click` with exception classes
    of its own (and `Exit`/`Abort` in `typer.exceptions`), older typer uses click's.
    """
    return any(c.__name__ == name and c.__module__.split(".")[0] in ("click", "typer") for c in type(e).__mro__)


def _one_line(text: str, limit: int | None = None) -> str:
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def _exit_code(e: BaseException) -> int:
    """Print what `e` means on stderr (one line; the traceback too with --debug) and return the exit code.

    2: a problem the user can fix (UserError, a bad flag or value); 1: anything else (a bug);
    130: interrupted (Ctrl-C).
    """
    import traceback

    from spofa_deploy.errors import UserError

    debug = _state["debug"] or "--debug" in sys.argv[1:]
    if isinstance(e, KeyboardInterrupt) or _is_click(e, "Abort"):
        print("interrupted", file=sys.stderr)
        return 130
    if _is_click(e, "Exit"):
        return int(getattr(e, "exit_code", 0) or 0)
    if _is_click(e, "NoArgsIsHelpError"):  # plain `spofa`: the help, as click shows it
        e.show()
        return int(getattr(e, "exit_code", 2))
    if _is_click(e, "ClickException"):  # bad flag or value: click's message, on one line
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and _is_click(e, "UsageError") else ""
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return 2
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__)
    if isinstance(e, OSError):  # a full disk, a read-only folder, a folder named as a file: the user's to fix
        from spofa_deploy.errors import os_error

        e = os_error(e) or e
    if isinstance(e, UserError):
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    what = _one_line(e, 300)
    hint = "report it with the traceback above" if debug else "rerun as `spofa --debug ...` for the traceback and report it"
    print(f"internal error: {type(e).__name__}{': ' + what if what else ''} (a bug: {hint})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
