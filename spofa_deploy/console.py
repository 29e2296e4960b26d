"""One rich console (stderr, so stdout carries only results): progress bars, and the log records shown on it.

The library speaks through `logging` only; `show_logs` shows a logger's records on this console, one
plain line each (warnings marked `warning: `). The command line shows the packages' records this way,
and a worker process of `parallel` does the same into its call's log file.
"""
from __future__ import annotations

import logging
from typing import Iterable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar with counts, elapsed / remaining time and a free `info` field."""
    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=transient, disable=disable)


class ConsoleHandler(logging.Handler):
    """Log records as one line each on the console: warnings marked, nothing else added (no markup read).

    It sits on the root logger and shows the records of the loggers in `names` (and their children) at
    their own levels, and other libraries' warnings, as Python's last-resort handler would. Being a root
    handler keeps a library's `logging.warning(...)` from installing a second one (`basicConfig`), which
    would print every record twice; records still propagate, so pytest's `caplog` sees them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def ours(self, name: str) -> bool:
        return any(name == n or name.startswith(n + ".") for n in self.names)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not self.ours(record.name):
            return
        try:
            msg = self.format(record)
        except Exception:  # noqa: BLE001 - a bad format string must not end the command
            self.handleError(record)
            return
        # Through the console, not a stream of its own: lines land above a live progress bar, and follow
        # `console.file` (a worker's log file) and `console.quiet` (torchrun ranks other than 0).
        if record.levelno >= logging.WARNING:
            console.print(Text("warning: ", style="yellow") + Text(msg), soft_wrap=True)
        else:
            console.print(Text(msg), soft_wrap=True)


def _handler() -> ConsoleHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, ConsoleHandler)), None)


def show_logs(names: Iterable[str], level: int = logging.INFO) -> None:
    """Show the records of loggers `names` at `level` and above on the console (one handler in all, however
    often this is called)."""
    handler = _handler()
    if handler is None:
        handler = ConsoleHandler()
        logging.getLogger().addHandler(handler)
    for name in names:
        handler.names.add(name)
        logging.getLogger(name).setLevel(level)


def shown_logs() -> dict[str, int]:
    """The loggers `show_logs` shows, with their levels (a worker process shows the same)."""
    handler = _handler()
    return {name: logging.getLogger(name).level for name in sorted(handler.names)} if handler else {}
