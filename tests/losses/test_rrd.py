import math

import pytest
import torch
import torch.nn.functional as F

from relkd.losses.rrd import ring_buffer_enqueue, rrd_loss


def test_rrd_loss_hand_computed():
    # B = 1, K = 2, d = 2: z_s = (0.6, 0.8), z_t = (0.8, 0.6), Q = identity.
    zs = torch.tensor([[0.6, 0.8]])
    zt = torch.tensor([[0.8, 0.6]])
    q = torch.eye(2)
    tau_s, tau_t = 0.5, 0.25
    # teacher: s_t = (0.8, 0.6) -> softmax((3.2, 2.4))
    e0, e1 = math.exp(0.8 / tau_t), math.exp(0.6 / tau_t)
    p_t = [e0 / (e0 + e1), e1 / (e0 + e1)]
    # student: s_s = (0.6, 0.8) -> log_softmax((1.2, 1.6))
    lse = math.log(math.exp(0.6 / tau_s) + math.exp(0.8 / tau_s))
    log_p_s = [0.6 / tau_s - lse, 0.8 / tau_s - lse]
    expected = -(p_t[0] * log_p_s[0] + p_t[1] * log_p_s[1])
    got = rrd_loss(zs, zt, q, tau_s=tau_s, tau_t=tau_t)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def _loop_reference(zs, zt, q, tau_s, tau_t):
    zs, zt, q = zs.tolist(), zt.tolist(), q.tolist()
    total = 0.0
    for a, b in zip(zs, zt):
        ss = [sum(x * y for x, y in zip(a, row)) / tau_s for row in q]
        st = [sum(x * y for x, y in zip(b, row)) / tau_t for row in q]
        den = sum(math.exp(v) for v in st)
        lse = math.log(sum(math.exp(v) for v in ss))
        total -= sum(math.exp(t) / den * (s - lse) for s, t in zip(ss, st))
    return total / len(zs)


@pytest.mark.parametrize("taus", [(0.04, 0.1), (0.1, 0.02), (1.0, 1.0)])
def test_rrd_loss_matches_loop(taus):
    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    zt = F.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=1)
    got = rrd_loss(zs, zt, q, tau_s=taus[0], tau_t=taus[1])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_loop_reference(zs, zt, q, *taus), rel=1e-5)


def test_rrd_loss_gradients_and_fp32_under_autocast():
    zs = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    zt = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    q = F.normalize(torch.randn(16, 8), dim=1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rrd_loss(zs.bfloat16(), zt.bfloat16(), q)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    assert zt.grad is None and q.grad is None  # target detached, queue a constant
    zt.grad = None
    rrd_loss(zs, zt, q, detach_target=False).backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0 and q.grad is None


def test_rrd_loss_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        rrd_loss(torch.ones(1, 2), torch.ones(1, 2), torch.ones(3, 2), tau_s=0)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 10, 1], [13], [2, 25, 7], [0, 5]])
def test_ring_buffer_equals_one_row_at_a_time(sizes):
    k, d = 10, 3
    queue, ptr = torch.zeros(k, d), torch.zeros(1, dtype=torch.long)
    ref, ref_ptr = torch.zeros(k, d), 0
    start = 0
    for n in sizes:
        keys = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, d)
        start += n
        ring_buffer_enqueue(queue, ptr, keys)
        for row in keys:
            ref[ref_ptr] = row
            ref_ptr = (ref_ptr + 1) % k
        assert torch.equal(queue, ref) and int(ptr) == ref_ptr
