"""CORSD loss terms (relkd.losses.corsd), including the official-code defects we do not copy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relkd.losses import corsd as L
from relkd.losses import kd_loss
from relkd.methods._corsd_nets import ClassCentreNet


def test_kl_t_matches_hand_computation_and_kd():
    # One sample, two classes, T = 2: KL(softmax([2, 0] / 2) || softmax([0, 0] / 2)) * 4.
    z, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    q1 = math.exp(1) / (math.exp(1) + 1)
    kl = sum(q * math.log(q / 0.5) for q in (q1, 1 - q1))
    assert L.kl_t(z, zt, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    assert L.kl_t(a, b, 3.0).item() == pytest.approx(kd_loss(a, b, 3.0).item(), rel=1e-6)


@pytest.mark.filterwarnings("ignore:reduction")
def test_defect2_kl_on_softmax_is_finite_and_zero_at_equal_inputs():
    torch.manual_seed(0)
    z = torch.randn(8, 10) * 5
    # The official F.kl_div(logits, logits) on raw logits: log of negative "probabilities".
    assert not torch.isfinite(F.kl_div(z, z)).all()
    assert torch.isfinite(L.kl_t(z, torch.randn(8, 10) * 5))
    assert L.kl_t(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_t_detach_switch_and_fp32():
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    L.kl_t(a, b, detach_target=True).backward()
    assert b.grad is None and a.grad is not None
    L.kl_t(a, b, detach_target=False).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.kl_t(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        L.kl_t(a, b, 0.0)


def test_soft_ce_t_softens_the_two_hot_target_as_officially():
    torch.manual_seed(0)
    o = torch.randn(3, 5)
    q = L.two_hot(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 4]), 5)
    assert torch.equal(q.sum(1), torch.ones(3))
    assert q[1, 1] == 1.0 and q[0, 0] == 0.5 and q[0, 1] == 0.5
    T = 3.0
    want = -(F.softmax(q / T, 1) * F.log_softmax(o / T, 1)).sum(1).mean()
    assert L.soft_ce_t(o, q, T).item() == pytest.approx(want.item(), rel=1e-6)
    # ... which is not the CE with q itself (the official quirk, kept).
    plain = -(q * F.log_softmax(o / T, 1)).sum(1).mean()
    assert L.soft_ce_t(o, q, T).item() != pytest.approx(plain.item(), rel=1e-3)


def test_defect3_hinge_formula_kept_always_active_in_unit_interval():
    torch.manual_seed(0)
    p, n = torch.rand(16), torch.rand(16)  # sigmoid scores live in (0, 1)
    assert L.triplet_hinge(p, n, 1.0).item() == pytest.approx((p - n + 1).mean().item(), rel=1e-6)
    # the max(., 0) only bites with a smaller margin
    assert L.triplet_hinge(torch.tensor([0.1]), torch.tensor([0.9]), 0.5).item() == 0.0


def test_relation_mse_detach():
    s = torch.tensor([0.2, 0.4], requires_grad=True)
    d = torch.tensor([0.5, 0.5], requires_grad=True)
    loss = L.relation_mse(s, d, detach=True)
    assert loss.item() == pytest.approx((0.3**2 + 0.1**2) / 2)
    loss.backward()
    assert d.grad is None
    L.relation_mse(s, d, detach=False).backward()
    assert d.grad is not None


def test_class_memory_update_hand_made_with_repeated_classes():
    m = torch.eye(3)
    y = torch.tensor([0, 2, 0])
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0], [0.1, 0.8, 0.1]], requires_grad=True)
    L.update_class_memory(m, y, probs)
    # rows accumulate every sample of their class (a plain M[y] += p would drop one of the 0s)
    want = torch.tensor([[1.6, 1.05, 0.35], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(m, want)
    assert not m.requires_grad


def test_random_wrong_class_never_the_label_and_covers_the_others():
    torch.manual_seed(0)
    y = torch.zeros(2000, dtype=torch.long)
    w = L.random_wrong_class(y, 5)
    assert (w != y).all() and set(w.tolist()) == {1, 2, 3, 4}


def test_defect4_class_centre_relation_batched_in_train_mode():
    torch.manual_seed(0)
    C = 4
    net = ClassCentreNet(C).train()
    # the official per-sample call: BatchNorm1d on one row fails in train mode
    with pytest.raises(ValueError):
        net(torch.randn(1, 2 * C))
    logits = torch.randn(2, C, requires_grad=True)
    probs = F.softmax(logits, 1)
    mem = torch.eye(C) * 3
    y, wrong = torch.tensor([0, 1]), torch.tensor([2, 3])
    val = L.class_centre_relation(net, probs, mem, y, wrong)
    pairs = torch.cat([torch.cat([probs, mem[y]], 1), torch.cat([probs, mem[wrong]], 1)])
    r = net(pairs).reshape(-1)
    assert val.item() == pytest.approx((r[:2] - r[2:]).mean().item(), rel=1e-6, abs=1e-7)
    assert val.ndim == 0 and -1 < val.item() < 1
    val.backward()
    assert logits.grad is not None
    assert all(p.grad is not None for p in net.parameters())
