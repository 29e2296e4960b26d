"""Is the GPU starved? Loader img/s (decode + augmentation) per worker count, next to the step's img/s.

The loader is the training one: `load_splits` on an image folder with the teacher's
preprocessing, `AugSeeded` over (index, epoch) pairs as `fit` draws them, `make_loader`.
Each measurement starts fresh workers, lets each deliver its first batch (start-up and
prefetch excluded), then times the next batches; the main process only takes batches.
Paths: `pil` (workers decode with PIL and augment: the default) and `device` (workers read
bytes and draw crops; the main process decodes with nvJPEG and augments on the GPU:
`--gpu-decode`). The step is `train_step` on random data already on the device, as in
benchmarks/distill_step.py. Loader settings and the step are interleaved in rounds
(A B C ..., A B C ...) so drift hits all alike; we report medians and spreads.
Last, `loop` runs the two together (the loader at the busiest worker count feeding the
step), which is what training sees. Files sit in the page cache: disk reads are not measured.

    python benchmarks/loader.py                          # synthetic JPEGs (2,000, 256-500 px) in ~/.cache
    python benchmarks/loader.py --data /data/imagenet    # an image folder: DIR/train/<class>/*.jpg
    python benchmarks/loader.py --decode-device cuda     # also the nvJPEG path (the default on a GPU)
    python benchmarks/loader.py --decode-device cpu      # the same bytes path, decoded on the CPU (a check)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from spofa_deploy.data.splits import load_splits
from spofa_deploy.data.loaders import AugSeeded, make_loader
from spofa_deploy.method.distillers import DistillConfig, create_task
from spofa_deploy.models import create_model, data_config
from spofa_deploy.train.loop import resolve_amp, train_step
from spofa_deploy.models import Preprocessing


def synthetic_folder(n: int, classes: int, root: Path, seed: int = 0) -> Path:
    """Write (once) `n` JPEGs of 256-500 px per side in `classes` classes: DIR/train/<class>/, one val image each.

    Smooth random pictures with grain, quality 90: JPEG sizes and decode costs of photos
    (about 30-60 KB at 400 px), not of flat colour or pure noise.
    """
    from PIL import Image

    folder = root / f"jpeg-{n}x{classes}-v1"
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    rng = np.random.default_rng(seed)
    for k in range(n + classes):
        split, c = ("train", k % classes) if k < n else ("val", k - n)
        h, w = (int(v) for v in rng.integers(256, 501, 2))
        small = rng.integers(0, 256, (h // 12, w // 12, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        path = tmp / split / f"class{c:02d}" / f"{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
    (tmp / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def epoch_pairs(n: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """The first `count` (index, epoch) pairs a training run draws (DistributedSampler's shuffle, epoch after epoch)."""
    from torch.utils.data.distributed import DistributedSampler

    pairs, epoch = [], 0
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
    while len(pairs) < count:
        sampler.set_epoch(epoch)
        pairs += [(i, epoch) for i in sampler]
        epoch += 1
    return pairs[:count]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(ds, batch: int, workers: int, batches: int, device: torch.device) -> float:
    """Images per second the training loader delivers with `workers` workers (fresh workers, warm-up excluded)."""
    warm = max(1, workers)  # every worker's first batch: spawn and start-up, not throughput
    loader = make_loader(AugSeeded(ds, 0), batch, train=True, workers=workers, pin_memory=device.type == "cuda",
                         sampler=epoch_pairs(len(ds), (warm + batches) * batch))
    it = iter(loader)
    for _ in range(warm):
        next(it)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += x.shape[0]
    _sync(device)  # device-decoded batches: their kernels count too
    secs = time.perf_counter() - t0
    del it, loader  # shuts the workers down before the next measurement
    return n / secs


class Step:
    """The training step (`train_step`) of a distillation task on random data already on the device."""

    def __init__(self, method: str, teacher: str, student: str, classes: int, size: int, batch: int,
                 device: torch.device):
        self.device, self.amp = device, resolve_amp("auto", device)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=gen).to(device)
        t_model = create_model(teacher, classes, size).to(device).eval()
        self.prep = data_config(t_model)  # the preprocessing `spofa distill` would load the data with
        self.task = create_task(method, create_model(student, classes, size), t_model, DistillConfig(method=method),
                                classes).to(device)
        if device.type == "cuda":
            self.task.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.task.train()
        self.opt = torch.optim.AdamW(self.task.trainable(), lr=1e-4, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator, lazy init
            self(self.x, self.y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(self.task, x, y, self.opt, self.scaler, self.amp)  # ends with a host read: wall time is step time

    def rate(self, steps: int) -> list[float]:
        """Images per second of each of `steps` steps."""
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self(self.x, self.y)
            out.append(self.x.shape[0] / (time.perf_counter() - t0))
        return out


def loop_rate(ds, step: Step, batch: int, workers: int, batches: int) -> float:
    """Images per second of loader and step together, as `fit` runs them (warm-up excluded)."""
    dev = step.device
    warm = max(1, workers)
    loader = make_loader(AugSeeded(ds, 0), batch, train=True, workers=workers, pin_memory=dev.type == "cuda",
                         sampler=epoch_pairs(len(ds), (warm + batches) * batch))
    n, t0 = 0, None
    for k, (x, y) in enumerate(loader):
        if k == warm:
            _sync(dev)
            t0, n = time.perf_counter(), 0
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        step(x, y)
        n += x.shape[0]
    secs = time.perf_counter() - t0
    del loader
    return n / secs


def _spread(v: list[float]) -> tuple[float, float, float]:
    """Median and spread: p10-p90 where there are 10+ values, else min-max."""
    if len(v) >= 10:
        q = statistics.quantiles(v, n=10)
        return statistics.median(v), q[0], q[-1]
    return statistics.median(v), min(v), max(v)


def _worker_counts(spec: str | None) -> list[int]:
    if spec:
        return [int(w) for w in spec.split(",")]
    cores = os.cpu_count() or 1
    return sorted({0, cores} | {2 ** k for k in range(int(math.log2(cores)) + 1)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder root (DIR/train/<class>/...); default: synthetic JPEGs")
    ap.add_argument("--images", type=int, default=2000, help="synthetic images (without --data)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "spofa" / "bench"),
                    help="where the synthetic images go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-device", default=None,
                    help="also measure the bytes path decoded there: cuda (nvJPEG; default on a GPU) or cpu")
    ap.add_argument("--workers", default=None, help="comma list; default 0, 1, 2, 4, ... and the core count")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--student", default=None)
    ap.add_argument("--method", default="spofa")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per loader measurement")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--loop-workers", type=int, default=None, help="workers of the loader+step run (default: the most)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of the main process (default: 1 on CPU, where OpenMP threads of a busy "
                         "machine stall each other, as `spofa --threads`; torch's default on a GPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    if a.threads or not gpu:
        torch.set_num_threads(a.threads or 1)  # loader workers run one thread each anyway (DataLoader sets it)
    teacher = a.teacher or ("vit_b" if gpu else "test_vit")
    student = a.student or ("mobilenetv3" if gpu else "test_resnet")
    batch = a.batch or (128 if gpu else 32)
    workers = _worker_counts(a.workers)
    batches = a.batches or max(4, 2 * max(workers))
    decode_device = a.decode_device or ("cuda" if gpu else None)

    root = Path(a.data) if a.data else synthetic_folder(a.images, 10, Path(a.cache))
    classes = sum(1 for d in (root / "train").iterdir() if d.is_dir())
    step = Step(a.method, teacher, student, classes, a.img_size, batch, dev)
    prep = step.prep
    paths = {"pil": None} | ({"device": decode_device} if decode_device else {})
    data = {name: load_splits(f"imagefolder:{root}", Preprocessing.from_meta(prep, a.img_size), decode_device=d).train for name, d in paths.items()}

    rates: dict[tuple[str, int], list[float]] = {(p, w): [] for p in paths for w in workers}
    step_rates: list[float] = []
    for _ in range(a.rounds):
        for (p, w), v in rates.items():
            v.append(loader_rate(data[p], batch, w, batches, dev))
        step_rates += step.rate(a.steps)
    loop_w = a.loop_workers if a.loop_workers is not None else max(workers)
    loop = {p: loop_rate(data[p], step, batch, loop_w, batches) for p in paths}

    name = torch.cuda.get_device_name(dev) if gpu else "CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {name}, {os.cpu_count()} cores (load average {load:.1f}); {len(data['pil'])} training images "
          f"from {root}; {a.img_size} px, batch {batch}, interpolation {prep['interpolation']}; "
          f"teacher {teacher}, student {student}, {a.method}, amp {step.amp}; {torch.get_num_threads()} main-process "
          f"threads; {a.rounds} rounds, interleaved")
    print(f"{'what':32} {'img/s':>9} {'spread':>17}")
    rows = []
    for (p, w), v in rates.items():
        med, lo, hi = _spread(v)
        label = f"loader {p}" + (f" ({decode_device})" if p == "device" else "") + f", {w} workers"
        rows.append({"what": "loader", "path": p, "workers": w, "img_per_s": med, "lo": lo, "hi": hi, "runs": v})
        print(f"{label:32} {med:9.0f} {lo:8.0f}-{hi:<8.0f}")
    s_med, s_lo, s_hi = _spread(step_rates)
    rows.append({"what": "step", "img_per_s": s_med, "lo": s_lo, "hi": s_hi})
    print(f"{'step (' + a.method + ')':32} {s_med:9.0f} {s_lo:8.0f}-{s_hi:<8.0f}")
    for p, r in loop.items():
        rows.append({"what": "loop", "path": p, "workers": loop_w, "img_per_s": r})
        print(f"{f'loop {p}, {loop_w} workers':32} {r:9.0f}")

    for p in paths:
        best_w = max(workers, key=lambda w: statistics.median(rates[(p, w)]))
        best = statistics.median(rates[(p, best_w)])
        if best < s_med:
            print(f"{p}: the LOADER is the bottleneck: at best {best:.0f} img/s ({best_w} workers) against the "
                  f"step's {s_med:.0f}: the step waits {100 * (1 - best / s_med):.0f} % of the time")
        else:
            enough = min(w for w in workers if statistics.median(rates[(p, w)]) >= s_med)
            print(f"{p}: the STEP is the bottleneck: the loader keeps up from {enough} workers "
                  f"({statistics.median(rates[(p, enough)]):.0f} img/s >= {s_med:.0f})")
    if not gpu:
        print("note: on a CPU the step and the loader workers share the cores, so `loop` is what training gets")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "cores": os.cpu_count(), "load_average": load, "data": str(root),
                       "train_images": len(data["pil"]), "img_size": a.img_size, "batch": batch,
                       "teacher": teacher, "student": student, "method": a.method, "amp": str(step.amp),
                       "decode_device": decode_device, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
