"""MEMA scaler against sequences computed by hand (momentum 0.5, dyadic numbers)."""
from __future__ import annotations

import torch

from spofa_deploy.method.mema import MEMA


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_stage_weights_sequence() -> None:
    m = MEMA(num_stages=2, momentum=0.5, lambda_feat=2.0)
    # Step 1: baseline := s, so a = 0 and alpha is exactly 1.
    _exact(m.stage_weights(_t(0.5, 0.25)), _t(1.0, 1.0))
    _exact(m.feat_baseline, _t(0.5, 0.25))
    # Step 2: a = 2 * (b_old - s) = 2 * (0.25, -0.25) -> alpha = (0.5, 1.5),
    # then b = 0.5 * (0.5, 0.25) + 0.5 * (0.25, 0.5) = (0.375, 0.375).
    # (Updating b first would give alpha = (0.75, 1.25).)
    _exact(m.stage_weights(_t(0.25, 0.5)), _t(0.5, 1.5))
    _exact(m.feat_baseline, _t(0.375, 0.375))
    # Step 3, both clips: 1 - 2 * (0.375 + 0.625) = -1 -> 0.1; 1 - 2 * (0.375 - 1) = 2.25 -> 2.0.
    alpha = m.stage_weights(_t(-0.625, 1.0))
    torch.testing.assert_close(alpha, _t(0.1, 2.0))
    _exact(m.feat_baseline, _t(-0.125, 0.6875))


def test_damp_only_variant_caps_alpha_at_one_same_update_order() -> None:
    """alpha_max=1 (the damp-only ablation): the same sequence as the paper's formula, clipped at 1 from above."""
    paper, damp = MEMA(2, momentum=0.5, lambda_feat=2.0), MEMA(2, momentum=0.5, lambda_feat=2.0, alpha_max=1.0)
    for s in (_t(0.5, 0.25), _t(0.25, 0.5), _t(-0.625, 1.0)):
        a, d = paper.stage_weights(s), damp.stage_weights(s)
        _exact(d, a.clamp(max=1.0))  # step 2: (0.5, 1.5) -> (0.5, 1.0); step 3: (0.1, 2.0) -> (0.1, 1.0)
        _exact(damp.feat_baseline, paper.feat_baseline)  # the baseline is used first, then updated, as before
        assert float(d.min()) >= 0.1 and float(d.max()) <= 1.0
    assert "alpha_max=1.0" in repr(damp)


def test_faster_baseline_variant_follows_the_momentum() -> None:
    """momentum 0.9: b <- 0.9 b + 0.1 s after alpha is computed from the old b."""
    m = MEMA(1, momentum=0.9, lambda_feat=5.0)
    m.stage_weights(_t(0.5))
    alpha = m.stage_weights(_t(0.375))
    torch.testing.assert_close(alpha, _t(1.0 - 5.0 * (0.5 - 0.375)))
    torch.testing.assert_close(m.feat_baseline, _t(0.9 * 0.5 + 0.1 * 0.375))


def test_stage_weights_first_step_default_momentum() -> None:
    m = MEMA(num_stages=4)
    s = torch.rand(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.stage_weights(s), torch.ones(4))
    assert torch.equal(m.feat_baseline, s)  # first observed value, bit-exact
    assert bool(m.feat_ready) and not bool(m.out_ready)
    # Default lambda_f = 5, m = 0.99: alpha = 1 - 5 * (b - s), b = 0.99 b + 0.01 s.
    # Alignment dropping 0.1 below the baseline halves the stage weight.
    s2 = s - 0.1
    torch.testing.assert_close(m.stage_weights(s2), torch.full((4,), 0.5))
    torch.testing.assert_close(m.feat_baseline, 0.99 * s + 0.01 * s2)


def test_sample_weights_sequence() -> None:
    m = MEMA(num_stages=1, momentum=0.5, lambda_out=2.0)  # penalty 0.1 * 2 = 0.2
    # Step 1: B := mean c = 0.25; beta = 1 - 0.2 * relu(0.25 - c).
    beta = m.sample_weights(_t(0.5, 0.0, 1.0, -0.5))
    torch.testing.assert_close(beta, _t(1.0, 0.95, 1.0, 0.85))
    _exact(m.out_baseline, torch.tensor(0.25))
    # Step 2: B updated first: 0.5 * 0.25 + 0.5 * 0.5 = 0.375, then used.
    # (Using the old B = 0.25 would give 0.95 for the last two.)
    beta = m.sample_weights(_t(1.0, 1.0, 0.0, 0.0))
    _exact(m.out_baseline, torch.tensor(0.375))
    torch.testing.assert_close(beta, _t(1.0, 1.0, 0.925, 0.925))


def test_sample_weights_clip() -> None:
    m = MEMA(num_stages=1, momentum=0.5, lambda_out=20.0)  # penalty 2
    # B = mean(1, -1, 0.5, -0.5) = 0; beta = 1 - 2 * relu(-c): (1, -1 -> 0.5, 1, 0 -> 0.5).
    beta = m.sample_weights(_t(1.0, -1.0, 0.5, -0.5))
    _exact(beta, _t(1.0, 0.5, 1.0, 0.5))
    # Above the baseline the weight is exactly 1: relu makes 1 the upper bound.
    m = MEMA(num_stages=1)
    c = torch.linspace(-1, 1, 9)
    beta = m.sample_weights(c)
    assert torch.equal(m.out_baseline, c.mean())
    assert torch.equal(beta[c >= c.mean()], torch.ones(int((c >= c.mean()).sum())))
    assert (beta[c < c.mean()] < 1).all() and beta.min() >= 0.5


def test_state_dict_round_trip() -> None:
    a = MEMA(num_stages=3, momentum=0.5)
    a.stage_weights(_t(0.5, 0.25, 0.0))
    a.stage_weights(_t(0.25, 0.5, 0.0))
    a.sample_weights(_t(0.5, -0.5))
    sd = a.state_dict()
    assert set(sd) == {"feat_baseline", "out_baseline", "feat_ready", "out_ready"}

    b = MEMA(num_stages=3, momentum=0.5)
    b.load_state_dict(sd)
    _exact(b.feat_baseline, _t(0.375, 0.375, 0.0))
    assert bool(b.feat_ready) and bool(b.out_ready)
    s, c = _t(0.0, 0.0, 0.5), _t(0.25, -0.25)
    _exact(b.stage_weights(s), a.stage_weights(s))
    _exact(b.sample_weights(c), a.sample_weights(c))
    # A fresh scaler would answer 1.0 for the first stage step: the state mattered.
    assert not torch.equal(MEMA(num_stages=3, momentum=0.5).stage_weights(s), b.stage_weights(s))


def test_sync_hook_is_applied() -> None:
    seen: list[torch.Tensor] = []

    def fixed(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.full_like(x, 0.75)

    m = MEMA(num_stages=2, momentum=0.5, lambda_feat=2.0, lambda_out=2.0, sync=fixed)
    m.stage_weights(_t(0.0, 0.5))
    _exact(m.feat_baseline, _t(0.75, 0.75))
    # Local c has mean 0.25 but the synced mean is 0.75: B = 0.75 and
    # beta = 1 - 0.2 * (0.75 - c) = (0.85, 0.95) (unsynced would give (0.95, 1.0)).
    beta = m.sample_weights(_t(0.0, 0.5))
    _exact(m.out_baseline, torch.tensor(0.75))
    torch.testing.assert_close(beta, _t(0.85, 0.95))
    # The hook saw the batch statistics: s itself, and the mean of c.
    _exact(seen[0], _t(0.0, 0.5))
    _exact(seen[1], torch.tensor(0.25))
    assert "sync=fixed" in repr(m)


def test_in_place_sync_leaves_caller_tensor_alone() -> None:
    # torch.distributed.all_reduce works in place; the caller's s must not change.
    m = MEMA(num_stages=2, sync=lambda x: x.mul_(2))
    s = _t(0.25, 0.5)
    m.stage_weights(s)
    _exact(s, _t(0.25, 0.5))
    _exact(m.feat_baseline, _t(0.5, 1.0))


def test_dtypes_no_grad_and_repr() -> None:
    m = MEMA(num_stages=2, momentum=0.5)
    s = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    alpha = m.stage_weights(s)
    assert alpha.dtype == torch.float32 and not alpha.requires_grad
    with torch.no_grad():
        beta = m.sample_weights(torch.tensor([0.5, -0.5], dtype=torch.bfloat16))
    assert beta.dtype == torch.float32 and m.out_baseline.dtype == torch.float32
    assert "num_stages=2, momentum=0.5, lambda_feat=5.0, lambda_out=2.0" in repr(m)


def test_traceable_without_graph_breaks() -> None:
    # fullgraph=True fails on any host sync or Python branch on a tensor value.
    m = MEMA(num_stages=2, momentum=0.5, lambda_feat=2.0)

    def step(s: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return m.stage_weights(s), m.sample_weights(c)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    alpha, _ = compiled(_t(0.5, 0.25), _t(0.5, 0.0))
    _exact(alpha, _t(1.0, 1.0))
    alpha, beta = compiled(_t(0.25, 0.5), _t(1.0, 0.5))
    _exact(alpha, _t(0.5, 1.5))
    _exact(m.feat_baseline, _t(0.375, 0.375))
    # B = 0.5 * 0.25 + 0.5 * 0.75 = 0.5
    _exact(m.out_baseline, torch.tensor(0.5))
    torch.testing.assert_close(beta, _t(1.0, 1.0))
