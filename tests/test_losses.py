"""Losses checked against independent float64 formulas and torch.autograd."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spofa_deploy.method.losses import cosine_rows, kd_loss, logit_gradients, ofa_loss

N, C = 6, 7


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    t = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    return z.to(dtype), t.to(dtype), labels


def _ref_ofa_per_sample(z: torch.Tensor, t: torch.Tensor, labels: list[int], eps: float, tau: float) -> list[float]:
    """The spec formula written out with Python floats, one sample and class at a time."""
    out = []
    for zi, ti, yi in zip(z.double().tolist(), t.double().tolist(), labels):
        mt, mz = max(ti), max(zi)
        et = [math.exp((v - mt) / tau) for v in ti]
        p_t = [v / sum(et) for v in et]
        lse = mz / tau + math.log(sum(math.exp((v - mz) / tau) for v in zi))
        loss = 0.0
        for c in range(len(zi)):
            y = 1.0 if c == yi else 0.0
            w = (p_t[c] + y) ** eps - y
            loss -= w * (zi[c] / tau - lse)
        out.append(loss)
    return out


@pytest.mark.parametrize("eps", [1.0, 1.5, 0.5])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_ofa_loss_matches_formula(eps: float, tau: float) -> None:
    z, t, labels = _inputs(seed=int(eps * 10 + tau))
    ref = torch.tensor(_ref_ofa_per_sample(z, t, labels.tolist(), eps, tau), dtype=torch.float64)
    per = ofa_loss(z, t, labels, eps=eps, temperature=tau, reduction="none")
    assert per.shape == (N,) and per.dtype == torch.float64
    torch.testing.assert_close(per, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ofa_loss(z, t, labels, eps, tau), ref.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ofa_loss(z, t, labels, eps, tau, reduction="sum"), ref.sum(), rtol=1e-12, atol=1e-12)
    # float32 inputs: same numbers at float32 precision.
    per32 = ofa_loss(z.float(), t.float(), labels, eps, tau, reduction="none")
    assert per32.dtype == torch.float32
    torch.testing.assert_close(per32.double(), ref, rtol=1e-5, atol=1e-5)


def test_ofa_loss_eps_one_is_soft_cross_entropy() -> None:
    # eps = 1 reduces to the teacher's softmax as target, whatever the label.
    z, t, labels = _inputs(1)
    expected = -(torch.softmax(t, -1) * torch.log_softmax(z, -1)).sum(-1)
    torch.testing.assert_close(ofa_loss(z, t, labels, reduction="none"), expected)
    torch.testing.assert_close(ofa_loss(z, t, (labels + 1) % C, reduction="none"), expected)


@pytest.mark.parametrize("eps", [1.5, 0.5])
def test_ofa_loss_soft_labels_use_argmax(eps: float) -> None:
    z, t, _ = _inputs(2)
    soft = torch.softmax(torch.randn(N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4, -1)
    hard = soft.argmax(-1)
    ref = torch.tensor(_ref_ofa_per_sample(z, t, hard.tolist(), eps, 2.0), dtype=torch.float64)
    torch.testing.assert_close(ofa_loss(z, t, soft, eps, 2.0, reduction="none"), ref, rtol=1e-12, atol=1e-12)
    # Using the soft vector itself as y would give other numbers: the test can tell.
    w_soft = (torch.softmax(t / 2.0, -1) + soft) ** eps - soft
    wrong = -(w_soft * torch.log_softmax(z / 2.0, -1)).sum(-1)
    assert not torch.allclose(wrong, ref)


def test_ofa_loss_low_precision_computes_in_float32() -> None:
    z, t, labels = _inputs(4, dtype=torch.float32)
    loss_bf16 = ofa_loss(z.bfloat16(), t.bfloat16(), labels, eps=1.5, reduction="none")
    assert loss_bf16.dtype == torch.float32
    expected = ofa_loss(z.bfloat16().float(), t.bfloat16().float(), labels, eps=1.5, reduction="none")
    torch.testing.assert_close(loss_bf16, expected)


def test_ofa_loss_teacher_is_constant() -> None:
    z, t, labels = _inputs(5)
    z.requires_grad_(True)
    t.requires_grad_(True)
    ofa_loss(z, t, labels, eps=1.5).backward()
    assert t.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_ofa_loss_bad_reduction() -> None:
    z, t, labels = _inputs(6)
    with pytest.raises(ValueError):
        ofa_loss(z, t, labels, reduction="batchmean")


@pytest.mark.parametrize("eps", [1.0, 1.5, 0.5])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_logit_gradients_match_autograd(eps: float, tau: float) -> None:
    z, t, labels = _inputs(seed=7 + int(eps * 10 + tau))
    g_gt, g_kd = logit_gradients(z, t, labels, eps=eps, temperature=tau)
    assert g_gt.shape == g_kd.shape == (N, C) and g_gt.dtype == torch.float64

    zz = z.clone().requires_grad_(True)
    # Summing over the batch makes row i of the gradient the per-sample gradient.
    (ref_gt,) = torch.autograd.grad(F.cross_entropy(zz, labels, reduction="sum"), zz)
    (ref_kd,) = torch.autograd.grad(ofa_loss(zz, t, labels, eps, tau, reduction="sum"), zz)
    assert (g_gt - ref_gt).norm() / ref_gt.norm() < 1e-6
    assert (g_kd - ref_kd).norm() / ref_kd.norm() < 1e-6
    # Row by row too, so one large row cannot hide a wrong small one.
    row_err = (g_kd - ref_kd).norm(dim=-1) / ref_kd.norm(dim=-1)
    assert row_err.max() < 1e-6


def test_logit_gradients_are_detached() -> None:
    z, t, labels = _inputs(8, dtype=torch.float32)
    z.requires_grad_(True)
    g_gt, g_kd = logit_gradients(z, t, labels, eps=1.5)
    assert not g_gt.requires_grad and not g_kd.requires_grad
    assert g_gt.dtype == torch.float32
    # CE gradient rows sum to zero (softmax and one-hot both sum to 1).
    torch.testing.assert_close(g_gt.sum(-1), torch.zeros(N), atol=1e-6, rtol=0)


def test_kd_loss() -> None:
    z, t, _ = _inputs(9)
    assert kd_loss(z, z.clone()).abs() < 1e-12
    T = 4.0
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (torch.log_softmax(t / T, -1) - torch.log_softmax(z / T, -1))).sum(-1).mean() * T * T
    loss = kd_loss(z, t, temperature=T)
    assert loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert kd_loss(z.float(), t.float(), temperature=1.0) > 0


def test_cosine_rows() -> None:
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    torch.testing.assert_close(cosine_rows(a, b), F.cosine_similarity(a, b, dim=-1))
    torch.testing.assert_close(cosine_rows(a, a), torch.ones(5))
    torch.testing.assert_close(cosine_rows(a, -2 * a), -torch.ones(5))
    a[1] = 0
    c = cosine_rows(a, b)
    assert torch.isfinite(c).all() and c[1] == 0


def test_traceable_without_graph_breaks() -> None:
    # fullgraph=True fails on any host sync (.item(), bool(tensor), data-dependent if).
    def step(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g_gt, g_kd = logit_gradients(z, t, y, eps=1.5, temperature=2.0)
        c = cosine_rows(g_gt, g_kd)
        return ofa_loss(z, t, y, 1.5, 2.0) + kd_loss(z, t) + c.mean()

    z, t, labels = _inputs(11, dtype=torch.float32)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z, t, labels), step(z, t, labels))
