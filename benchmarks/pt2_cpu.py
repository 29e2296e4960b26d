"""CPU latency of one model: eager PyTorch vs torch-compile vs its `.pt2` package vs ONNX Runtime, interleaved.

    python benchmarks/pt2_cpu.py --model mobilenetv3_large_100 --img-size 32 --batch 1,64 --threads 1

Random weights (latency does not depend on them). Each backend is built once (the `.pt2`
with a dynamic batch 1..256, as `spofa export` does by default; the ONNX with a dynamic
batch), checked against eager on the same images, then timed in rounds A B C D A B C D ...
per batch size with `export.bench.timing.measure`; the rounds are pooled. Reported per
backend and batch: median host latency, p10..p90 of all samples, the spread of the per-round
medians, img/s and the ratio to eager. Compile/export seconds are printed apart, never in
the latency. On a shared machine, quote the ratios (all backends see the same load).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import timm
import torch

from export.artifact import Artifact, BatchProfile
from export.bench.timing import LatencyStats, TimingOptions, measure, percentile
from export.onnx import OrtRunner, export_onnx
from export.pt2 import Pt2Runner, export_pt2
from export.pytorch import TorchRunner
from export.runner import RunOptions, random_input

BACKENDS = ("eager", "compile", "pt2", "ort")


def _artifact(path: Path, fmt: str, meta: dict, batch: BatchProfile) -> Artifact:
    return Artifact(path=path, format=fmt, meta=meta, precision="fp32", size_bytes=path.stat().st_size,
                    batch_range=(batch.min, batch.max))


def build(model, name: str, backends: list[str], img: int, threads: int, work: Path, batches: list[int],
          pt2_batch: str) -> tuple[dict, dict]:
    """The runners, and the seconds each took to build (export + compile + load).

    `pt2_batch`: "dynamic" (one package for 1..256), "fixed" (one package per batch size,
    keyed `pt2@N`) or "both".
    """
    profile = BatchProfile.dynamic_range(1, 16, 256)
    meta = {"model": name, "num_classes": int(model.num_classes), "img_size": img, "in_chans": 3}
    runners, seconds = {}, {}
    for b in backends:
        t0 = time.perf_counter()
        if b == "eager":
            runners[b] = TorchRunner(model, backend="torch-eager", img_size=img, name=name)
        elif b == "compile":  # compiles per batch size in prepare(); its time is in compile_seconds
            runners[b] = TorchRunner(model, backend="torch-compile", img_size=img, name=name)
        elif b == "pt2":
            profiles = {"pt2": profile} if pt2_batch in ("dynamic", "both") else {}
            if pt2_batch in ("fixed", "both"):
                profiles.update({f"pt2@{n}": BatchProfile.fixed(n) for n in batches})
            for key, prof in profiles.items():
                t0 = time.perf_counter()
                path = work / f"{name}.{key.replace('@', '-')}.pt2"
                facts = export_pt2(model, path, img_size=img, batch=prof)
                runners[key] = Pt2Runner(_artifact(path, "pt2", {**meta, **facts}, prof))
                runners[key].activate()  # loading is part of the build time
                seconds[key] = time.perf_counter() - t0
            continue
        elif b == "ort":
            path = work / f"{name}.onnx"
            export_onnx(model, path, img_size=img, batch=profile)
            runners[b] = OrtRunner(_artifact(path, "onnx", {**meta, "batch": profile.to_dict()}, profile), "cpu",
                                   RunOptions(threads=threads))
            runners[b].activate()  # loading is part of the build time
        seconds[b] = time.perf_counter() - t0
    return runners, seconds


def bench(runners: dict, batches: list[int], rounds: int, min_s: float, warmup_s: float) -> dict:
    """Per batch size: prepare every runner, then time them interleaved, `rounds` times."""
    out: dict = {}
    for batch in batches:
        x = random_input((batch, *runners["eager"].input_shape), seed=99)
        ref = runners["eager"](x)
        live = [b for b, r in runners.items() if r.batch_sizes_supported(batch)]
        steps, parts, err = {}, {b: [] for b in live}, {}
        for b in live:
            r = runners[b]
            steps[b] = r.prepare(batch)
            err[b] = float((r(x) - ref).abs().max())
        for i in range(rounds):
            for b in live:
                timing = TimingOptions(warmup_s=warmup_s if i == 0 else 0.1, min_s=min_s, min_iters=10)
                parts[b].append(measure(steps[b], batch=batch, timing=timing))
        out[batch] = {}
        for b in live:
            st = LatencyStats.pool(parts[b])
            out[batch][b] = {
                "median_ms": st.host.median, "p10_ms": percentile(st.host_ms, 10), "p90_ms": st.host.p90,
                "round_medians_ms": [p.host.median for p in parts[b]], "iters": st.iters,
                "img_s": batch * 1000.0 / st.host.median, "max_abs_err_vs_eager": err[b]}
            runners[b].release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv3_large_100")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    ap.add_argument("--pt2-batch", default="dynamic", choices=("dynamic", "fixed", "both"),
                    help="the .pt2 with a dynamic batch 1..256, one fixed-batch package per batch size, or both")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every backend")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--min-s", type=float, default=1.0, help="seconds per backend per round")
    ap.add_argument("--warmup-s", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if any(b not in BACKENDS for b in backends) or "eager" not in backends:
        ap.error(f"--backends: a subset of {','.join(BACKENDS)} that includes eager (the reference)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, num_classes=1000, exportable=True).eval()
    with tempfile.TemporaryDirectory(prefix="pt2-cpu-") as work:
        batches = [int(b) for b in a.batch.split(",")]
        runners, build_s = build(model, a.model, backends, a.img_size, a.threads, Path(work), batches, a.pt2_batch)
        results = bench(runners, batches, a.rounds, a.min_s, a.warmup_s)
    compile_s = runners["compile"].compile_seconds if "compile" in runners else {}
    print(f"{a.model} {a.img_size}px fp32, {a.threads} thread(s), torch {torch.__version__}; "
          f"build seconds: {', '.join(f'{b} {s:.1f}' for b, s in build_s.items())}"
          + (f"; torch-compile first call per batch: {', '.join(f'b{k} {v:.1f}' for k, v in compile_s.items())}"
             if compile_s else ""))
    print(f"{'batch':>5} {'backend':>8} {'median ms':>10} {'p10..p90 ms':>17} {'round medians ms':>30} "
          f"{'img/s':>9} {'vs eager':>8} {'max err':>8}")
    for batch, rows in results.items():
        for b, r in rows.items():
            rounds = " ".join(f"{v:.3f}" for v in r["round_medians_ms"])
            speed = rows["eager"]["median_ms"] / r["median_ms"]
            err = f"{r['max_abs_err_vs_eager']:.1e}"
            print(f"{batch:>5} {b:>8} {r['median_ms']:>10.3f} {r['p10_ms']:>8.3f}..{r['p90_ms']:<8.3f} "
                  f"{rounds:>30} {r['img_s']:>9.0f} {speed:>7.2f}x {err:>8}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "img_size": a.img_size, "threads": a.threads,
                                            "torch": torch.__version__, "build_seconds": build_s,
                                            "compile_first_call_seconds": compile_s, "results": results},
                                           indent=2) + "\n")


if __name__ == "__main__":
    main()
