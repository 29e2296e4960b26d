"""Model names, creation, img_size pass-through, stage taps and local weights files."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from spofa_deploy.errors import UserError
from spofa_deploy.models import (
    ALIASES,
    count_params,
    create_model,
    data_config,
    forward_with_stages,
    resolve_model_name,
    stage_taps,
)


@pytest.mark.parametrize("alias, full", [
    ("vit_b", "vit_base_patch16_224"),
    ("mobilenetv3", "mobilenetv3_large_100"),
    ("vit_s", "vit_small_patch16_224"),
    ("deit_t", "deit_tiny_patch16_224"),
    ("swin_t", "swin_tiny_patch4_window7_224"),
    ("mobilenetv2", "mobilenetv2_100"),
    ("resnet18", "resnet18"),
    ("test_resnet", "test_resnet"),  # any timm name passes through
])
def test_aliases(alias: str, full: str) -> None:
    assert resolve_model_name(alias) == full


def test_every_alias_is_a_timm_model() -> None:
    assert all(timm.is_model(v) for v in ALIASES.values())


@pytest.mark.parametrize("typo, expected", [
    ("mobilenetv4x", "mobilenetv3"),
    ("resnet19", "resnet18"),
    ("vit_bb", "vit_b"),
    ("test_resnt", "test_resnet"),
])
def test_unknown_name_suggests_close_matches(typo: str, expected: str) -> None:
    with pytest.raises(UserError) as e:
        resolve_model_name(typo)
    msg = str(e.value)
    assert f"'{typo}'" in msg and "Did you mean" in msg and "\n" not in msg
    suggested = [s.strip() for s in msg.split("Did you mean:")[1].rstrip("?").split(",")]
    assert expected in suggested
    assert all(s in ALIASES or timm.is_model(s) for s in suggested)  # only real names
    assert len(suggested) == len(set(suggested))  # no name twice


def test_hopeless_name_points_to_the_list() -> None:
    with pytest.raises(UserError, match="list_models"):
        resolve_model_name("qqqqqqqqqqqqqqqq")
    with pytest.raises(UserError):
        create_model("qqqqqqqqqqqqqqqq", 10)


def test_img_size_passes_through_to_vits() -> None:
    torch.manual_seed(0)
    vit = create_model("test_vit", 10, img_size=32)
    assert tuple(vit.patch_embed.img_size) == (32, 32)
    out = vit.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert vit.pos_embed.shape[1] == 1 + (32 // 16) ** 2  # token grid built for 32 px
    default = create_model("test_vit", 10)
    assert tuple(default.patch_embed.img_size) != (32, 32) and default.pos_embed.shape[1] > vit.pos_embed.shape[1]


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_img_size_ignored_by_cnns(name: str) -> None:
    torch.manual_seed(0)
    a = create_model(name, 7, img_size=32)
    torch.manual_seed(0)
    b = create_model(name, 7)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    for size in (32, 48):
        assert a.eval()(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["fastvit_t8", "efficientvit_b0", "tiny_vit_5m_224"])
def test_img_size_with_vit_named_cnns(name: str) -> None:
    """Names with 'vit' in them whose constructors take no img_size still build (size ignored)."""
    m = create_model(name, 5, img_size=64)
    assert m.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_stage_taps_mobilenetv3() -> None:
    m = create_model("mobilenetv3", 10)
    taps = stage_taps(m)
    assert [t.module for t in taps] == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert [t.channels for t in taps] == [24, 40, 112, 960]
    assert [t.reduction for t in taps] == [4, 8, 16, 32]
    assert [t.index for t in taps] == [1, 2, 3, 4]


def test_stage_taps_features_match() -> None:
    torch.manual_seed(0)
    m = create_model("test_resnet", 10).eval()
    taps = stage_taps(m)
    assert [t.module for t in taps] == ["layer1", "layer2", "layer3", "layer4"]
    assert [t.channels for t in taps] == [32, 48, 192, 96]
    x = torch.randn(2, 3, 64, 64)
    logits, feats = forward_with_stages(m, x, taps)
    torch.testing.assert_close(logits, m(x))  # same logits as the plain forward
    assert [f.shape[1] for f in feats] == [t.channels for t in taps]
    assert [64 // f.shape[-1] for f in feats] == [4, 8, 16, 32]


def test_stage_taps_refuses_a_vit() -> None:
    with pytest.raises(UserError, match="stride"):
        stage_taps(create_model("test_vit", 10, img_size=32))


def test_data_config_from_timm() -> None:
    cfg = data_config(create_model("test_vit", 10, img_size=32))
    assert set(cfg) == {"mean", "std", "interpolation", "crop_pct"}
    ref = timm.data.resolve_model_data_config(timm.create_model("test_vit"))
    assert cfg["mean"] == list(ref["mean"]) and cfg["interpolation"] == ref["interpolation"]
    assert 0 < cfg["crop_pct"] <= 1
    assert count_params(create_model("test_resnet", 10)) == sum(
        p.numel() for p in timm.create_model("test_resnet", num_classes=10).parameters())


# ---------------------------------------------------------------- local weights files (--teacher-weights)


@pytest.fixture(scope="module")
def imagenet_resnet() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=1000).state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped"])
def test_local_weights_file(tmp_path: Path, imagenet_resnet, fmt: str) -> None:
    path = tmp_path / f"w.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file(imagenet_resnet, str(path))
    elif fmt == "pth":
        torch.save(imagenet_resnet, path)
    else:
        torch.save({"state_dict": imagenet_resnet, "epoch": 3}, path)  # a training checkpoint wrapper
    torch.manual_seed(0)
    m = create_model("test_resnet", 10, weights=path)
    sd = m.state_dict()
    assert torch.equal(sd["conv1.0.weight"], imagenet_resnet["conv1.0.weight"])
    backbone = [k for k in sd if not k.startswith("fc.")]
    assert all(torch.equal(sd[k], imagenet_resnet[k]) for k in backbone)
    # The 1000-way classifier is replaced by a fresh 10-way one.
    assert sd["fc.weight"].shape == (10, 96) and sd["fc.bias"].shape == (10,)
    assert not torch.equal(sd["fc.weight"], imagenet_resnet["fc.weight"][:10])
    torch.manual_seed(0)
    fresh = create_model("test_resnet", 10)
    assert not torch.equal(fresh.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])  # the file mattered


def test_local_weights_into_a_small_vit(tmp_path: Path) -> None:
    """A 160 px ViT weights file loads into the same ViT at 32 px (position embeddings resampled)."""
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    m = create_model("test_vit", 10, img_size=32, weights=tmp_path / "vit.safetensors")
    assert torch.equal(m.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert m.pos_embed.shape[1] == 1 + (32 // 16) ** 2
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bad_weights_files(tmp_path: Path, imagenet_resnet) -> None:
    with pytest.raises(UserError, match="not found"):
        create_model("test_resnet", 10, weights=tmp_path / "missing.safetensors")
    for name in ("junk.safetensors", "junk.pth"):
        (tmp_path / name).write_bytes(b"this is not a weights file" * 4)
        with pytest.raises(UserError, match=name):
            create_model("test_resnet", 10, weights=tmp_path / name)
    half = tmp_path / "half.safetensors"
    save_file(imagenet_resnet, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="half.safetensors"):
        create_model("test_resnet", 10, weights=half)
    other = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}, str(other))
    with pytest.raises(UserError, match="effnet.safetensors"):
        create_model("test_resnet", 10, weights=other)
