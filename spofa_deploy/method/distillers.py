"""Training tasks: a plain supervised model and the distillers (none, kd, ofa, spofa).

Every task is an `nn.Module` whose `forward(images, labels)` returns a `StepOutput`:
the loss to back-propagate, the shipped model's logits, and a dict of 0-d device
tensors for the trace. Nothing in a forward pass reads a value back to the host, so
the step can be compiled or CUDA-graphed; the trainer reads the stats every N steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spofa_deploy.method.heads import build_heads
from spofa_deploy.method.losses import cosine_rows, kd_loss, logit_gradients, ofa_loss
from spofa_deploy.method.mema import MEMA
from spofa_deploy.models import embed_dim, forward_with_stages, stage_taps


@dataclass
class DistillConfig:
    """Loss settings of a distillation method (docs/method.md)."""

    method: str = "spofa"
    gt_weight: float = 1.0  # l_gt: cross-entropy with the labels
    kd_weight: float = 1.0  # l_kd: distillation on the final logits
    feat_weight: float = 1.0  # l_ofa: distillation through the stage heads
    eps: float = 1.0  # target-enhancement exponent on the final logits
    stage_eps: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    temperature: float = 1.0  # OFA temperature tau
    kd_temperature: float = 4.0  # Hinton KD temperature
    label_smoothing: float = 0.0
    mema: bool = True  # both MEMA levels (False: the --no-mema ablation)
    sample_weights: bool = True  # output-level beta_i (False: the feature-level scaler alone)
    momentum: float = 0.99
    lambda_feat: float = 5.0
    lambda_out: float = 2.0
    alpha_max: float = 2.0  # upper clip of the MEMA stage weights (1.0: the damp-only ablation)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class StepOutput:
    """What a task's forward returns. `terms` are the weighted loss terms that sum to `loss` (still in the
    graph): the trainer measures each one's gradient norm on the student every few steps."""

    loss: torch.Tensor
    logits: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainTask(nn.Module):
    """Base of everything the trainer trains. `net` is the model that is shipped."""

    net: nn.Module

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def extra_state(self) -> nn.Module | None:
        """Training-only modules (heads, scaler) saved in checkpoints beside `net`."""
        return None


class Supervised(TrainTask):
    """Plain cross-entropy training of one model (the teacher stage, and method `none`)."""

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.net = net
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits=None) -> StepOutput:
        logits = self.net(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits, {"loss_gt": loss.detach()}, {"ce": loss})


class Distiller(TrainTask):
    """Holds a trainable student and a frozen teacher; the teacher stays in eval mode."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig):
        super().__init__()
        self.net = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # dropout / BN statistics of the teacher never change
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's logits of `images`, or `t` when the caller has them already (the teacher cache)."""
        return self.teacher(images).float() if t is None else t

    @torch.no_grad()
    def cached_teacher_logits(self, images: torch.Tensor, cache, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        """From the teacher cache (`spofa_deploy.teacher.cache`) where it has them, else run the teacher and store.

        Outside `forward`, so the cache's host I/O never enters a compiled or captured step. The
        logits returned are what a later read gives back, so cold and warm runs see the same targets.
        """
        t = cache.get(epoch, indices)
        if t is not None:
            return t.to(images.device, non_blocking=True)
        return cache.put(epoch, indices, self.teacher_logits(images))

    def ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)


class KD(Distiller):
    """Hinton KD: CE + KL at a temperature on the final logits."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> StepOutput:
        c = self.cfg
        t = self.teacher_logits(images, teacher_logits)
        z = self.net(images)
        loss_gt, loss_kd = self.ce(z, labels), kd_loss(z, t, c.kd_temperature)
        terms = {"ce": c.gt_weight * loss_gt, "kd": c.kd_weight * loss_kd}
        loss = terms["ce"] + terms["kd"]
        # Diagnostic only: agreement of the CE and KD logit gradients (dKD/dz = T (q_s - q_t)).
        with torch.no_grad():
            zf = z.detach().float()
            g_gt = torch.softmax(zf, -1) - F.one_hot(labels, zf.shape[-1]).float()
            g_kd = torch.softmax(zf / c.kd_temperature, -1) - torch.softmax(t / c.kd_temperature, -1)
            cos = cosine_rows(g_gt, g_kd).mean()
        return StepOutput(loss, z, {"loss_gt": loss_gt.detach(), "loss_kd": loss_kd.detach(), "grad_cos_mean": cos}, terms)


class OFA(Distiller):
    """OFA-KD, and SPOFA on top of it (`layer_norm=True` heads plus the MEMA scaler).

    `ofa`: heads without LayerNorm, fixed stage and sample weights (alpha = beta = 1).
    `spofa`: LayerNorm decoupling heads; alpha_k and beta_i from the MEMA scaler.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, num_classes: int,
                 layer_norm: bool, sync: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(student, teacher, cfg)
        self.taps = stage_taps(student)
        if len(cfg.stage_eps) != len(self.taps):
            raise ValueError(f"stage_eps needs {len(self.taps)} values, got {len(cfg.stage_eps)}")
        dim = max(embed_dim(student), embed_dim(teacher))
        self.heads = build_heads([t.channels for t in self.taps], [t.reduction for t in self.taps],
                                 dim, num_classes, layer_norm=layer_norm)
        self.use_mema = layer_norm and cfg.mema
        self.mema = (MEMA(len(self.taps), cfg.momentum, cfg.lambda_feat, cfg.lambda_out, sync=sync, alpha_max=cfg.alpha_max)
                     if self.use_mema else None)

    def extra_state(self) -> nn.Module:
        return nn.ModuleDict({"heads": self.heads, **({"mema": self.mema} if self.mema is not None else {})})

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> StepOutput:
        c = self.cfg
        t = self.teacher_logits(images, teacher_logits)
        z, feats = forward_with_stages(self.net, images, self.taps)
        stage_logits = [head(f) for head, f in zip(self.heads, feats)]
        hard = labels.argmax(-1) if labels.dim() == 2 else labels
        stats: dict[str, torch.Tensor] = {}

        # Output level: per-sample weights from the agreement of the CE and OFA gradients.
        with torch.no_grad():
            g_gt, g_kd = logit_gradients(z.detach(), t, hard, c.eps, c.temperature)
            grad_cos = cosine_rows(g_gt, g_kd)
            if self.use_mema and c.sample_weights:
                beta = self.mema.sample_weights(grad_cos)
                stats["grad_cos_baseline"] = self.mema.out_baseline.clone()
            else:
                beta = torch.ones_like(grad_cos)
        loss_gt = self.ce(z, labels)
        loss_kd = (beta * ofa_loss(z, t, hard, c.eps, c.temperature, reduction="none")).mean()

        # Feature level: per-stage weights from each head's alignment with the teacher.
        with torch.no_grad():
            align = torch.stack([cosine_rows(zk.detach(), t).mean() for zk in stage_logits])
            alpha = self.mema.stage_weights(align) if self.use_mema else torch.ones_like(align)
        stage_losses = torch.stack([ofa_loss(zk, t, hard, e, c.temperature) for zk, e in zip(stage_logits, c.stage_eps)])
        loss_feat = (alpha * stage_losses).sum()

        terms = {"ce": c.gt_weight * loss_gt, "kd": c.kd_weight * loss_kd,
                 **{f"stage{k}": c.feat_weight * alpha[k] * stage_losses[k] for k in range(len(stage_logits))}}
        loss = c.gt_weight * loss_gt + c.kd_weight * loss_kd + c.feat_weight * loss_feat
        stats.update(loss_gt=loss_gt.detach(), loss_kd=loss_kd.detach(), loss_feat=loss_feat.detach(),
                     grad_cos_mean=grad_cos.mean(), beta_mean=beta.mean(), beta_min=beta.min())
        for k in range(len(stage_logits)):
            stats[f"align_{k}"] = align[k]
            stats[f"alpha_{k}"] = alpha[k]
        return StepOutput(loss, z, stats, terms)


METHODS = ("spofa", "ofa", "kd", "none")


def create_task(method: str, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig,
                num_classes: int, sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainTask:
    """Build the training task of a method: `none` | `kd` | `ofa` | `spofa`."""
    if method == "none":
        return Supervised(student, cfg.label_smoothing)
    if teacher is None:
        raise ValueError(f"method {method} needs a teacher")
    if method == "kd":
        return KD(student, teacher, cfg)
    if method in ("ofa", "spofa"):
        return OFA(student, teacher, cfg, num_classes, layer_norm=method == "spofa", sync=sync)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
