"""What this machine is and allows: devices (CUDA), PyTorch's CPU threads, and a description for reports.

One home for the device and capability probes that training, doctor and bench share.

PyTorch runs one intra-op thread per core by default, and its OpenMP threads wait for each
other at every operation. When other processes use some of the cores, one descheduled thread
stalls all the others: on a 2-core machine with one other busy process a training step took
16.7 s with 2 threads against 0.7 s with 1 (docs/results.md, "CPU threads"). `cpu_load()` spots that case from the
load average; `--threads N` (`set_threads`) is the remedy.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spofa_deploy.errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it, so `spofa doctor` can report a broken torch.


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def available_memory_gb() -> float | None:
    """Memory the OS could give new processes now (Linux's MemAvailable), in GB; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kb / 1e6


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


# --------------------------------------------------------------------------- devices

def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda:N` checked against the GPUs; cuda without a GPU refused."""
    import torch

    d = name.strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d != "cuda" and not d.startswith("cuda:"):
        raise UserError(f"unknown --device '{name}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available (use --device cpu)")
    try:
        device = torch.device(d)
    except RuntimeError:
        raise UserError(f"--device {name}: expected cuda or cuda:N") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cuda_skip_reason() -> str | None:
    """Why CUDA cannot be used here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The instruction set PyTorch's CPU kernels use here (e.g. AVX2, AVX512): training on CPUs of two such kinds
    sums floats in another order, so the same run gives other weights (a compare's teacher retrained elsewhere)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


# What holds PyTorch's kernels, oneDNN's convolutions and MKL's matrix products to AVX2 on an AVX-512 CPU: a run
# trained so repeats bit for bit the same run trained on an AVX2 machine (measured: docs/commands/compare.md).
AVX2_KERNELS = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"


def avx2_kernels_left_out() -> str | None:
    """When only some of AVX2_KERNELS are set, what the others leave at the CPU's own instruction set (None when
    all or none are set): on an AVX-512 CPU such runs are neither an AVX2 machine's nor an AVX-512 one's."""
    settings = [(s, *s.split("=", 1), lib) for s, lib in zip(AVX2_KERNELS.split(), ("PyTorch's", "oneDNN's", "MKL's"))]
    unset = [(s, lib) for s, name, value, lib in settings if os.environ.get(name) != value]
    if not 0 < len(unset) < len(settings):
        return None
    return f"without {' '.join(s for s, _ in unset)}, {' and '.join(lib for _, lib in unset)} kernels stay AVX-512"


def _physical_cores() -> int | None:
    cores = set()
    with contextlib.suppress(OSError):
        phys = None
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                cores.add((phys, val.strip()))
    return len(cores) or None


def _driver_version() -> str | None:
    with contextlib.suppress(Exception):
        import pynvml  # nvidia-ml-py, when installed

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip().splitlines()[0]
    return None


def machine_info() -> dict:
    """CPU, GPU, driver, CUDA and library versions of this machine, for reports."""
    import numpy as np
    import torch

    from spofa_deploy.artifacts import versions

    info: dict = {
        "hostname": platform.node(), "os": platform.platform(), "python": platform.python_version(),
        "cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpu_logical_cores": os.cpu_count(), "cpu_physical_cores": _physical_cores(),
        "torch_threads": torch.get_num_threads(), "libraries": {**versions(), "numpy": np.__version__},
        "cuda": torch.version.cuda, "gpu": None,
    }
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        info["onnxruntime_providers"] = list(ort.get_available_providers())
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                       "driver": _driver_version(), "cudnn": torch.backends.cudnn.version()}
    return info
