import math

import pytest
import torch

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
    torch.manual_seed(0)
    z = torch.randn(8, 10)
    assert kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.randn(8, 10), torch.randn(8, 10)
    per = [kd_loss(zs[i : i + 1], zt[i : i + 1]).item() for i in range(8)]
    assert kd_loss(zs, zt).item() == pytest.approx(sum(per) / 8, rel=1e-5)


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
