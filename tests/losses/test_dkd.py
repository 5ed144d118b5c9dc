"""DKD against its definitions (loops), the paper's pseudo-code, and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relkd.losses.dkd import dkd_loss, dkd_terms


def _ref_dkd(zs, zt, y, alpha, beta, T):
    """Definitions of the paper, one sample at a time in float64 numpy."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    b, c = zs.shape
    tckd = nckd = 0.0
    for i in range(b):
        ps = np.exp(zs[i] / T) / np.exp(zs[i] / T).sum()
        pt = np.exp(zt[i] / T) / np.exp(zt[i] / T).sum()
        g = int(y[i])
        bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        tckd += float((bt * np.log(bt / bs)).sum())
        others = [k for k in range(c) if k != g]
        qs, qt = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
        nckd += float((qt * np.log(qt / qs)).sum())
    return T**2 * (alpha * tckd + beta * nckd) / b


def _pseudo_code_dkd(zs, zt, y, alpha, beta, T):
    """The paper's Algorithm 1: masks, probabilities summed per group, kl_div(sum) / B."""
    gt = F.one_hot(y, zs.shape[1]).to(zs.dtype)
    other = 1 - gt
    ps, pt = F.softmax(zs / T, dim=1), F.softmax(zt / T, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / y.shape[0]
    pt2 = F.softmax(zt / T - 1000.0 * gt, dim=1)
    log_ps2 = F.log_softmax(zs / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * T**2 / y.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0)])
def test_matches_definitions_and_pseudo_code(T, alpha, beta):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 4, 1])
    got = dkd_loss(zs, zt, y, alpha=alpha, beta=beta, temperature=T)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), _ref_dkd(zs, zt, y, alpha, beta, T), rtol=1e-10)
    np.testing.assert_allclose(
        got.item(), _pseudo_code_dkd(zs, zt, y, alpha, beta, T).item(), rtol=1e-10
    )
    # fp32 inputs give the same value to fp32 accuracy
    got32 = dkd_loss(zs.float(), zt.float(), y, alpha=alpha, beta=beta, temperature=T)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.item(), got.item(), rtol=1e-5)


def test_hand_computed_values():
    # C = 2: one non-target class -> NCKD = 0. Student [0, 0], teacher [ln 3, 0], target 0, T = 1:
    # b_s = (1/2, 1/2), b_t = (3/4, 1/4) -> TCKD = 3/4 ln(3/2) + 1/4 ln(1/2).
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    t = dkd_terms(zs, zt, y, temperature=1.0)
    assert t["nckd"].item() == pytest.approx(0.0, abs=1e-7)
    tckd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert t["tckd"].item() == pytest.approx(tckd, rel=1e-6)
    # C = 3, student uniform, teacher [0, ln 3, 0], target 0, T = 1:
    # p_t = (1/5, 3/5, 1/5): b_t = (1/5, 4/5), b_s = (1/3, 2/3); non-target q_t = (3/4, 1/4),
    # q_s = (1/2, 1/2).
    zs = torch.zeros(1, 3)
    zt = torch.tensor([[0.0, math.log(3.0), 0.0]])
    tckd = 0.2 * math.log(0.2 / (1 / 3)) + 0.8 * math.log(0.8 / (2 / 3))
    nckd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = dkd_loss(zs, zt, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert loss.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-6)
    # T^2 scaling: temperature 2 on logits doubled gives the same KLs times 4
    loss2 = dkd_loss(2 * zs, 2 * zt, y, alpha=1.0, beta=8.0, temperature=2.0)
    assert loss2.item() == pytest.approx(4 * (tckd + 8.0 * nckd), rel=1e-6)


def test_zero_at_equal_logits_and_nckd_ignores_gt_logit():
    zs = torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    assert dkd_loss(zs, zs.clone(), y).item() == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(6, 10)
    bump = torch.zeros(6, 10).scatter_(1, y[:, None], 5.0)
    a, b = dkd_terms(zs, zt, y), dkd_terms(zs + bump, zt - bump, y)
    assert a["nckd"].item() == pytest.approx(b["nckd"].item(), rel=1e-5)
    assert a["tckd"].item() != pytest.approx(b["tckd"].item(), rel=1e-3)


def test_confident_teacher_stays_finite():
    # teacher puts all its fp32 mass on the target: the pseudo-code's log(0) would give inf/nan.
    zs = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    zt = torch.tensor([[400.0, 0.0, 0.0]])
    loss = dkd_loss(zs, zt, torch.tensor([0]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()


def test_gradcheck_float64():
    zs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 0, 4])
    assert torch.autograd.gradcheck(
        lambda a, b: dkd_loss(a, b, y, temperature=2.0), (zs, zt), fast_mode=True
    )


def test_autocast_bf16_finite_grads_fp32_value():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10)
    x, zt = torch.randn(8, 16), torch.randn(8, 10) * 3
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = dkd_loss(logits, zt.bfloat16(), y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref = dkd_loss(logits.detach().float(), zt.bfloat16().float(), y)
    torch.testing.assert_close(loss.detach(), ref)


def test_bad_inputs():
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="targets"):
        dkd_loss(zs, zt, torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        dkd_loss(zs, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="2 classes"):
        dkd_loss(zs[:, :1], zt[:, :1], torch.zeros(4, dtype=torch.long))
