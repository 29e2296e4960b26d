"""Top-k accuracy counts: the one definition training evaluation, export and bench share."""
from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """How many rows of `logits` have their label among the top k classes, for each k in `ks`.

    k is capped at the number of classes (top-5 of a 3-class model is top-3). The counts
    stay on the logits' device (no host sync), so a loop can sum them and read them once.

    Args:
        logits: (N, C) scores.
        labels: (N,) class indices.
        ks: the k values.

    Returns:
        One 0-d integer tensor per k.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.to(top.device)[:, None]
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]
