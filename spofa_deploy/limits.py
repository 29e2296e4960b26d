"""The sizes and counts the models and exporters accept, checked before any work starts.

Each check raises a one-line `UserError` naming the flag (or the sidecar field) and the range.
"""
from __future__ import annotations

import math

from spofa_deploy.errors import UserError

# A square input of this many pixels a side is far beyond what these models train or export at (224 is
# ImageNet's); larger sizes only end in out-of-memory errors deep inside a model.
MIN_IMG_SIZE, MAX_IMG_SIZE = 8, 1024
MAX_WORKERS = 256  # data loader processes


def check_int(value, name: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi], else a UserError naming `name` (a flag or a sidecar field)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < lo or (hi is not None and value > hi):
        rng = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise UserError(f"{name} must be {rng}, got {value!r}")
    return value


def check_positive(value: float | None, name: str) -> float | None:
    """`value` when it is None or a finite number > 0, else a UserError naming `name`."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a number > 0, got {value!r}")
    return value


def check_img_size(size: int | None, name: str = "--img-size") -> int | None:
    """An input size in [MIN_IMG_SIZE, MAX_IMG_SIZE]; None (the default size) passes."""
    return None if size is None else check_int(size, name, MIN_IMG_SIZE, MAX_IMG_SIZE)


def check_workers(workers: int | None) -> int | None:
    """Data loader workers: None (the default) or 0..MAX_WORKERS."""
    return None if workers is None else check_int(workers, "--workers", 0, MAX_WORKERS)


def check_model_input(model_name: str, img_size: int, what: str, in_chans: int = 3) -> None:
    """Refuse an input size the model cannot take (a ViT's patch or a Swin's window must tile it).

    The model is built on the meta device (no memory, no weights) and run once on a meta tensor, so the
    check costs a fraction of a second even for a large teacher.
    """
    import torch

    from spofa_deploy.models import create_model

    try:
        with torch.device("meta"):
            net = create_model(model_name, 2, img_size)
            _check_patches(net, img_size, model_name, what)
            net.eval()(torch.empty(1, in_chans, img_size, img_size))
    except UserError:
        raise
    except Exception as e:  # timm asserts, shape errors: the model's own words for why the size does not fit
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"--img-size {img_size} does not fit the {what} {model_name}: {reason}") from None


def _check_patches(net, img_size: int, model_name: str, what: str) -> None:
    """A patch model (ViT) cuts the image into whole patches: the size must be a multiple of the patch."""
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    side = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(side, int) and side > 1 and img_size % side:
        near = sorted({max(side, img_size // side * side), (img_size // side + 1) * side})
        raise UserError(f"--img-size {img_size} does not fit the {what} {model_name}: its {side}px patches need a "
                        f"multiple of {side} (e.g. {' or '.join(map(str, near))})")
