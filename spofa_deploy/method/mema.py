"""MEMA dynamic scaler: momentum-EMA baselines that weight stages and samples (spec section 3).

The baselines live in buffers on the training device, so they follow `.to(device)`,
are saved in checkpoints, and are updated without any host synchronisation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["MEMA"]


class MEMA(nn.Module):
    """Feature-level stage weights alpha_k and output-level sample weights beta_i.

    Args:
        num_stages: number of tapped student stages K.
        momentum: EMA momentum m of both baselines.
        lambda_feat: strength lambda_f of the stage-weight correction.
        lambda_out: strength lambda_o of the sample-weight penalty.
        alpha_max: upper clip of the stage weights: 2.0 is the paper's formula; 1.0 is the
            damp-only ablation (MEMA may lower a stage's weight, never raise it above 1).
        sync: applied to the batch statistics before they touch the baselines; pass an
            all-reduce-mean so every rank keeps the same baselines. It must return its
            result (it may not rely on in-place modification only). Identity when None.
    """

    feat_baseline: torch.Tensor
    out_baseline: torch.Tensor
    feat_ready: torch.Tensor
    out_ready: torch.Tensor

    def __init__(
        self,
        num_stages: int,
        momentum: float = 0.99,
        lambda_feat: float = 5.0,
        lambda_out: float = 2.0,
        sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
        alpha_max: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_stages = num_stages
        self.momentum = momentum
        self.lambda_feat = lambda_feat
        self.lambda_out = lambda_out
        self.alpha_max = alpha_max
        self.sync = sync
        self.register_buffer("feat_baseline", torch.zeros(num_stages, dtype=torch.float32))
        self.register_buffer("out_baseline", torch.zeros((), dtype=torch.float32))
        # Flags instead of Python bools: "first observed value" must survive checkpoints
        # and be decided on device with torch.where.
        self.register_buffer("feat_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("out_ready", torch.zeros((), dtype=torch.bool))

    def _sync(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sync is None else self.sync(x)

    @torch.no_grad()
    def stage_weights(self, align: torch.Tensor) -> torch.Tensor:
        """Stage weights alpha (K,) from the per-stage alignment s_k = mean_i cos(z_k[i], t[i]).

        The baseline is used BEFORE it is updated: alpha = clip(1 - lambda_f * (b - s), 0.1, alpha_max)
        then b <- m * b + (1 - m) * s. On the first call b := s, so alpha is exactly 1.
        """
        # Copy so that an in-place all-reduce cannot alter the caller's tensor.
        s = self._sync(align.detach().to(torch.float32, copy=True)).to(self.feat_baseline.device)
        b = torch.where(self.feat_ready, self.feat_baseline, s)
        alpha = (1.0 - self.lambda_feat * (b - s)).clamp(0.1, self.alpha_max)
        # lerp: b + (1 - m) * (s - b) == m * b + (1 - m) * s, exact when b == s.
        self.feat_baseline.copy_(torch.lerp(b, s, 1.0 - self.momentum))
        self.feat_ready.fill_(True)
        return alpha

    @torch.no_grad()
    def sample_weights(self, grad_cos: torch.Tensor) -> torch.Tensor:
        """Sample weights beta (N,) from c_i = cos(g_gt[i], g_kd[i]).

        The baseline is updated FIRST with the batch mean of c (initialised to it on the
        first call), then beta_i = clip(1 - 0.1 * lambda_o * relu(B - c_i), 0.5, 2).
        """
        c = grad_cos.detach().to(torch.float32)
        mean_c = self._sync(c.mean()).to(self.out_baseline.device)
        b = torch.where(self.out_ready, torch.lerp(self.out_baseline, mean_c, 1.0 - self.momentum), mean_c)
        self.out_baseline.copy_(b)
        self.out_ready.fill_(True)
        return (1.0 - 0.1 * self.lambda_out * (b - c).clamp_min(0.0)).clamp(0.5, 2.0)

    def extra_repr(self) -> str:
        sync = "" if self.sync is None else f", sync={getattr(self.sync, '__name__', type(self.sync).__name__)}"
        return (
            f"num_stages={self.num_stages}, momentum={self.momentum}, "
            f"lambda_feat={self.lambda_feat}, lambda_out={self.lambda_out}, alpha_max={self.alpha_max}{sync}"
        )
