"""The training loop shared by the teacher stage and every distillation method.

Reads top to bottom: set up (device, AMP, optimizer, schedule, EMA), maybe resume,
then per epoch: train steps -> evaluate -> checkpoint. The run's files are written by
`run_files` (checkpoint, metrics, trace); the seams where callers and extensions hook in
are `hooks.Hooks` (a run's own, plus those installed process-wide with `add_hooks`).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spofa_deploy import run_files

from spofa_deploy.train import distributed
from spofa_deploy.accuracy import topk_correct
from spofa_deploy.console import progress
from spofa_deploy.data.datasets import Splits
from spofa_deploy.method.distillers import TrainTask
from spofa_deploy.errors import TrainingDiverged, UserError
from spofa_deploy.train.hooks import Hooks, active_hooks
from spofa_deploy.data.loaders import AugSeeded, EpochSampler, make_loader
from spofa_deploy.machine import resolve_device
from spofa_deploy.run_files import CHECKPOINT, TRACE, TraceWriter, load_checkpoint
from spofa_deploy.train.tensorboard import TensorBoard

_log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings (one set for the teacher stage, one for distillation)."""

    # Defaults: the student recipe measured on digits (docs/results.md, "The main command on digits"): SGD at
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
    # Per-term gradient norms on the student (one extra backward per loss term) in the trace row
    # every N steps; 0: off. Not under DDP (autograd.grad beside DDP's reducer). A traced SPOFA step costs
    # about 2.3x an untraced one on the CPU (docs/results.md), so every 50th step adds about 3 %.
    grad_norms_every: int = 50
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


def resumed_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The settings a resumed run trains with: what shapes the result comes from its checkpoint (`saved`, an exact
    resume); where it runs and the NaN policy from the command line."""
    return TrainConfig(**{**asdict(cfg), **saved, "device": cfg.device, "workers": cfg.workers, "on_nan": cfg.on_nan})


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
        c1, c5 = topk_correct(logits, labels)
        correct1, correct5 = correct1 + c1, correct5 + c5
        n += labels.numel()
    model.train(was_training)
    totals = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64)
                          for v in (correct1, correct5, loss_sum, n)])
    c1, c5, ls, n = distributed.all_reduce_sum(totals).tolist()
    n = max(n, 1)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": ls / n}


@dataclass
class _Loop:
    """Everything `fit` sets up once, and the state its seams advance."""

    task: TrainTask
    model: nn.Module  # `task`, or `task` wrapped in DDP
    cfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module
    train_loader: object
    val_loader: object
    total: int  # optimizer steps of the whole run
    ckpt_path: Path
    run_dir: Path
    label: str
    trace: "TraceWriter | None"
    run_info: dict = field(default_factory=dict)  # what the caller trained (method, loss settings): kept in checkpoints
    teacher_cache: object | None = None  # a `teacher_cache.TeacherCache`: teacher logits read back, not recomputed
    start_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "source": "model"})
    seen: int = 0
    loss_ema: float | None = None
    nan_skips: int = 0
    last_acc: str = ""
    on_record: Callable[[str, int, dict], None] | None = None  # `Hooks.on_record`


def fit(task: TrainTask, splits: Splits, cfg: TrainConfig, run_dir: Path, *, resume: bool = False,
        label: str = "train", hooks: Hooks | None = None, run_info: dict | None = None,
        teacher_cache=None) -> FitResult:
    """Train `task` on `splits`, evaluating every epoch and checkpointing into `run_dir`.

    Args:
        task: a `TrainTask` (its `.net` is the shipped model; a teacher inside stays frozen).
        splits: train/val datasets.
        cfg: optimisation settings.
        run_dir: folder for `checkpoint-last.pt`, `metrics.jsonl`, `trace.csv`.
        resume: continue from `checkpoint-last.pt` (same settings, exact same result).
        label: name shown on the progress bar.
        hooks: callbacks at the seams; `hooks.on_best` is where the caller writes the shipped model.
            Hooks installed with `add_hooks` when the run starts are called after these.
        run_info: plain data saved in every checkpoint under "run" (the caller checks it on resume).
        teacher_cache: a `teacher_cache.TeacherCache` of this run's training views: the teacher's
            logits are read from it where present, else computed and stored (one file per epoch).
    """
    loop = _setup(task, splits, cfg, run_dir, resume, label)
    loop.run_info, loop.teacher_cache = dict(run_info or {}), teacher_cache
    board = TensorBoard.open(run_dir) if distributed.info().is_main else None
    hooks = active_hooks(hooks, board.hooks() if board else None)
    loop.on_record = hooks.on_record
    t_start = time.perf_counter()
    try:
        with progress(disable=not distributed.info().is_main) as bar:
            job = bar.add_task(label, total=loop.total, completed=loop.step, info="")
            for epoch in range(loop.start_epoch, loop.cfg.epochs):
                t_epoch = time.perf_counter()
                n, loss_sum = _train_one_epoch(loop, epoch, hooks, lambda info: bar.update(job, advance=1, info=info))
                _end_of_epoch(loop, epoch, n, loss_sum, t_epoch, hooks)
    finally:
        if board:
            board.close()
    epochs = [h for h in loop.history if "val_top1" in h]
    final = epochs[-1] if epochs else {"val_top1": 0.0, "val_top5": 0.0, "ema_top1": 0.0}
    secs = time.perf_counter() - t_start
    return FitResult(final["val_top1"], final["val_top5"], final["ema_top1"], loop.best["top1"], loop.best["source"],
                     len(epochs), secs, loop.seen / max(secs, 1e-9), loop.history)


def _setup(task: TrainTask, splits: Splits, cfg: TrainConfig, run_dir: Path, resume: bool, label: str) -> _Loop:
    """Device, AMP, optimizer, schedule, EMA, loaders; then the checkpoint's state on resume."""
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    cfg.validate()
    dist = distributed.info()
    device = resolve_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)  # one GPU per rank
    if cfg.batch_size % dist.world:
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must divide by the {dist.world} ranks")
    ckpt_path = run_dir / CHECKPOINT
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        cfg = resumed_config(cfg, state["config"])
        if dist.is_main:
            _log.info(f"resuming {label} from {ckpt_path} (epoch {state['epoch']}/{cfg.epochs})")

    if dist.enabled and device.type == "cuda":
        # Per-rank BatchNorm statistics would make N GPUs train a different model than one:
        # SyncBatchNorm keeps the global-batch statistics (it needs GPUs; on CPU/gloo BN stays per rank).
        task.net = nn.SyncBatchNorm.convert_sync_batchnorm(task.net)
    task.to(device)
    if device.type == "cuda":
        task.to(memory_format=torch.channels_last)  # 1.6x for depthwise CNNs at large batch (measured on an H200)
    optimizer = create_optimizer_v2(task, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The student (+ heads) is replicated by DDP; the frozen teacher inside has no
    # trainable parameters, so DDP only broadcasts it once at start.
    model = (torch.nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
             if dist.enabled else task)

    # --batch-size is the global batch: each rank takes batch/world, the union of the ranks'
    # batches at step k is the single-process batch k, so the learning rate needs no scaling.
    train_loader = make_loader(AugSeeded(splits.train, cfg.seed, with_index=True), cfg.batch_size // dist.world,
                               train=True, seed=cfg.seed,
                               workers=cfg.workers, pin_memory=device.type == "cuda",
                               sampler=EpochSampler(torch.utils.data.distributed.DistributedSampler(
                                   splits.train, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=cfg.seed)))
    val_shard = torch.utils.data.Subset(splits.val, range(dist.rank, len(splits.val), dist.world))
    val_loader = make_loader(val_shard, cfg.batch_size * 2, train=False, workers=cfg.workers,
                             pin_memory=device.type == "cuda")
    total = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(cfg.warmup_epochs * len(train_loader))))
    amp = resolve_amp(cfg.amp, device)
    loop = _Loop(task=task, model=model, cfg=cfg, device=device, amp=amp, optimizer=optimizer,
                 scheduler=scheduler, scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                 ema=ModelEmaV3(task.net, decay=cfg.ema_decay, use_warmup=True), train_loader=train_loader,
                 val_loader=val_loader, total=total, ckpt_path=ckpt_path, run_dir=run_dir, label=label, trace=None)
    if state is not None:
        task.net.load_state_dict(state["net"])
        if task.extra_state() is not None:
            task.extra_state().load_state_dict(state["extra"])
        for name in ("ema", "optimizer", "scheduler", "scaler"):
            getattr(loop, name).load_state_dict(state[name])
        loop.start_epoch, loop.step, loop.history, loop.best = state["epoch"], state["step"], state["history"], state["best"]
    if dist.is_main:
        loop.trace = TraceWriter(run_dir / TRACE, keep_until_step=loop.step if state is not None else None)
    return loop


def _train_one_epoch(loop: _Loop, epoch: int, hooks: Hooks, advance: Callable[[str], None]) -> tuple[int, float]:
    """One pass over the training data; returns (images trained on, their summed loss)."""
    cfg, task = loop.cfg, loop.task
    torch.manual_seed(cfg.seed + epoch)  # model-side randomness (dropout, drop-path) per epoch
    loop.train_loader.sampler.set_epoch(epoch)
    task.train()
    t_epoch, n_epoch, loss_sum = time.perf_counter(), 0, 0.0
    for images, labels, indices in loop.train_loader:
        images = images.to(loop.device, non_blocking=True)
        labels = labels.to(loop.device, non_blocking=True)
        if loop.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        if cfg.on_nan == "skip":  # a non-finite forward also poisons BatchNorm running stats
            saved_buffers = [b.detach().clone() for b in task.buffers()]
        step = loop.step
        before = (lambda: hooks.before_update(step)) if hooks.before_update else None
        on_loss = (lambda loss: hooks.on_loss(step, loss)) if hooks.on_loss else None
        teacher = (loop.teacher_cache, epoch, indices) if loop.teacher_cache is not None else None
        logged = loop.trace is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == loop.total)
        norms = logged and cfg.grad_norms_every > 0 and (step + 1) % cfg.grad_norms_every == 0 and loop.model is task
        out, loss_value, finite = train_step(loop.model, images, labels, loop.optimizer, loop.scaler, loop.amp,
                                             cfg.clip_grad, before_update=before, on_loss=on_loss, teacher=teacher,
                                             grad_norms=norms)
        # The schedule follows the step count, skipped steps included, so it ends where it should.
        with warnings.catch_warnings():  # (a skipped first step has no optimizer.step() before this: intended)
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            loop.scheduler.step()
        loop.step += 1
        if not finite:
            if cfg.on_nan == "skip":
                torch._foreach_copy_(list(task.buffers()), saved_buffers)
            _nonfinite(loop, epoch, step, loss_value)
            advance(f"epoch {epoch + 1}/{cfg.epochs} skipped a non-finite step")
            continue
        loop.nan_skips = 0
        loop.ema.update(task.net, step=step)
        if loop.loss_ema is not None and loss_value > cfg.spike_factor * loop.loss_ema:
            loop.history.append({"event": "loss_spike", "step": step, "epoch": epoch, "loss": loss_value,
                                 "running_mean": loop.loss_ema})
        loop.loss_ema = loss_value if loop.loss_ema is None else 0.98 * loop.loss_ema + 0.02 * loss_value
        n_epoch += labels.shape[0]
        loss_sum += loss_value * labels.shape[0]
        if loop.trace and (loop.step % cfg.log_every == 0 or loop.step == loop.total):
            _trace_row(loop, epoch, loss_value, out.stats)
        rate = n_epoch / max(1e-9, time.perf_counter() - t_epoch)
        advance(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f} {rate:,.0f} img/s{loop.last_acc}")
    if loop.teacher_cache is not None and distributed.info().is_main:
        loop.teacher_cache.commit(epoch)  # atomic; never raises: a failed write only warns
        for w in loop.teacher_cache.pop_warnings():
            _log.warning(w)
    return n_epoch, loss_sum


def _nonfinite(loop: _Loop, epoch: int, step: int, loss_value: float) -> None:
    """Record a skipped step; stop (keeping the last good checkpoint) per the NaN policy."""
    loop.nan_skips += 1
    loop.history.append({"event": "nonfinite", "step": step, "epoch": epoch, "loss": str(loss_value)})
    if loop.cfg.on_nan == "stop" or loop.nan_skips > loop.cfg.max_nan_skips:
        if distributed.info().is_main:
            run_files.write_metrics(loop.run_dir, loop.history)
        raise TrainingDiverged(f"{loop.label}: loss/gradients became non-finite at step {step} (epoch {epoch + 1}); "
                               f"the last good checkpoint is kept. Try a lower --lr or --clip-grad 1.0")


def _trace_row(loop: _Loop, epoch: int, loss_value: float, stats: dict[str, torch.Tensor]) -> None:
    row = {"step": loop.step, "epoch": epoch + 1, "lr": loop.scheduler.get_last_lr()[0], "loss": loss_value}
    keys = list(stats)
    vals = torch.stack([stats[k].float() for k in keys]).tolist() if keys else []  # one host read for all
    row.update({k: round(v, 6) for k, v in zip(keys, vals)})
    loop.trace.write(row)
    if loop.on_record:
        loop.on_record("trace", loop.step, row)


def _end_of_epoch(loop: _Loop, epoch: int, n_epoch: int, loss_sum: float, t_epoch: float, hooks: Hooks) -> None:
    """Evaluate the model and its EMA, track the best (hooks.on_best writes it), checkpoint."""
    is_main = distributed.info().is_main
    if hooks.on_eval:
        hooks.on_eval(loop.step)
    loop.seen += n_epoch
    m = evaluate(loop.task.net, loop.val_loader, loop.device, loop.amp)
    e = evaluate(loop.ema.module, loop.val_loader, loop.device, loop.amp)
    secs = time.perf_counter() - t_epoch  # the epoch's wall time, its evaluation included
    rec = {"epoch": epoch + 1, "step": loop.step, "lr": loop.scheduler.get_last_lr()[0],
           "train_loss": loss_sum / max(1, n_epoch), "val_top1": m["top1"], "val_top5": m["top5"],
           "val_loss": m["loss"], "ema_top1": e["top1"], "ema_top5": e["top5"],
           "img_per_s": n_epoch / max(secs, 1e-9), "seconds": secs}
    loop.history.append(rec)
    if loop.on_record and is_main:
        loop.on_record("epoch", loop.step, rec)
    loop.last_acc = f" | val {m['top1']:.1f}% ema {e['top1']:.1f}%"
    source = "ema" if e["top1"] > m["top1"] else "model"
    if max(m["top1"], e["top1"]) > loop.best["top1"]:
        loop.best = {"top1": max(m["top1"], e["top1"]), "source": source, "epoch": epoch + 1,
                     "model_top1": m["top1"], "model_top5": m["top5"], "ema_top1": e["top1"], "ema_top5": e["top5"]}
        if hooks.on_best and is_main:
            hooks.on_best(loop.ema.module if source == "ema" else loop.task.net, loop.best)
    if hooks.on_checkpoint:
        hooks.on_checkpoint(loop.step)
    extra = loop.task.extra_state()
    if is_main:
        run_files.save_checkpoint(loop.ckpt_path, {
            "epoch": epoch + 1, "step": loop.step, "config": asdict(loop.cfg), "history": loop.history,
            "best": loop.best, "net": loop.task.net.state_dict(), "extra": extra.state_dict() if extra is not None else {},
            "ema": loop.ema.state_dict(), "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(), "scaler": loop.scaler.state_dict(), "run": loop.run_info})
        run_files.write_metrics(loop.run_dir, loop.history)
    distributed.barrier()  # no rank runs ahead of the checkpoint it might resume from


def train_step(task: TrainTask, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp: torch.dtype | None, clip_grad: float | None = None,
               before_update: Callable[[], None] | None = None,
               on_loss: Callable[[torch.Tensor], torch.Tensor] | None = None, teacher: tuple | None = None,
               grad_norms: bool = False):
    """One optimisation step with a NaN/Inf guard.

    The guard is the step's only host read: the loss and the global gradient norm come
    back together in one transfer, and a non-finite value skips the update, so a bad
    batch never reaches the weights. (With fp16 the GradScaler also skips inf steps.)

    `before_update()`: called after backward, before the update (the gradients are readable).
    `on_loss(loss) -> loss`: replaces the step's loss before its backward (`Hooks.on_loss`).
    `teacher`: (cache, epoch, sample indices) to take the teacher's logits from the teacher cache.
    `grad_norms`: also put into `out.stats` the gradient norm on the student of each loss term
    (`gnorm_<term>`, one extra backward each), of the total (`gnorm_total`) and the norm of the
    student's parameter update (`update_norm`): device tensors, read with the trace row.

    Returns:
        (StepOutput, loss value, finite)
    """
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        t = getattr(task, "module", task).cached_teacher_logits(images, *teacher) if teacher else None
        out = task(images, labels, t) if t is not None else task(images, labels)  # (DDP: backward all-reduces)
    if on_loss:
        out.loss = on_loss(out.loss)
    student = [p for p in getattr(task, "module", task).net.parameters() if p.requires_grad] if grad_norms else []
    # A single term's gradient is the total's: read after the backward below, without an extra one.
    extra = out.terms if len(out.terms) > 1 or on_loss else {}
    if grad_norms:
        out.stats.update(_term_grad_norms(extra, student))
    scaler.scale(out.loss).backward()
    if before_update:
        before_update()
    scaler.unscale_(optimizer)
    if grad_norms:
        out.stats["gnorm_total"] = _norm([p.grad for p in student if p.grad is not None])
        out.stats.update({f"gnorm_{name}": out.stats["gnorm_total"] for name in out.terms if name not in extra})
        weights_before = [p.detach().clone() for p in student]
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
        if grad_norms:
            out.stats["update_norm"] = _norm(torch._foreach_sub([p.detach() for p in student], weights_before))
    optimizer.zero_grad(set_to_none=True)
    return out, loss_value, finite


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of a list of tensors, on their device (no host read)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))) if tensors else torch.zeros(())


def _term_grad_norms(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`gnorm_<term>`: the norm of each weighted loss term's gradient as it reaches the student's weights."""
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"gnorm_{name}"] = _norm([g for g in grads if g is not None]).detach()
    return out

