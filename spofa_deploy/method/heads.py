"""Decoupling projector heads: student stage features -> stage logits (spec section 1).

Training only: the heads are dropped after training and the student ships as the
plain timm model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ProjectorHead", "build_heads"]


def _conv_bn_relu(*convs: nn.Module, out_chs: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm right after it has its own shift.
    return [*convs, nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


class SepConvBlock(nn.Sequential):
    """Stride-2 depthwise-separable block (DARTS/OFA `SepConv`), halves the resolution.

    dw3x3 s2 -> pw1x1 -> BN -> ReLU -> dw3x3 s1 -> pw1x1 -> BN -> ReLU. The first
    pointwise conv keeps in_chs, the second maps to out_chs (as the OFA reference).
    padding=1 keeps a 1x1 map valid (it stays 1x1).
    """

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(
            *_conv_bn_relu(
                nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False),
                nn.Conv2d(in_chs, in_chs, 1, bias=False),
                out_chs=in_chs,
            ),
            *_conv_bn_relu(
                nn.Conv2d(in_chs, in_chs, 3, stride=1, padding=1, groups=in_chs, bias=False),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                out_chs=out_chs,
            ),
        )


class ProjectorHead(nn.Module):
    """Projects one student stage to class logits through a LayerNorm-decoupled embedding.

    Args:
        in_chs: channels of the stage feature map.
        reduction: stride of the stage feature map (power-of-two divisor of final_reduction).
        dim: embedding width D = max(student num_features, teacher num_features).
        num_classes: number of classes C.
        layer_norm: LayerNorm(D) before the classifier (SPOFA); False gives the OFA head.
        final_reduction: stride the body brings every stage to.
    """

    def __init__(
        self,
        in_chs: int,
        reduction: int,
        dim: int,
        num_classes: int,
        layer_norm: bool = True,
        final_reduction: int = 32,
    ) -> None:
        super().__init__()
        ratio, rem = divmod(final_reduction, reduction)
        if rem or ratio < 1 or ratio & (ratio - 1):
            raise ValueError(
                f"stage reduction {reduction} must be a power-of-two divisor of {final_reduction}"
            )
        num_blocks = ratio.bit_length() - 1
        self.in_chs, self.reduction, self.dim, self.num_classes = in_chs, reduction, dim, num_classes

        if num_blocks == 0:
            # Already at the final stride: a plain 1x1 projection with bias, as in the reference
            # (OFA-KD); the LayerNorm after pooling does the normalising.
            body: list[nn.Module] = [nn.Conv2d(in_chs, dim, 1)]
        else:
            body, chs = [], in_chs
            for i in range(num_blocks):
                out_chs = dim if i == num_blocks - 1 else chs * 2
                body.append(SepConvBlock(chs, out_chs))
                chs = out_chs
        self.body = nn.Sequential(*body)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        # The "decoupling": per-sample normalisation removes the feature magnitude, so the
        # alignment only acts on direction whatever the CNN/ViT norm gap.
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage feature map (N, in_chs, H, W) -> normalised embedding (N, dim)."""
        return self.norm(self.flatten(self.pool(self.body(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage feature map (N, in_chs, H, W) -> stage logits (N, num_classes)."""
        return self.fc(self.forward_features(x))


def build_heads(
    stage_chs: Sequence[int],
    stage_reductions: Sequence[int],
    dim: int,
    num_classes: int,
    layer_norm: bool = True,
) -> nn.ModuleList:
    """One ProjectorHead per tapped stage, in stage order.

    Args:
        stage_chs: channels of each stage (e.g. from timm `feature_info`).
        stage_reductions: stride of each stage.
        dim: embedding width D = max(student, teacher) `num_features`.
        num_classes: number of classes.
        layer_norm: SPOFA heads (True) or OFA heads without LayerNorm (False).
    """
    if len(stage_chs) != len(stage_reductions):
        raise ValueError(f"{len(stage_chs)} stage widths but {len(stage_reductions)} reductions")
    return nn.ModuleList(
        ProjectorHead(int(c), int(r), dim, num_classes, layer_norm=layer_norm)
        for c, r in zip(stage_chs, stage_reductions)
    )
