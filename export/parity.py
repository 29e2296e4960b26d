"""An exported model's output against PyTorch's on the same images: `Parity`, `compare_logits`, the references.

Every format's export judges its artifact this way, with the artifact run by the same runner that
`spofa bench` times (`export.runner.Runner.logits`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from spofa_deploy.errors import UserError

# fp32 parity tolerance, judged like `torch.testing.assert_close` but against each image's logit scale:
# |ort - torch| <= atol + rtol * max|torch logits of that image|. A student whose logits reach 3e4
# matches ONNX Runtime to ~3e-7 relative (fp32 rounding) yet to 3e-2 absolute, so a fixed absolute
# bound refuses valid models; a relative one alone would pass garbage near zero.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-4


@dataclass(frozen=True)
class Parity:
    """An exported model's output vs PyTorch on the same images.

    `max_rel_err` is the largest error divided by its image's logit scale (max |logit|);
    `top1_agreement` counts every image, `decisive_disagreements` only images whose PyTorch
    top-1 beats its runner-up by more than the tolerance (a near tie may flip legitimately).
    """

    max_abs_err: float
    mean_abs_err: float
    top1_agreement: float  # percent of images with the same arg-max
    n: int
    images: str  # "val" (real validation images) or "random"
    max_rel_err: float = 0.0
    logit_scale: float = 0.0  # largest |PyTorch logit|
    atol: float = PARITY_ATOL
    rtol: float = PARITY_RTOL
    worst_excess: float = 0.0  # max of err / (atol + rtol * scale): > 1 fails
    decisive_disagreements: int = 0
    checked_on: str = "onnxruntime-cpu"

    @property
    def passed(self) -> bool:
        """Within tolerance everywhere and the same top-1 wherever it is decisive."""
        return self.worst_excess <= 1.0 and self.decisive_disagreements == 0

    def describe(self) -> str:
        """One line: the errors, the tolerance and the top-1 agreement."""
        return (f"max abs err {self.max_abs_err:.2e} ({self.max_rel_err:.1e} of the logit scale {self.logit_scale:.3g}; "
                f"tolerance {self.atol:g} + {self.rtol:g} x scale), top-1 agreement {self.top1_agreement:.1f}% "
                f"on {self.n} {self.images} images")

    def flips(self) -> str:
        """`; N decisive top-1 flip(s)` where there are any (for failure messages)."""
        return f"; {self.decisive_disagreements} decisive top-1 flip(s)" if self.decisive_disagreements else ""

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_logits(reference: np.ndarray, out: np.ndarray, source: str, *, atol: float = PARITY_ATOL,
                   rtol: float = PARITY_RTOL, checked_on: str = "onnxruntime-cpu") -> Parity:
    """Judge `out` against the PyTorch `reference` logits (both (N, classes))."""
    if out.shape != reference.shape:
        raise UserError(f"exported model output shape {out.shape} differs from PyTorch {reference.shape}")
    ref, got = reference.astype(np.float64), out.astype(np.float64)
    err = np.abs(got - ref)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    tol = atol + rtol * scale
    top_ref, top_got = ref.argmax(1), got.argmax(1)
    # A top-1 flip counts only where PyTorch's winner beats its runner-up by more than the tolerance.
    srt = np.sort(ref, axis=1)
    margin = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    decisive = int(((top_ref != top_got) & (margin > 2 * tol[:, 0])).sum())
    return Parity(max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
                  top1_agreement=float((top_ref == top_got).mean() * 100), n=len(ref), images=source,
                  max_rel_err=float((err / np.maximum(scale, 1e-30)).max()), logit_scale=float(scale.max()),
                  atol=atol, rtol=rtol, worst_excess=float((err / tol).max()), decisive_disagreements=decisive,
                  checked_on=checked_on)


def padded_chunks(images: np.ndarray, lo: int, hi: int, size: int):
    """(chunk, n_real) pairs of at most min(hi, size) images, padded up to `lo` by repeating the first.

    How a model with a batch range (a fixed batch: lo == hi) runs any number of images.
    """
    step = max(lo, min(hi, size))
    for i in range(0, len(images), step):
        x = images[i:i + step]
        n = len(x)
        if n < lo:
            x = np.concatenate([x, np.repeat(x[:1], lo - n, axis=0)])
        yield np.ascontiguousarray(x, dtype=np.float32), n


def torch_logits(model: nn.Module, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """PyTorch fp32 logits on CPU (the parity reference)."""
    model = model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i:i + chunk])).float().numpy()
                               for i in range(0, len(images), chunk)])
