import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from relkd.losses import kd_loss


def test_kd_loss_hand_computed():
    # Two classes, one sample, T = 2: p_t = softmax([2, 0] / 2), p_s = softmax([0, 0] / 2).
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[2.0, 0.0]])
    pt1 = math.exp(1) / (math.exp(1) + 1)
    pt = [pt1, 1 - pt1]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    assert kd_loss(zs, zt, temperature=2.0).item() == pytest.approx(kl * 4, rel=1e-6)


def test_kd_loss_batchmean_and_zero_at_equal():
    """Against an independent reference: T^2 * sum_i KL(p_t,i || p_s,i) / B written with numpy,
    and with torch's own kl_div(reduction="batchmean"); per-sample 'mean' (over B * C elements)
    or a missing T^2 would differ by factors of C or T^2."""
    torch.manual_seed(0)
    z = torch.randn(8, 10)
    assert kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3
    for t in (1.0, 4.0):
        a, b = zs.double().numpy() / t, zt.double().numpy() / t
        ps = np.exp(a) / np.exp(a).sum(1, keepdims=True)
        pt = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        want = t**2 * (pt * (np.log(pt) - np.log(ps))).sum() / 8
        assert kd_loss(zs, zt, temperature=t).item() == pytest.approx(want, rel=1e-5)
        ref = F.kl_div(
            F.log_softmax(zs.double() / t, 1), F.softmax(zt.double() / t, 1), reduction="batchmean"
        )
        assert kd_loss(zs, zt, temperature=t).item() == pytest.approx(t**2 * ref.item(), rel=1e-5)


def test_kd_loss_no_teacher_grad_and_fp32_under_autocast():
    zs = torch.randn(4, 5, requires_grad=True)
    zt = torch.randn(4, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(zs.bfloat16(), zt.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert zt.grad is None and torch.isfinite(zs.grad).all()


def test_kd_loss_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0)
