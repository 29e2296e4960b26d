"""Projector heads on real timm stage features of three CNN families."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from spofa_deploy.method.heads import ProjectorHead, SepConvBlock, build_heads
from spofa_deploy.models import count_params as count_parameters

NUM_CLASSES = 10
TEACHERS = ("test_vit", "test_convnext")


def _stages(model: nn.Module) -> tuple[list[int], list[int], list[int]]:
    """feature_info indices, channels, reductions of the last entry at each stride 4/8/16/32."""
    last = {int(f["reduction"]): i for i, f in enumerate(model.feature_info)}
    idx = [last[r] for r in (4, 8, 16, 32)]
    return idx, [int(model.feature_info[i]["num_chs"]) for i in idx], [4, 8, 16, 32]


@pytest.fixture(scope="module")
def teacher_dims() -> list[int]:
    return [int(timm.create_model(n, pretrained=False, num_classes=NUM_CLASSES).num_features) for n in TEACHERS]


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "mobilenetv3_small_050"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_heads_on_timm_students(name: str, layer_norm: bool, teacher_dims: list[int]) -> None:
    torch.manual_seed(0)
    student = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    idx, chs, reds = _stages(student)
    for teacher_dim in teacher_dims:
        dim = max(int(student.num_features), teacher_dim)
        heads = build_heads(chs, reds, dim, NUM_CLASSES, layer_norm=layer_norm)
        assert len(heads) == 4
        has_ln = any(isinstance(m, nn.LayerNorm) for m in heads.modules())
        assert has_ln == layer_norm
        for h in heads:
            assert h.fc.in_features == dim and h.fc.out_features == NUM_CLASSES
            if layer_norm:
                assert isinstance(h.norm, nn.LayerNorm) and h.norm.normalized_shape == (dim,)

    for size in (32, 64):
        x = torch.randn(2, 3, size, size, requires_grad=True)
        feats = student.forward_intermediates(x, indices=idx, intermediates_only=True)
        assert [f.shape[1] for f in feats] == chs
        assert [size // f.shape[-1] for f in feats] == reds
        logits = [h(f) for h, f in zip(heads, feats)]
        assert all(z.shape == (2, NUM_CLASSES) and torch.isfinite(z).all() for z in logits)

    loss = sum(F.cross_entropy(z, torch.tensor([1, 7])) for z in logits)
    loss.backward()
    for pname, p in heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    for h in heads:
        assert h.fc.weight.grad.abs().sum() > 0
        first_conv = next(m for m in h.body.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.weight.grad.abs().sum() > 0
    # The head losses train the student too.
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_head_structure() -> None:
    # MobileNetV3-L first stage: 24 ch at /4 -> 3 blocks, 24 -> 48 -> 96 -> D.
    head = ProjectorHead(24, 4, 960, 100)
    blocks = list(head.body)
    assert len(blocks) == 3 and all(isinstance(b, SepConvBlock) for b in blocks)
    assert [b[-3].out_channels for b in blocks] == [48, 96, 960]
    dw = blocks[0][0]
    assert dw.stride == (2, 2) and dw.groups == 24 and dw.kernel_size == (3, 3)
    assert blocks[0][4].stride == (1, 1) and blocks[0][4].groups == 24
    assert len(ProjectorHead(40, 8, 960, 100).body) == 2
    assert len(ProjectorHead(112, 16, 960, 100).body) == 1
    # Already at /32: a plain 1x1 conv (with bias) to D, as in the reference: no BatchNorm, no activation.
    last = ProjectorHead(960, 32, 768, 100).body
    assert len(last) == 1 and isinstance(last[0], nn.Conv2d) and last[0].kernel_size == (1, 1)
    assert last[0].out_channels == 768 and last[0].bias is not None
    # The logits come from a spatial size 1 map as well (16 px input at /4 is 4x4, /32 is 1x1).
    out = ProjectorHead(24, 4, 64, 10)(torch.randn(3, 24, 1, 1))
    assert out.shape == (3, 10)


def test_head_init() -> None:
    torch.manual_seed(0)
    head = ProjectorHead(64, 16, 512, 100)
    assert torch.equal(head.fc.bias, torch.zeros(100))
    assert abs(head.fc.weight.std().item() - 0.02) < 0.002
    pw = head.body[0][5]  # 1x1, 64 -> 512: kaiming fan_out std = sqrt(2 / 512)
    assert abs(pw.weight.std().item() / (2 / 512) ** 0.5 - 1) < 0.1
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert torch.equal(head.norm.weight, torch.ones(512))


def test_count_parameters_and_layer_norm_cost() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    spofa = build_heads([8, 16, 24, 288], [4, 8, 16, 32], 288, 10)
    ofa = build_heads([8, 16, 24, 288], [4, 8, 16, 32], 288, 10, layer_norm=False)
    # The only difference: LayerNorm weight + bias (2 * D) in each of the 4 heads.
    assert count_parameters(spofa) - count_parameters(ofa) == 4 * 2 * 288
    spofa[0].requires_grad_(False)
    assert count_parameters(spofa, trainable_only=True) == count_parameters(spofa) - count_parameters(spofa[0])


def test_invalid_stage_reduction() -> None:
    for red in (12, 64):
        with pytest.raises(ValueError):
            ProjectorHead(8, red, 32, 10)
    with pytest.raises(ValueError):
        build_heads([8, 16], [4], 32, 10)
