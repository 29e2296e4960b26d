"""How much top-k teacher-cache records change the distillation losses, to choose the default k.

A realistic teacher is a trained one: an MLP is trained on CIFAR-like synthetic data (classes
in superclasses, so the teacher's tail has structure: near-miss classes of the same
superclass), and its logits on noisy "augmented" training views are the cached targets; a
weaker, briefly trained linear student gives the student logits. For each k the logits go
through the cache's own codec (`teacher_cache_record.Codec`, exactly what get() returns) and we
report, against the exact fp32 logits:

    KD T=4, KD T=1, OFA (tau=1): |loss_hat - loss| / loss and ||grad_hat - grad|| / ||grad||
        (the gradient w.r.t. the student logits: what training sees; the loss value also
        moves with the teacher entropy, a constant for the student)
    align: mean |cos(z, t_hat) - cos(z, t)| (SPOFA's stage-alignment statistic on raw logits)

plus the same for fp16 full logits and, for KD at T=4, a tail matched at T=1 only (what a
single stored tail mass would give). CPU only; about 6 minutes on a busy 2-core machine, most of
it training the 1000-class teachers:

    python benchmarks/teacher_cache_topk.py                  # 100 and 1000 classes
    python benchmarks/teacher_cache_topk.py --classes 100 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from spofa_deploy.teacher import cache_key as tc
from spofa_deploy.teacher.cache_record import Codec
from spofa_deploy.method.losses import cosine_rows, kd_loss, ofa_loss


# (superclass spread, sample noise, augmentation noise). At 100 classes "soft" gives a teacher of ~83 %
# accuracy on the augmented views, mean top-1 probability ~0.85 (an ImageNet teacher on random crops),
# "confident" ~97 % / 0.97; at 1000 classes ~49 % / 0.55 and ~87 % / 0.89.
PRESETS = {"soft": (0.8, 2.0, 2.0), "confident": (1.0, 1.5, 1.5)}


def synthetic_task(classes: int, preset: str = "soft", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits, student logits and labels on augmented views of a trained CIFAR-like task."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spread, noise, aug = PRESETS[preset]
    dim, per_super, per_class = 64, 5, 40
    supers = classes // per_super
    means = (torch.randn(supers, dim, generator=g) * spread).repeat_interleave(per_super, 0)
    means = means + torch.randn(classes, dim, generator=g) * 1.0
    y = torch.arange(classes).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), dim, generator=g) * noise
    view = lambda xs: xs + aug * torch.randn(xs.shape, generator=g)  # noqa: E731  (the "augmentation")

    def train(model: nn.Module, steps: int, lr: float) -> nn.Module:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (256,), generator=g)
            loss = F.cross_entropy(model(view(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    teacher = train(nn.Sequential(nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, classes)), 600, 3e-3)
    student = train(nn.Linear(dim, classes), 150, 3e-3)
    with torch.no_grad():
        v = view(x)
        return teacher(v), student(v), y


def losses(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
    """name -> (loss value, gradient w.r.t. z)."""
    out = {}
    for name, fn in (("kd4", lambda a: kd_loss(a, t, 4.0)), ("kd1", lambda a: kd_loss(a, t, 1.0)),
                     ("ofa", lambda a: ofa_loss(a, t, y))):
        zz = z.clone().requires_grad_(True)
        loss = fn(zz)
        loss.backward()
        out[name] = (loss.item(), zz.grad)
    return out


def compare(z, y, t, exact, t_hat) -> dict[str, float]:
    got = losses(z, t_hat, y)
    row = {}
    for name, (value, grad) in exact.items():
        row[f"{name}_loss_rel"] = abs(got[name][0] - value) / abs(value)
        row[f"{name}_grad_rel"] = float((got[name][1] - grad).norm() / grad.norm())
    row["align_abs"] = float((cosine_rows(z, t_hat) - cosine_rows(z, t)).abs().mean())
    return row


def decode(t: torch.Tensor, fmt: str, k: int | None, temperature: float, tails: tuple[float, ...] | None = None):
    record = tc.RecordFormat.make(t.shape[1], fmt, k, temperature)
    if tails is not None:
        record = tc.RecordFormat(record.fmt, record.num_classes, record.k, tails)
    codec = Codec(record, temperature)
    return codec.decode(codec.encode(t)), codec.bytes_per_sample()


def measure(classes: int, ks: list[int], preset: str) -> dict:
    t0 = time.perf_counter()
    t, z, y = synthetic_task(classes, preset)
    p = t.softmax(-1)
    info = {"classes": classes, "preset": preset, "samples": len(y), "teacher_acc": float((t.argmax(-1) == y).float().mean()),
            "student_acc": float((z.argmax(-1) == y).float().mean()), "teacher_top1_prob": float(p.max(-1).values.mean()),
            "teacher_top1_prob_T4": float((t / 4).softmax(-1).max(-1).values.mean()),
            "setup_s": round(time.perf_counter() - t0, 1)}
    exact = losses(z, t, y)
    rows = []
    for fmt, k in [("fp16", None)] + [("topk", k) for k in ks if k < classes]:
        t1, nbytes = decode(t, fmt, k, 1.0)  # OFA / KD at T=1 decode at tau = 1, KD at T=4 at T = 4
        t4, _ = decode(t, fmt, k, 4.0)
        r1, r4 = compare(z, y, t, exact, t1), compare(z, y, t, exact, t4)
        row = {"format": fmt, "k": k, "bytes_per_sample": nbytes,
               **{key: r1[key] for key in r1 if not key.startswith("kd4")},
               **{key: r4[key] for key in r4 if key.startswith("kd4")}}
        if fmt == "topk":
            row["tail_mass"] = float(1 - p.topk(k, -1).values.sum(-1).mean())
            only1, _ = decode(t, fmt, k, 1.0, tails=(1.0,))
            r = compare(z, y, t, exact, only1)
            row.update(kd4_loss_rel_tail_T1_only=r["kd4_loss_rel"], kd4_grad_rel_tail_T1_only=r["kd4_grad_rel"])
        rows.append(row)
    return {**info, "rows": rows}


def render(res: dict) -> str:
    lines = [f"{res['classes']} classes, {res['preset']} teacher, {res['samples']} views: teacher acc {100 * res['teacher_acc']:.1f}% "
             f"(mean top-1 prob {res['teacher_top1_prob']:.3f}; {res['teacher_top1_prob_T4']:.3f} at T=4), "
             f"student acc {100 * res['student_acc']:.1f}%",
             "| format | bytes/sample | tail mass | KD T=4 loss / grad | (tail at T=1 only) | KD T=1 loss / grad | "
             "OFA loss / grad | align |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    e = lambda v: f"{v:.1e}"  # noqa: E731
    for r in res["rows"]:
        name = "fp16 full" if r["format"] == "fp16" else f"top-{r['k']}"
        t1only = (f"{e(r['kd4_loss_rel_tail_T1_only'])} / {e(r['kd4_grad_rel_tail_T1_only'])}"
                  if "kd4_loss_rel_tail_T1_only" in r else "-")
        tail = f"{100 * r['tail_mass']:.2g}%" if "tail_mass" in r else "-"
        lines.append(f"| {name} | {r['bytes_per_sample']} | {tail} | {e(r['kd4_loss_rel'])} / {e(r['kd4_grad_rel'])} | {t1only} | "
                     f"{e(r['kd1_loss_rel'])} / {e(r['kd1_grad_rel'])} | {e(r['ofa_loss_rel'])} / {e(r['ofa_grad_rel'])} | "
                     f"{e(r['align_abs'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="100,1000")
    ap.add_argument("--ks", default="5,10,20,50,100")
    ap.add_argument("--presets", default="soft,confident", help=f"teachers: {', '.join(PRESETS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ks = [int(v) for v in a.ks.split(",")]
    results = []
    for classes in (int(v) for v in a.classes.split(",")):
        for preset in a.presets.split(","):
            res = measure(classes, ks, preset)
            results.append(res)
            print(render(res), end="\n\n", flush=True)
    print(f"default: fp16 full logits up to {tc.FULL_LOGITS_MAX_CLASSES} classes and for KD at T != 1; else "
          f"top-{tc.DEFAULT_TOPK}, the tail mass kept at T = {', '.join(f'{v:g}' for v in tc.TAIL_TEMPERATURES)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "torch": torch.__version__, "threads": a.threads}, f, indent=2)


if __name__ == "__main__":
    main()
