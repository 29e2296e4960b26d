"""What timm's files say, read without building a model: the config of an `hf-hub:` or `local-dir:` name,
the state dict of a timm checkpoint, and the width of the classifier in it.

Model creation (`spofa_deploy.models`) and the adoption of teachers made elsewhere
(`spofa_deploy.teacher.foreign`) both read them, so they sit below both.
"""
from __future__ import annotations

from pathlib import Path

import torch

from spofa_deploy.errors import UserError

SOURCES = ("hf-hub:", "local-dir:")


def is_hub_or_dir(name: str) -> bool:
    """Whether `name` is a timm `hf-hub:ID` or `local-dir:DIR` name."""
    return name.startswith(SOURCES)


def hub_config(name: str) -> tuple[dict, str]:
    """(timm's pretrained config, architecture) of an `hf-hub:` or `local-dir:` name, read without the weights."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    kind, _, where = name.partition(":")
    try:
        cfg, arch, _ = load_model_config_from_path(where) if kind == "local-dir" else load_model_config_from_hf(where)
    except Exception as e:  # no folder, no config.json, not in the hub cache while offline
        raise UserError(f"cannot read the config of teacher {name}: {str(e).strip().splitlines()[0]}") from e
    return cfg, arch


def checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a timm checkpoint (its EMA weights where it has them), read with `weights_only`."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # pickled objects refused by weights_only, a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path} as timm weights: {str(e).strip().splitlines()[0]}") from e


def classifier_width(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """The output width of the classifier in `state`, for timm architecture `name` (None: no classifier found)."""
    head = _classifier_name(name)
    heads = head if isinstance(head, (list, tuple)) else [head]
    weight = next((state[f"{h}.weight"] for h in heads if h and f"{h}.weight" in state), None)
    return int(weight.shape[0]) if weight is not None else None


def _classifier_name(name: str) -> str | list[str] | None:
    """The classifier's module name(s) in timm's pretrained config of model `name`: the config the model would be
    built with (the registry's, with a pretrained tag's; a hub or folder's own), read without building it."""
    if is_hub_or_dir(name):
        return hub_config(name)[0].get("classifier")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)  # (None: no config registered; timm then builds with a default one)
    return cfg.classifier if cfg is not None else None
