"""DIST against a numpy reference (np.corrcoef), torchdistill's DISTLoss when installed, and
invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relkd.losses.dist import dist_loss, dist_terms


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _ref_dist(zs, zt, beta, gamma, tau):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    ps = np.stack([_softmax(r / tau) for r in zs])
    pt = np.stack([_softmax(r / tau) for r in zt])
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(ps.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    return tau**2 * (beta * inter + gamma * intra), inter, intra


def _logits(b=4, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
    )


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_matches_numpy_reference(beta, gamma, tau):
    zs, zt = _logits()
    want, inter, intra = _ref_dist(zs, zt, beta, gamma, tau)
    got = dist_loss(zs, zt, beta=beta, gamma=gamma, temperature=tau)
    np.testing.assert_allclose(got.item(), want, rtol=1e-10)
    t = dist_terms(zs, zt, temperature=tau)
    np.testing.assert_allclose([t["inter"].item(), t["intra"].item()], [inter, intra], rtol=1e-10)
    got32 = dist_loss(zs.float(), zt.float(), beta=beta, gamma=gamma, temperature=tau)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.item(), want, rtol=1e-5)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_matches_torchdistill(beta, gamma, tau):
    mid_level = pytest.importorskip("torchdistill.losses.mid_level")
    zs, zt = _logits(8, 10, seed=1)
    ref = mid_level.DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)
    want = ref({".": {"output": zs}}, {".": {"output": zt}})
    got = dist_loss(zs, zt, beta=beta, gamma=gamma, temperature=tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hand_values():
    # equal logits -> both correlations 1 -> loss 0
    zs, _ = _logits(6, 7)
    assert dist_loss(zs, zs.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-12)
    # B = 2, C = 2: each row's centred probabilities are +-(p - 1/2); if the student's preferred
    # class is the other one in both rows, every row and column correlation is -1 -> inter =
    # intra = 2, loss = tau^2 * (beta * 2 + gamma * 2).
    zs = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    zt = torch.tensor([[0.0, 3.0], [1.0, 0.0]], dtype=torch.float64)
    t = dist_terms(zs, zt)
    assert t["inter"].item() == pytest.approx(2.0, abs=1e-12)
    assert t["intra"].item() == pytest.approx(2.0, abs=1e-12)
    assert dist_loss(zs, zt, beta=0.5, gamma=3.0, temperature=2.0).item() == pytest.approx(
        4.0 * (0.5 * 2 + 3.0 * 2), rel=1e-12
    )


def test_invariant_to_per_row_constant():
    zs, zt = _logits(5, 6)
    shift = torch.randn(5, 1, dtype=torch.float64) * 10
    a = dist_loss(zs, zt, temperature=4.0)
    b = dist_loss(zs + shift, zt - shift, temperature=4.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    zs, zt = _logits(3, 4)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: dist_loss(a, b, temperature=2.0), (zs, zt), fast_mode=True
    )


def test_gather_is_noop_without_process_group():
    zs, zt = _logits(4, 5)
    torch.testing.assert_close(dist_loss(zs, zt, gather=True), dist_loss(zs, zt))


def test_autocast_bf16_finite_grads_fp32_value():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10)
    x, zt = torch.randn(8, 16), torch.randn(8, 10) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = dist_loss(logits, zt.bfloat16(), temperature=4.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref = dist_loss(logits.detach().float(), zt.bfloat16().float(), temperature=4.0)
    torch.testing.assert_close(loss.detach(), ref)


def test_bad_inputs():
    zs, zt = _logits(4, 5)
    with pytest.raises(ValueError, match="same shape"):
        dist_loss(zs, zt[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(zs, zt, temperature=0.0)
