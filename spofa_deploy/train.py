"""The training loop shared by the teacher stage and every distillation method.

Reads top to bottom: set up (device, AMP, optimizer, schedule, EMA), maybe resume,
then per epoch: train steps -> evaluate -> checkpoint. Checkpoints are plain dicts of
tensors and numbers, written atomically and loaded with `weights_only=True`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .artifacts import atomic_path, write_json
from .console import console, progress
from . import distributed
from .data import Splits, make_loader
from .distillers import TrainTask
from .errors import TrainingDiverged, UserError

CHECKPOINT = "checkpoint-last.pt"
METRICS = "metrics.jsonl"
TRACE = "trace.csv"


@dataclass
class TrainConfig:
    """Optimisation settings (one set for the teacher stage, one for distillation)."""

    # Defaults: the student recipe measured on digits (README, "Measured results"): SGD at
    # 0.02 reached 98 % where AdamW at 2e-3 stalled near 85 % for MobileNetV3 from scratch.
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.02
    optimizer: str = "sgd"  # sgd (nesterov) | adamw
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    ema_decay: float = 0.999
    amp: str = "auto"  # auto | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    workers: int | None = None
    log_every: int = 10  # trace rows (and host reads of the step statistics) every N steps
    on_nan: str = "stop"  # stop | skip
    max_nan_skips: int = 5  # consecutive skipped steps before giving up
    spike_factor: float = 100.0  # loss > factor x running mean is logged as a spike

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"unknown optimizer '{self.optimizer}': use adamw or sgd")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise UserError(f"unknown --amp '{self.amp}': use auto, bf16, fp16 or off")
        if self.on_nan not in ("stop", "skip"):
            raise UserError(f"unknown --on-nan '{self.on_nan}': use stop or skip")


@dataclass
class FitResult:
    top1: float
    top5: float
    ema_top1: float
    best_top1: float
    best_source: str  # "model" or "ema"
    epochs_run: int
    seconds: float
    img_per_s: float
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda:N` checked against the GPUs; cuda without a GPU refused."""
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


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """AMP dtype: bf16 where the GPU supports it, else fp16; none on CPU unless asked."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to zero."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.inference_mode()
def evaluate(model: nn.Module, loader, device: torch.device, amp: torch.dtype | None = None) -> dict:
    """Top-1 / top-5 accuracy (in %) and mean CE loss of `model` over `loader`.

    Under torchrun each rank passes its own shard; the counts are summed over ranks,
    so the result is exact (no padded duplicates).
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = n = 0
    loss_sum = torch.zeros((), device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum()
        correct5 += (top == labels[:, None]).any(dim=1).sum()
        n += labels.numel()
    model.train(was_training)
    totals = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64)
                          for v in (correct1, correct5, loss_sum, n)])
    c1, c5, ls, n = distributed.all_reduce_sum(totals).tolist()
    n = max(n, 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ls / n}


class AugSeeded(torch.utils.data.Dataset):
    """Seeds the augmentation of each sample from (seed, epoch, index).

    So the same seed gives the same augmented images whatever the number of loader
    workers, and a resumed run sees exactly the images the uninterrupted one would.
    """

    def __init__(self, ds, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item
        torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
        return self.ds[index]


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler with `set_epoch` (e.g. DistributedSampler) to hand out (index, epoch)."""

    def __init__(self, base):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


def _checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    """Load a training checkpoint safely (`weights_only=True`: tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"no checkpoint to resume from: {path}") from e
    except Exception as e:  # truncated zip, a PNG, a pickle with code in it: never execute, just refuse
        raise UserError(f"{path} is not a readable spofa checkpoint ({str(e).splitlines()[0][:120]})") from e


class TraceWriter:
    """Appends rows to trace.csv; on resume keeps only rows up to the checkpoint's step."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path, self.fields = path, None
        if keep_until_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            kept = [r for r in rows if int(r["step"]) <= keep_until_step]
            if kept:
                self.fields = list(kept[0])
                self._rewrite(kept)
            else:
                path.unlink()

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        new = self.fields is None
        self.fields = self.fields or list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def fit(task: TrainTask, splits: Splits, cfg: TrainConfig, run_dir: Path, *, resume: bool = False,
        label: str = "train", on_best: Callable[[nn.Module, dict], None] | None = None,
        fault_hook: Callable[[str, int], None] | None = None) -> FitResult:
    """Train `task` on `splits`, evaluating every epoch and checkpointing into `run_dir`.

    Args:
        task: a `TrainTask` (its `.net` is the shipped model; a teacher inside stays frozen).
        splits: train/val datasets.
        cfg: optimisation settings.
        run_dir: folder for `checkpoint-last.pt`, `metrics.jsonl`, `trace.csv`.
        resume: continue from `checkpoint-last.pt` (same settings, exact same result).
        label: name shown on the progress bar.
        on_best: called with (model, record) whenever the val top-1 (model or EMA) improves;
            the caller writes the shipped artifact there.
        fault_hook: test hook, called with (phase, step) at fault-injection points.
    """
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    cfg.validate()
    dist = distributed.info()
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # one GPU per rank
    if cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must divide by the {dist.world} ranks")
    amp = resolve_amp(cfg.amp, device)
    ckpt_path = run_dir / CHECKPOINT
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        # What shapes the result comes from the checkpoint (exact resume); the NaN policy from the command line.
        cfg = TrainConfig(**{**asdict(cfg), **state["config"], "device": cfg.device, "workers": cfg.workers,
                             "on_nan": cfg.on_nan})
        dist.is_main and console.print(f"[bold]resuming[/] {label} from {ckpt_path} (epoch {state['epoch']}/{cfg.epochs})")

    if dist.enabled and device.type == "cuda":
        # Per-rank BatchNorm statistics would make N GPUs train a different model than one:
        # SyncBatchNorm keeps the global-batch statistics (it needs GPUs; on CPU/gloo BN stays per rank).
        task.net = nn.SyncBatchNorm.convert_sync_batchnorm(task.net)
    task.to(device)
    if device.type == "cuda":
        task.to(memory_format=torch.channels_last)  # 1.6x for depthwise CNNs at large batch (anchors.md)
    optimizer = create_optimizer_v2(task, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = ModelEmaV3(task.net, decay=cfg.ema_decay, use_warmup=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # The student (+ heads) is replicated by DDP; the frozen teacher inside has no
    # trainable parameters, so DDP only broadcasts it once at start.
    model = (torch.nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
             if dist.enabled else task)

    # --batch-size is the global batch: each rank takes batch/world, the union of the ranks'
    # batches at step k is the single-process batch k, so the learning rate needs no scaling.
    train_loader = make_loader(AugSeeded(splits.train, cfg.seed), cfg.batch_size // dist.world, train=True, seed=cfg.seed,
                               workers=cfg.workers, pin_memory=device.type == "cuda",
                               sampler=EpochSampler(torch.utils.data.distributed.DistributedSampler(
                                   splits.train, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)))
    val_shard = torch.utils.data.Subset(splits.val, range(dist.rank, len(splits.val), dist.world))
    val_loader = make_loader(val_shard, cfg.batch_size * 2, train=False, workers=cfg.workers,
                             pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(cfg.warmup_epochs * steps_per_epoch)))

    start_epoch, step, history, best = 0, 0, [], {"top1": -1.0, "source": "model"}
    if state is not None:
        task.net.load_state_dict(state["net"])
        if task.extra_state() is not None:
            task.extra_state().load_state_dict(state["extra"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
    trace = TraceWriter(run_dir / TRACE, keep_until_step=step if state is not None else None) if dist.is_main else None

    t_start, seen, loss_ema, nan_skips = time.perf_counter(), 0, None, 0
    last = {}
    with progress(disable=not dist.is_main) as bar:
        job = bar.add_task(label, total=total, completed=step, info="")
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed + epoch)  # model-side randomness (dropout, drop-path) per epoch
            train_loader.sampler.set_epoch(epoch)
            task.train()
            t_epoch, n_epoch, loss_sum = time.perf_counter(), 0, 0.0
            for images, labels in train_loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                if cfg.on_nan == "skip":  # a non-finite forward also poisons BatchNorm running stats
                    saved_buffers = [b.detach().clone() for b in task.buffers()]
                out, loss_value, finite = train_step(model, images, labels, optimizer, scaler, amp, cfg.clip_grad,
                                                     before_update=(lambda: fault_hook("step", step)) if fault_hook else None)
                if not finite:
                    if cfg.on_nan == "skip":
                        torch._foreach_copy_(list(task.buffers()), saved_buffers)
                    nan_skips += 1
                    history.append({"event": "nonfinite", "step": step, "epoch": epoch, "loss": str(loss_value)})
                    if cfg.on_nan == "stop" or nan_skips > cfg.max_nan_skips:
                        dist.is_main and _write_metrics(run_dir, history)
                        raise TrainingDiverged(
                            f"{label}: loss/gradients became non-finite at step {step} (epoch {epoch + 1}); "
                            f"the last good checkpoint is kept. Try a lower --lr or --clip-grad 1.0")
                    step += 1
                    bar.advance(job)
                    continue
                nan_skips = 0
                scheduler.step()
                ema.update(task.net, step=step)

                if loss_ema is not None and loss_value > cfg.spike_factor * loss_ema:
                    history.append({"event": "loss_spike", "step": step, "epoch": epoch, "loss": loss_value,
                                    "running_mean": loss_ema})
                loss_ema = loss_value if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_value
                n_epoch += labels.shape[0]
                loss_sum += loss_value * labels.shape[0]
                step += 1
                if trace and (step % cfg.log_every == 0 or step == total):
                    row = {"step": step, "epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "loss": loss_value}
                    keys = list(out.stats)
                    vals = torch.stack([out.stats[k].float() for k in keys]).tolist() if keys else []
                    row.update({k: round(v, 6) for k, v in zip(keys, vals)})
                    trace.write(row)
                rate = n_epoch / max(1e-9, time.perf_counter() - t_epoch)
                bar.update(job, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f} {rate:,.0f} img/s{last.get('acc', '')}")

            if fault_hook:
                fault_hook("eval", step)
            seen += n_epoch
            m = evaluate(task.net, val_loader, device, amp)
            e = evaluate(ema.module, val_loader, device, amp)
            secs = time.perf_counter() - t_epoch
            rec = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                   "train_loss": loss_sum / max(1, n_epoch), "val_top1": m["top1"], "val_top5": m["top5"],
                   "val_loss": m["loss"], "ema_top1": e["top1"], "ema_top5": e["top5"],
                   "img_per_s": n_epoch / secs, "seconds": secs}
            history.append(rec)
            last["acc"] = f" | val {m['top1']:.1f}% ema {e['top1']:.1f}%"
            source = "ema" if e["top1"] > m["top1"] else "model"
            if max(m["top1"], e["top1"]) > best["top1"]:
                best = {"top1": max(m["top1"], e["top1"]), "source": source, "epoch": epoch + 1,
                        "model_top1": m["top1"], "model_top5": m["top5"], "ema_top1": e["top1"], "ema_top5": e["top5"]}
                if on_best and dist.is_main:
                    on_best(ema.module if source == "ema" else task.net, best)
            if fault_hook:
                fault_hook("checkpoint", step)
            dist.is_main and _checkpoint(ckpt_path, {
                "epoch": epoch + 1, "step": step, "config": asdict(cfg), "history": history, "best": best,
                "net": task.net.state_dict(), "extra": task.extra_state().state_dict() if task.extra_state() else {},
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()})
            dist.is_main and _write_metrics(run_dir, history)
            distributed.barrier()  # no rank runs ahead of the checkpoint it might resume from

    epochs = [h for h in history if "val_top1" in h]
    final = epochs[-1] if epochs else {"val_top1": 0.0, "val_top5": 0.0, "ema_top1": 0.0}
    secs = time.perf_counter() - t_start
    return FitResult(final["val_top1"], final["val_top5"], final["ema_top1"], best["top1"], best["source"],
                     len(epochs), secs, seen / max(secs, 1e-9), history)


def train_step(task: TrainTask, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp: torch.dtype | None, clip_grad: float | None = None,
               before_update: Callable[[], None] | None = None):
    """One optimisation step with a NaN/Inf guard.

    The guard is the step's only host read: the loss and the global gradient norm come
    back together in one transfer, and a non-finite value skips the update, so a bad
    batch never reaches the weights. (With fp16 the GradScaler also skips inf steps.)

    Returns:
        (StepOutput, loss value, finite)
    """
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = task(images, labels)  # `task` may be DDP-wrapped: its backward all-reduces the gradients
    scaler.scale(out.loss).backward()
    if before_update:
        before_update()
    scaler.unscale_(optimizer)
    grads = [p.grad for p in getattr(task, "module", task).trainable() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else out.loss.new_zeros(())
    # Averaged over ranks, so a NaN on any rank makes every rank skip the same step.
    pair = distributed.all_reduce_mean(torch.stack([out.loss.detach().float(), norm.float()]))
    loss_value, norm_value = pair.tolist()
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled())
    if finite:
        if clip_grad:
            torch._foreach_mul_(grads, min(1.0, clip_grad / (norm_value + 1e-6)))
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return out, loss_value, finite


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
