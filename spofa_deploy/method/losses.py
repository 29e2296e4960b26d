"""Distillation losses and their closed-form logit gradients (SPOFA spec sections 2-3).

All functions are pure and free of host synchronisation, so they can sit inside a
`torch.compile`d / CUDA-graphed training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ofa_loss", "logit_gradients", "kd_loss", "cosine_rows"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Softmax/log-softmax in bf16/fp16 lose too much for a loss whose targets are
    # probabilities: compute in float32 at least, keep float64 when given.
    return torch.promote_types(x.dtype, torch.float32)


def _hard_one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # Soft labels (mixup, cutmix, smoothing) collapse to the one-hot of their argmax:
    # target enhancement needs the class the sample "is". Decided on shape, not values.
    if labels.dim() == 2:
        labels = labels.argmax(dim=-1)
    return F.one_hot(labels.long(), num_classes).to(dtype)


def _ofa_target(
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    temperature: float,
) -> torch.Tensor:
    """w = (softmax(t / tau) + y) ** eps - y, the enhanced teacher target."""
    p_t = torch.softmax(teacher_logits.detach().to(y.dtype) / temperature, dim=-1)
    return (p_t + y).pow(eps) - y


def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """OFA loss with target enhancement: -sum_c w_c * log_softmax(z / tau)_c.

    Args:
        student_logits: (N, C) student (or stage head) logits z.
        teacher_logits: (N, C) teacher logits t, treated as constants.
        labels: (N,) class indices or (N, C) soft labels (their argmax is used).
        eps: target-enhancement exponent; 1.0 gives w = softmax(t / tau).
        temperature: softmax temperature tau.
        reduction: "mean", "sum" or "none" (per-sample (N,)).

    Returns:
        The loss in float32 (or float64 for float64 inputs).
    """
    dtype = _compute_dtype(student_logits)
    z = student_logits.to(dtype)
    y = _hard_one_hot(labels, z.shape[-1], dtype)
    w = _ofa_target(teacher_logits, y, eps, temperature)
    loss = -(w * F.log_softmax(z / temperature, dim=-1)).sum(dim=-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}: use 'mean', 'sum' or 'none'")


@torch.no_grad()
def logit_gradients(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample closed-form gradients of CE and of the OFA loss w.r.t. the logits.

    Replaces the reference's second autograd pass: with p = softmax(z / tau),
    dL_ofa/dz = (p * sum_c w_c - w) / tau and dCE/dz = softmax(z) - y.
    CE uses the hard one-hot y even when training uses a smoothed CE (as the reference).

    Args:
        student_logits: (N, C) logits z.
        teacher_logits: (N, C) teacher logits t.
        labels: (N,) class indices or (N, C) soft labels (their argmax is used).
        eps: target-enhancement exponent of the OFA loss.
        temperature: temperature tau of the OFA loss (CE is always at tau = 1).

    Returns:
        (g_gt, g_kd), each (N, C), detached, in float32 or float64.
    """
    dtype = _compute_dtype(student_logits)
    z = student_logits.detach().to(dtype)
    y = _hard_one_hot(labels, z.shape[-1], dtype)
    w = _ofa_target(teacher_logits, y, eps, temperature)
    g_gt = torch.softmax(z, dim=-1) - y
    # sum_c w_c is 1 only when eps == 1: keep it general.
    g_kd = (torch.softmax(z / temperature, dim=-1) * w.sum(dim=-1, keepdim=True) - w) / temperature
    return g_gt, g_kd


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Hinton KD: KL(softmax(t / T) || softmax(z / T)) * T^2, averaged over the batch.

    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    dtype = _compute_dtype(student_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature**2)


def cosine_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) tensors, (N,); 0 for all-zero rows.

    The product of norms is clamped (not each norm), so a zero row gives exactly 0
    instead of NaN, and nothing is read back to the host.
    """
    dtype = _compute_dtype(a)
    a, b = a.to(dtype), b.to(dtype)
    dot = (a * b).sum(dim=-1)
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
