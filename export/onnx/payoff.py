"""Whether an INT8 ONNX pays where it runs: its size and ONNX Runtime CPU latency against the fp32 ONNX.

A user asking for INT8 expects a smaller and faster model on the machine they run it on; an
INT8 graph can be neither (Q/DQ nodes around fp32 weights, int8 kernels slower than fp32 ones
at batch 1). `int8_payoff` measures both ONNX files the way ONNX Runtime CPU runs them (full
graph optimisation, so int8 kernels where ORT fuses Q/DQ) and `slower` names where INT8 is not
faster. A short measurement (median of `iters` runs after warm-up, the two files timed in turn) on a
shared machine: a guide, not a benchmark (`spofa bench` is one).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

LARGE_BATCH = 32  # the throughput batch of the check (the profile's maximum when smaller)


def _interleaved_medians(sessions: dict, x: np.ndarray, warmup: int, iters: int) -> dict[str, float]:
    """Median ms of each session on `x`, timed in turn (fp32, int8, fp32, ...) so load drift hits both alike."""
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(iters):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def payoff_batches(lo: int, hi: int) -> list[int]:
    """Batch 1 (latency) and a large batch (throughput), within the graph's batch range."""
    return sorted({max(lo, 1), max(lo, min(hi, LARGE_BATCH))})


def int8_payoff(fp32: Path, int8: Path, shape: tuple[int, int, int], batches: list[int], *,
                warmup: int = 3, iters: int = 20) -> dict:
    """Size and median ONNX Runtime CPU latency (ms) of both files at each batch, for the sidecar.

    Args:
        fp32, int8: the two ONNX files.
        shape: (C, H, W) of one image.
        batches: batch sizes the graphs accept.
    """
    from .graph import ort_session

    rng = np.random.default_rng(0)
    latency = {}
    sessions = {"fp32": ort_session(fp32), "int8": ort_session(int8)}
    for b in batches:
        x = rng.standard_normal((b, *shape), dtype=np.float32)
        latency[str(b)] = _interleaved_medians(sessions, x, warmup, iters)
    return {"backend": "onnxruntime-cpu", "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
            "latency_ms": latency, "iters": iters}


def slower(payoff: dict) -> list[str]:
    """Plain statements of where INT8 does not pay: not smaller, or not faster at a batch."""
    out = []
    if payoff["int8_bytes"] >= payoff["fp32_bytes"]:
        out.append(f"the INT8 ONNX is not smaller than fp32 ({payoff['int8_bytes'] / 1e6:.2f} MB vs "
                   f"{payoff['fp32_bytes'] / 1e6:.2f} MB)")
    for b, ms in payoff["latency_ms"].items():
        if ms["int8"] >= ms["fp32"]:
            out.append(f"INT8 is not faster than fp32 in ONNX Runtime CPU on this machine at batch {b} "
                       f"({ms['int8']:.2f} ms vs {ms['fp32']:.2f} ms)")
    return out


def describe(payoff: dict) -> str:
    """One line: sizes and latencies of INT8 against fp32."""
    lat = ", ".join(f"batch {b} {ms['int8']:.2f} vs {ms['fp32']:.2f} ms" for b, ms in payoff["latency_ms"].items())
    return (f"{payoff['int8_bytes'] / 1e6:.2f} MB vs {payoff['fp32_bytes'] / 1e6:.2f} MB; {lat} "
            f"(int8 vs fp32, {payoff['backend']}, median of {payoff['iters']})")
