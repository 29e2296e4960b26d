"""Images per second of one training step for none / kd / ofa / spofa, side by side.

Data already sits on the device, so this measures the step itself (teacher forward,
student forward/backward, heads, MEMA, optimizer, and the trainer's NaN guard: the
exact `train_step` the training loop runs). Methods are interleaved in rounds
(A B C D, A B C D, ...) so clock and thermal drift hit all of them alike; we report
the median ms/step, its spread (p10-p90), ratios of ms/step against OFA and against the
student alone (`none`), and `speed` = none's ms / this ms (the target: SPOFA with a warm teacher cache >= 0.8).

"<method> cached" rows run the same step with the teacher's logits read from a warm
teacher cache (`spofa_deploy.teacher.cache`), as a run's later epochs or a compare's later
runs do: one cold step runs the teacher and stores its logits, the record is written to a
temp folder and opened again (a cache from an earlier run), and every timed step is
`train_step(..., teacher=(cache, epoch, indices))`: record lookup and decode, copy to the
device, no teacher forward. They are timed in the same rounds as the others.

"<method> traced" rows run the step as a trace row's step does (`grad_norms=True`: one extra
backward per loss term for its gradient norm); the training loop takes such a step every
`TrainConfig.grad_norms_every` steps, so its cost per step is (traced / untraced - 1) / that.

    python benchmarks/distill_step.py                    # GPU: vit_b -> mobilenetv3, 224 px, batch 128
    python benchmarks/distill_step.py --device cpu       # CPU: tiny models
    python benchmarks/distill_step.py --device cpu --teacher vit_b --student mobilenetv3 \\
        --img-size 32 --batch 16 --classes 10            # CPU: one step of a compare with a ViT-B teacher
    python benchmarks/distill_step.py --cached ''        # without the cached rows
    python benchmarks/distill_step.py --device cpu --teacher vit_b --student mobilenetv3 --img-size 32 \
        --batch 64 --classes 10 --methods none,spofa --cached spofa --cache-format fp32 --traced spofa \
        --threads 2 --rounds 3 --steps 5                 # CPU: the main command's step, its parts
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from spofa_deploy.method.distillers import DistillConfig, create_task
from spofa_deploy.machine import cpu_load, set_threads
from spofa_deploy.models import create_model
from spofa_deploy.teacher.cache import TeacherCache
from spofa_deploy.teacher.cache_key import CacheKey, FORMATS
from spofa_deploy.train.loop import resolve_amp, train_step

CACHED = " cached"  # row-name suffix of a method timed with a warm teacher cache
TRACED = " traced"  # row-name suffix of a method timed with per-term gradient norms (a trace row's step)


def open_cache(root: Path, x: torch.Tensor, cfg: DistillConfig, num_classes: int, fmt: str | None,
               compute: str) -> TeacherCache:
    """A teacher cache for the benchmark batch `x` (epoch 0, samples 0..B-1), opened as `spofa distill` would.

    The key only has to be stable within this process: every cached row stores the same
    teacher's logits of the same batch, so rows of one record format share one record.
    """
    key = CacheKey(teacher="distill_step benchmark", data="random", split="random", num_samples=x.shape[0],
                   img_size=x.shape[-1], mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear", crop_pct=1.0,
                   augmentation="none", seed=0, train_fraction=1.0, compute=compute)
    temperature = cfg.kd_temperature if cfg.method == "kd" else cfg.temperature
    return TeacherCache.open(root, key, num_classes=num_classes, fmt=fmt, temperature=temperature)


def warm_cache(step, idx: torch.Tensor, reopen) -> tuple:
    """Fill a cold cache with one step (the teacher runs and its logits are stored), write it, open it again.

    Args:
        step: `train_step` of the row, all but its `teacher=` argument given.
        idx: the batch's sample indices.
        reopen: opens the cache (a new `TeacherCache` on the same folder and key).

    Returns:
        The `teacher=` argument of `train_step`: (warm cache, epoch, indices).
    """
    cold = reopen()
    step(teacher=(cold, 0, idx))  # (a row of a format stored before finds its record: nothing new to commit)
    cold.commit(0)
    warm = reopen()
    if warm.get(0, idx) is None:
        raise RuntimeError(f"teacher cache {warm.folder} did not read back: {warm.pop_warnings()}")
    return warm, 0, idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--student", default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--methods", default="none,kd,ofa,spofa")
    ap.add_argument("--cached", default="kd,ofa,spofa",
                    help="methods also timed with a warm teacher cache ('' for none)")
    ap.add_argument("--cache-format", default=None, choices=FORMATS,
                    help="record format of the cached rows (default: what `spofa distill` picks for the method; "
                         "`spofa compare` uses fp32)")
    ap.add_argument("--traced", default="", help="methods also timed with per-term gradient norms, as a trace row's step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch CPU threads (default: one per core; fewer on a machine busy with other work)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [m for m in a.methods.split(",") if m] + [m + CACHED for m in a.cached.split(",") if m] + \
        [m + TRACED for m in a.traced.split(",") if m]
    if "none" + CACHED in rows:
        ap.error("--cached: `none` has no teacher")
    if a.threads is not None:
        set_threads(a.threads)
    load_before = cpu_load()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    teacher = a.teacher or ("vit_b" if gpu else "test_vit")
    student = a.student or ("mobilenetv3" if gpu else "test_resnet")
    size = a.img_size or (224 if gpu else 32)
    batch = a.batch or (128 if gpu else 32)
    amp = resolve_amp("auto", dev)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, a.classes, (batch,), device=dev)
    idx = torch.randperm(batch)  # a shuffled batch, as the loader hands out (record rows gathered, not sliced)
    if gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    t_model = create_model(teacher, a.classes, size).to(dev).eval()

    tmp = tempfile.TemporaryDirectory(prefix="spofa-distill-step-")
    compute = f"{dev.type}/{amp}/batch{batch}"
    setups = {}
    for row in rows:
        m = row.removesuffix(CACHED).removesuffix(TRACED)
        s_model = create_model(student, a.classes, size)
        cfg = DistillConfig(method=m)
        task = create_task(m, s_model, t_model, cfg, a.classes).to(dev)
        if gpu:
            task.to(memory_format=torch.channels_last)
        task.train()
        opt = torch.optim.AdamW(task.trainable(), lr=1e-4, fused=gpu)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        step = partial(train_step, task, x, y, opt, scaler, amp, grad_norms=row.endswith(TRACED))
        t_arg = None
        if row.endswith(CACHED):
            reopen = partial(open_cache, Path(tmp.name), x, cfg, a.classes, a.cache_format, compute)
            t_arg = warm_cache(step, idx, reopen)
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator, lazy init
            step(teacher=t_arg)
        setups[row] = (step, t_arg)

    times: dict[str, list[float]] = {r: [] for r in setups}
    for _ in range(a.rounds):
        for r, (step, t_arg) in setups.items():
            if gpu:
                torch.cuda.synchronize()
            for _ in range(a.steps):
                t0 = time.perf_counter()
                step(teacher=t_arg)  # ends with a host read, so wall time is the step time
                times[r].append((time.perf_counter() - t0) * 1e3)
    formats = sorted({t_arg[0].codec.record.fmt for _, t_arg in setups.values() if t_arg})
    tmp.cleanup()

    name = torch.cuda.get_device_name(dev) if gpu else "CPU"
    after = cpu_load().load
    load = (f"load {load_before.load:.1f} -> {after:.1f}" if after is not None else "no load average") + \
        f" on {load_before.cores} cores, {load_before.threads} threads"
    print(f"device: {name} ({load}); teacher {teacher}, student {student}, {size}px, batch {batch}, {a.classes} classes, "
          f"amp {amp}, {a.rounds} rounds x {a.steps} steps per row, interleaved"
          + (f"; cached rows: warm teacher cache, {'/'.join(formats)} records" if formats else ""))
    print(f"{'method':13} {'ms/step':>9} {'p10-p90':>15} {'img/s':>9} {'vs ofa':>7} {'vs none':>8} {'speed':>6}")
    med = {r: statistics.median(v) for r, v in times.items()}
    out = []
    for r, v in times.items():
        q = statistics.quantiles(v, n=10)
        row = {"method": r, "ms_median": med[r], "ms_p10": q[0], "ms_p90": q[-1], "img_per_s": batch / med[r] * 1e3,
               "vs_ofa": med[r] / med["ofa"] if "ofa" in med else None,
               "vs_none": med[r] / med["none"] if "none" in med else None,
               "speed_vs_none": med["none"] / med[r] if "none" in med else None}
        out.append(row)
        print(f"{r:13} {row['ms_median']:9.2f} {q[0]:7.2f}-{q[-1]:<7.2f} {row['img_per_s']:9.0f} "
              f"{(row['vs_ofa'] or float('nan')):7.2f} {(row['vs_none'] or float('nan')):8.2f} "
              f"{(row['speed_vs_none'] or float('nan')):6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "teacher": teacher, "student": student, "img_size": size, "batch": batch,
                       "classes": a.classes, "amp": str(amp), "rounds": a.rounds, "steps": a.steps,
                       "cache_formats": formats, "cpu": load, "rows": out}, f, indent=2)


if __name__ == "__main__":
    main()
