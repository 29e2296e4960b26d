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
    """A log record as one line on the console: warnings marked, nothing else added (no markup read)."""

    def emit(self, record: logging.LogRecord) -> None:
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


def show_logs(names: Iterable[str], level: int = logging.INFO) -> None:
    """Show the records of loggers `names` at `level` and above on the console (one handler per logger: it
    replaces the one this function installed before)."""
    for name in names:
        lg = logging.getLogger(name)
        lg.handlers[:] = [h for h in lg.handlers if not isinstance(h, ConsoleHandler)] + [ConsoleHandler()]
        lg.setLevel(level)


def shown_logs() -> dict[str, int]:
    """The loggers `show_logs` shows, with their levels (a worker process shows the same)."""
    return {name: lg.level for name, lg in logging.Logger.manager.loggerDict.items()
            if isinstance(lg, logging.Logger) and any(isinstance(h, ConsoleHandler) for h in lg.handlers)}
