"""What this machine's CPU allows: PyTorch's thread count and whether other processes crowd the cores.

PyTorch runs one intra-op thread per core by default, and its OpenMP threads wait for each
other at every operation. When other processes use some of the cores, one descheduled thread
stalls all the others: on a 2-core machine with one other busy process a training step took
16.7 s with 2 threads against 0.7 s with 1 (issue 13). `cpu_load()` spots that case from the
load average; `--threads N` (`set_threads`) is the remedy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UserError


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Use `n` CPU threads in PyTorch (intra-op, and inter-op where it is still allowed).

    Raises:
        UserError: `n` is not a whole number >= 1.
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--threads must be a whole number >= 1, got {n!r}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only allowed before the first inter-op parallel work; intra-op is what matters
        pass


@dataclass(frozen=True)
class CpuLoad:
    """The 1-minute load average beside the usable cores and PyTorch's threads.

    Attributes:
        load: 1-minute load average (None where the OS has none, e.g. Windows).
        cores: usable cores (`usable_cores()`).
        threads: PyTorch's intra-op threads in this process (its default: one per core).
    """

    load: float | None
    cores: int
    threads: int

    @property
    def oversubscribed(self) -> bool:
        """At least one core's worth of other work, and PyTorch's threads do not all get a core."""
        return self.load is not None and self.threads > 1 and self.load >= 1.0 and self.load + self.threads > self.cores

    @property
    def suggested_threads(self) -> int:
        """The cores the other processes leave free (at least 1)."""
        return max(1, int(self.cores - (self.load or 0.0)))

    def line(self) -> str:
        """One line for `spofa doctor` and the training commands' warning."""
        if self.load is None:
            return f"{self.cores} cores, PyTorch uses {self.threads} threads (no load average on this system)"
        head = f"load {self.load:.1f} on {self.cores} cores, PyTorch uses {self.threads} threads"
        if not self.oversubscribed:
            return f"{head}: not oversubscribed"
        return (f"{head}: other processes are using the CPU; PyTorch's default threads can slow training 10-30x; "
                f"try --threads {self.suggested_threads}")


def cpu_load(threads: int | None = None) -> CpuLoad:
    """Measure the load now; `threads` defaults to PyTorch's current intra-op thread count."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return CpuLoad(load, usable_cores(), threads)


def load_report() -> str:
    """The one-line CPU report (`spofa doctor`)."""
    return cpu_load().line()


def oversubscribed() -> str | None:
    """The advice line when the machine looks oversubscribed for PyTorch's threads, else None."""
    c = cpu_load()
    return c.line() if c.oversubscribed else None


def apply_threads(n: int | None) -> str | None:
    """What a training command does with `--threads`: set it, or (not given) return the advice if crowded."""
    if n is not None:
        set_threads(n)
        return None
    return oversubscribed()
