"""Images per second of one training step for none / kd / ofa / spofa, side by side.

Data already sits on the device, so this measures the step itself (teacher forward,
student forward/backward, heads, MEMA, optimizer, and the trainer's NaN guard: the
exact `train_step` the training loop runs). Methods are interleaved in rounds
(A B C D, A B C D, ...) so clock and thermal drift hit all of them alike; we report
the median ms/step, its spread (p10-p90) and ratios against OFA.

    python benchmarks/distill_step.py                    # GPU: vit_b -> mobilenetv3, 224 px, batch 128
    python benchmarks/distill_step.py --device cpu       # CPU: tiny models
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from spofa_deploy.distillers import DistillConfig, create_task
from spofa_deploy.models import create_model
from spofa_deploy.train import resolve_amp, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--student", default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--methods", default="none,kd,ofa,spofa")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
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
    if gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    t_model = create_model(teacher, a.classes, size).to(dev).eval()

    setups = {}
    for m in a.methods.split(","):
        s_model = create_model(student, a.classes, size)
        task = create_task(m, s_model, t_model, DistillConfig(method=m), a.classes).to(dev)
        if gpu:
            task.to(memory_format=torch.channels_last)
        task.train()
        opt = torch.optim.AdamW(task.trainable(), lr=1e-4, fused=gpu)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator, lazy init
            train_step(task, x, y, opt, scaler, amp)
        setups[m] = (task, opt, scaler)

    times: dict[str, list[float]] = {m: [] for m in setups}
    for _ in range(a.rounds):
        for m, (task, opt, scaler) in setups.items():
            if gpu:
                torch.cuda.synchronize()
            for _ in range(a.steps):
                t0 = time.perf_counter()
                train_step(task, x, y, opt, scaler, amp)  # ends with a host read, so wall time is the step time
                times[m].append((time.perf_counter() - t0) * 1e3)

    name = torch.cuda.get_device_name(dev) if gpu else "CPU"
    print(f"device: {name}; teacher {teacher}, student {student}, {size}px, batch {batch}, amp {amp}, "
          f"{a.rounds} rounds x {a.steps} steps per method, interleaved")
    print(f"{'method':8} {'ms/step':>9} {'p10-p90':>15} {'img/s':>9} {'vs ofa':>7} {'vs none':>8}")
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = []
    for m, v in times.items():
        q = statistics.quantiles(v, n=10)
        r = {"method": m, "ms_median": med[m], "ms_p10": q[0], "ms_p90": q[-1], "img_per_s": batch / med[m] * 1e3,
             "vs_ofa": med[m] / med["ofa"] if "ofa" in med else None,
             "vs_none": med[m] / med["none"] if "none" in med else None}
        rows.append(r)
        print(f"{m:8} {r['ms_median']:9.2f} {q[0]:7.2f}-{q[-1]:<7.2f} {r['img_per_s']:9.0f} "
              f"{(r['vs_ofa'] or float('nan')):7.2f} {(r['vs_none'] or float('nan')):8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "teacher": teacher, "student": student, "img_size": size, "batch": batch,
                       "amp": str(amp), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
