"""Model names, creation and stage taps, all through timm's own registry and metadata."""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spofa_deploy.errors import UserError, load_error_line

_log = logging.getLogger(__name__)

# Short names users type. Any other timm model name is accepted as is.
ALIASES: dict[str, str] = {
    "vit_b": "vit_base_patch16_224",
    "vit_s": "vit_small_patch16_224",
    "vit_t": "vit_tiny_patch16_224",
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "mixer_b": "mixer_b16_224",
    "convnext_t": "convnext_tiny",
    "mobilenetv3": "mobilenetv3_large_100",
    "mobilenetv3_s": "mobilenetv3_small_100",
    "mobilenetv2": "mobilenetv2_100",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "efficientnet_b0": "efficientnet_b0",
}

# Strides of the four student stages SPOFA taps (docs/method.md).
STAGE_REDUCTIONS = (4, 8, 16, 32)


def resolve_model_name(name: str) -> str:
    """Map an alias or timm name to a timm model name.

    Raises:
        UserError: unknown name, with the closest matches suggested.
    """
    import timm

    full = ALIASES.get(name, name)
    if timm.is_model(full) or full.startswith(("hf-hub:", "local-dir:")):  # (timm reads those when it builds them)
        return full
    candidates = list(dict.fromkeys(list(ALIASES) + timm.list_models()))  # aliases first, no duplicates
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models()` for names."
    raise UserError(f"unknown model '{name}'.{hint}")


def create_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    exportable: bool = False,
    architecture: str | None = None,
) -> nn.Module:
    """Create a timm model for `num_classes` classes.

    Args:
        name: alias or timm name.
        num_classes: classifier width.
        img_size: passed to models that take it (ViT, Swin, Mixer) so they run at small sizes.
        pretrained: fetch timm's pretrained weights (needs a network or a warm cache).
        weights: a local weights file (timm/torchvision format) loaded through timm's
            pretrained path, so the classifier is re-initialised when its width differs.
        exportable: build layers that export cleanly (ONNX / TensorRT).
        architecture: the timm architecture of `name` where the caller knows it (an `hf-hub:` or
            `local-dir:` name whose config it has read), else looked up.
    """
    import timm

    from spofa_deploy import timm_files

    full = resolve_model_name(name)
    kwargs: dict = {"num_classes": num_classes}
    if exportable:
        kwargs["exportable"] = True
    if architecture is None:  # an `hf-hub:`/`local-dir:` name says its architecture in its config
        architecture = timm_files.hub_config(full)[1] if timm_files.is_hub_or_dir(full) else full
    if img_size is not None and _takes_img_size(architecture):
        kwargs["img_size"] = img_size
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        # timm keeps the file's classifier when its width is the model's, and re-initialises it otherwise.
        width = timm_files.classifier_width(full, timm_files.checkpoint_state(path))
        kwargs["pretrained_cfg_overlay"] = {"file": str(path), **({"num_classes": width} if width else {})}
        pretrained = True
    try:
        try:
            return timm.create_model(full, pretrained=pretrained, **kwargs)
        except TypeError as e:
            # The name heuristic of _takes_img_size also matches CNN-like models (fastvit, efficientvit,
            # tiny_vit, ...) whose constructors take no img_size: they do not need it.
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            return timm.create_model(full, pretrained=pretrained, **kwargs)
    except Exception as e:
        if weights is not None:  # a truncated / foreign / non-weights file: the user's to fix
            raise UserError(f"cannot load weights {weights} into {full}: {load_error_line(e)}") from e
        raise


def create_teacher_pretrained(name: str, num_classes: int, img_size: int | None) -> nn.Module | None:
    """The teacher with timm's pretrained weights, or None where they cannot be loaded.

    The attempt runs under a forked random state: a failed one (timm builds a randomly
    initialised model before it looks for weights) consumes no draw, so the random-init
    teacher built next is the same whether or not a hub answered.
    """
    if not name.startswith("local-dir:") and not _hub_reachable():
        _log.debug("model hub unreachable and HF_HUB_OFFLINE unset: not trying pretrained weights")
        return None
    with torch.random.fork_rng(devices=[]):
        try:
            return create_model(name, num_classes, img_size, pretrained=True)
        except Exception as e:  # no weights for this name, no cache, a broken download: all mean "random init"
            _log.debug("pretrained weights unavailable for %s: %s", name, e)
            return None


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether to ask the model hub (offline, its client would retry for about a minute)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True  # the user asked for the local cache: timm reads it without network retries
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _takes_img_size(full_name: str) -> bool:
    # Transformers and MLP mixers fix their token grid at construction; CNNs do not need it.
    return any(k in full_name for k in ("vit", "deit", "swin", "mixer", "eva", "beit", "cait", "xcit", "levit"))


# Images below this size train with pad-and-crop jitter and evaluate with a plain resize (`loaders.build_transforms`).
SMALL_IMAGE = 64


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: input size, normalisation, resize interpolation, eval crop.

    The one object the data path, calibration, export and bench pass around; built from timm's
    data config (`data_config`) or from a model's metadata (`from_meta`), where the same keys live.
    """

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        # Below SMALL_IMAGE the eval transform is a plain resize (a crop would cut the digit off a 32 px image):
        # crop_pct 1.0 says so, so two preprocessings that give the same images compare equal.
        if self.img_size < SMALL_IMAGE:
            object.__setattr__(self, "crop_pct", 1.0)

    @property
    def crop_mode(self) -> str:
        """timm's name of the eval resize: "squash" (both sides to the size) below SMALL_IMAGE, else "center"
        (the shorter side to size / crop_pct, then a centre crop)."""
        return "squash" if self.img_size < SMALL_IMAGE else "center"

    @classmethod
    def from_meta(cls, meta: dict, img_size: int | None = None) -> "Preprocessing":
        """From a model's metadata (teacher.json, student.json, a sidecar); `img_size` overrides its size."""
        return cls(int(img_size if img_size is not None else meta["img_size"]),
                   tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"]),
                   str(meta.get("interpolation", "bilinear")), float(meta.get("crop_pct", 0.875)))

    @classmethod
    def identity(cls, img_size: int = 32) -> "Preprocessing":
        """No normalisation: for reading splits whose images nothing here looks at (counts, labels, a data check)."""
        return cls(img_size, (0.0,) * 3, (1.0,) * 3)

    def meta(self) -> dict:
        """The metadata keys (without the size) that model files and sidecars record: the whole eval transform in
        timm's terms, so a client rebuilds it with `timm.data.create_transform(input_size=(3, s, s), **meta)`."""
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}


def data_config(model: nn.Module) -> dict:
    """Normalisation and preprocessing that timm declares for the model."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def embed_dim(model: nn.Module) -> int:
    """Width of the model's pooled features (timm's `num_features`)."""
    return int(model.num_features)


@dataclass(frozen=True)
class StageTap:
    """One student stage SPOFA attaches a projector head to."""

    index: int  # index into model.feature_info
    module: str
    channels: int
    reduction: int


def stage_taps(model: nn.Module) -> list[StageTap]:
    """The student's stages at strides 4/8/16/32, read from timm's `feature_info`.

    For each stride the last feature_info entry with that stride is taken (the end of
    that resolution), e.g. mobilenetv3_large_100 -> blocks.1, blocks.2, blocks.4, blocks.6.

    Raises:
        UserError: the model does not declare features at those strides (not a CNN).
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__} has no timm feature_info: the student must be a timm CNN")
    taps = {}
    for i, f in enumerate(info):
        if f["reduction"] in STAGE_REDUCTIONS:
            taps[f["reduction"]] = StageTap(i, f["module"], int(f["num_chs"]), int(f["reduction"]))
    missing = [r for r in STAGE_REDUCTIONS if r not in taps]
    if missing:
        raise UserError(f"student has no feature stages at stride(s) {missing}: choose a timm CNN student")
    return [taps[r] for r in STAGE_REDUCTIONS]


def forward_with_stages(model: nn.Module, x: torch.Tensor, taps: list[StageTap]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One student forward pass returning logits and the tapped stage features.

    Uses timm's own `forward_intermediates` so no model class is patched.
    """
    final, feats = model.forward_intermediates(x, indices=[t.index for t in taps])
    return model.forward_head(final), feats


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a module (only those with requires_grad if trainable_only)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
