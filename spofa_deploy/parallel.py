"""Calls run `jobs` at a time in worker processes, each call's console output and log records to its own log file.

For many small, independent CPU-bound trainings (`spofa compare --jobs N`): one process per job with
a few threads each uses a many-core machine better than one process with all of them, and a spawned
worker shares no state with the caller, so a call computes exactly what it would compute alone.
"""
from __future__ import annotations

import logging
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from spofa_deploy.console import console, show_logs, shown_logs

_log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def map_in_processes(fn: Callable[[T], R], items: Iterable[T], *, jobs: int, threads: int,
                     log_path: Callable[[T], Path], on_start: Callable[[T], None] | None = None) -> Iterator[tuple[T, R]]:
    """Yield `(item, fn(item))` as the calls finish, `jobs` at a time, started in the order of `items`.

    Args:
        fn: a picklable (module-level) function; it runs in a spawned process with `threads`
            PyTorch CPU threads and the shared console writing to `log_path(item)` (appended), with the log
            records this process shows on it (`console.show_logs`; at least the library's INFO records).
        items: the arguments, picklable.
        jobs: processes at once (>= 1).
        threads: PyTorch CPU threads per process.
        log_path: where a call's console output and log records go.
        on_start: called in this process when a call is handed to a worker.

    Raises:
        Whatever a call raised: the calls not started are cancelled, the running ones are waited for.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting, running = deque(items), {}
    logs = {"spofa_deploy": logging.INFO, **shown_logs()}
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                item = waiting.popleft()
                running[pool.submit(_call_logged, fn, item, threads, log_path(item), logs)] = item
                if on_start:
                    on_start(item)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                item = running.pop(fut)
                yield item, fut.result()
    except BaseException:
        if running:  # (Ctrl-C reaches the workers too; after a failed call the others finish first)
            _log.info(f"stopping: waiting for the {len(running)} call(s) still running")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _call_logged(fn: Callable[[T], R], item: T, threads: int, log: Path, logs: dict[str, int]) -> R:
    """In the worker: set the threads, show the log records of `logs` (logger: level) on the console, point the
    console at `log`, call."""
    from spofa_deploy.machine import set_threads

    set_threads(threads)
    for name, level in logs.items():
        show_logs([name], level)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        console.file = f
        try:
            return fn(item)
        finally:
            console.file = sys.stderr
