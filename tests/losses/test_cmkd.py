"""CMKD (our reconstruction) against a loop reference, gradcheck, and the invariants the spec asks
for: ~0 at equal logits (soft-rank error quantified), per-row constant invariance, Spearman ~0 for
rank-equal but differently scaled logits, finite gradients under bf16 autocast."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from relkd.losses import softrank
from relkd.losses.cmkd import cmkd_loss, cmkd_terms


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _ref_cmkd(zs, zt, tau=4.0, difficulty="teacher_entropy", rank_eps=0.1, intra_weight=1.0):
    """Plain loops / np.corrcoef, float64."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    b, c = zs.shape
    ps = np.stack([_softmax(r / tau) for r in zs])
    pt = np.stack([_softmax(r / tau) for r in zt])
    lp, ls, w = np.zeros(b), np.zeros(b), np.zeros(b)
    for i in range(b):
        lp[i] = 1 - np.corrcoef(ps[i], pt[i])[0, 1]
        x = (zs[i] - zs[i].mean()) / zs[i].std()
        soft = np.array(
            [
                0.5 + sum(1 / (1 + math.exp(-(x[k] - x[j]) / rank_eps)) for j in range(c))
                for k in range(c)
            ]
        )
        hard = np.empty(c)
        hard[np.argsort(zt[i])] = np.arange(1, c + 1)
        ls[i] = 1 - np.corrcoef(soft, hard)[0, 1]
        d = -sum(p * math.log(p) for p in pt[i]) / math.log(c)
        w[i] = {"teacher_entropy": d, "teacher_entropy_inverse": 1 - d, "none": 0.5}[difficulty]
    intra = 1 - np.mean([np.corrcoef(ps[:, k], pt[:, k])[0, 1] for k in range(c)])
    mix = np.mean((1 - w) * lp + w * ls)
    parts = {
        "pearson": lp.mean(),
        "spearman": ls.mean(),
        "intra": intra,
        "mix": mix,
        "weight": w.mean(),
    }
    return tau**2 * (mix + intra_weight * intra), parts


def _logits(b=4, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
    )


@pytest.mark.parametrize("difficulty", ["teacher_entropy", "teacher_entropy_inverse", "none"])
@pytest.mark.parametrize("tau,rank_eps,intra_weight", [(4.0, 0.1, 1.0), (1.0, 0.5, 0.3)])
def test_matches_loop_reference(difficulty, tau, rank_eps, intra_weight):
    zs, zt = _logits()
    want, parts = _ref_cmkd(zs, zt, tau, difficulty, rank_eps, intra_weight)
    kw = {"temperature": tau, "difficulty": difficulty, "rank_eps": rank_eps}
    got = cmkd_loss(zs, zt, intra_weight=intra_weight, **kw)
    np.testing.assert_allclose(got.item(), want, rtol=1e-10)
    terms = cmkd_terms(zs, zt, **kw)
    for k, v in parts.items():
        np.testing.assert_allclose(terms[k].item(), v, rtol=1e-10, err_msg=k)
    got32 = cmkd_loss(zs.float(), zt.float(), intra_weight=intra_weight, **kw)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.item(), want, rtol=1e-4)


def test_gradcheck_float64():
    zs, zt = _logits(4, 5, seed=3)
    zs.requires_grad_(True)
    for kw in ({}, {"difficulty": "none", "temperature": 1.0, "rank_eps": 0.3}):
        assert torch.autograd.gradcheck(lambda a, kw=kw: cmkd_loss(a, zt, **kw), (zs,))


@pytest.mark.parametrize("c,bound", [(10, 1e-2), (100, 1.5e-3), (1000, 2e-4)])
def test_near_zero_at_equal_logits_soft_rank_error_quantified(c, bound):
    """Pearson and intra terms vanish; the Spearman term is the soft-rank error only.

    Measured (Gaussian logits, rank_eps 0.1 on Z-scores, 16-64 samples): L_S ~ 5e-3 (C = 10),
    6e-4 (C = 100), 7e-5 (C = 1000); it shrinks roughly linearly with rank_eps.
    """
    torch.manual_seed(0)
    z = torch.randn(64 if c < 1000 else 16, c) * 3
    t = cmkd_terms(z, z.clone())
    assert abs(t["pearson"].item()) < 1e-6
    assert abs(t["intra"].item()) < 1e-6
    assert 0 <= t["spearman"].item() < bound
    loss = cmkd_loss(z, z.clone())
    assert 0 <= loss.item() <= 16 * bound  # tau^2 * (w * L_S) with w <= 1
    small = cmkd_terms(z, z.clone(), rank_eps=0.01)["spearman"].item()
    assert small < 0.25 * t["spearman"].item()


def test_invariant_to_per_row_constant():
    zs, zt = _logits(6, 7)
    shift_s = torch.randn(6, 1, dtype=torch.float64) * 10
    shift_t = torch.randn(6, 1, dtype=torch.float64) * 10
    for kw in ({}, {"difficulty": "none"}, {"temperature": 1.0}):
        a = cmkd_terms(zs, zt, **kw)
        b = cmkd_terms(zs + shift_s, zt + shift_t, **kw)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11, msg=k)
        torch.testing.assert_close(
            cmkd_loss(zs, zt, **kw),
            cmkd_loss(zs + shift_s, zt + shift_t, **kw),
            rtol=1e-9,
            atol=1e-11,
        )


def test_spearman_near_zero_for_rank_equal_differently_scaled_logits():
    torch.manual_seed(1)
    # each row a random permutation of an evenly spaced grid: distinct values, known minimum gap
    grid = torch.linspace(-2.0, 2.0, 20, dtype=torch.float64)
    zt = grid[torch.argsort(torch.rand(32, 20), dim=1)]
    for zs in (5.0 * zt + 3.0, torch.exp(zt), zt + 0.2 * zt**3):
        t = cmkd_terms(zs, zt)
        assert t["spearman"].item() < 1e-2  # soft-rank error only (cf. equal logits)
        assert t["pearson"].item() > 1e-2  # the probability values differ
        # sharper soft rank: the Spearman term goes to 0 (all Z-score gaps / eps >= ~15)
        assert cmkd_terms(zs, zt, rank_eps=1e-3)["spearman"].item() < 1e-6
    # pure rescaling: Z-scores are identical, so the Spearman term equals the equal-logit one
    torch.testing.assert_close(
        cmkd_terms(5.0 * zt + 3.0, zt)["spearman"], cmkd_terms(zt.clone(), zt)["spearman"]
    )
    # a reversed order is maximally wrong: Spearman ~ 2
    assert cmkd_terms(-zt, zt)["spearman"].item() > 1.9


def test_difficulty_weights():
    zs, zt = _logits(5, 6)
    probs = torch.softmax(zt / 4.0, dim=1)
    d = -(probs * probs.log()).sum(1) / math.log(6)
    torch.testing.assert_close(cmkd_terms(zs, zt)["weight"], d.mean())
    torch.testing.assert_close(
        cmkd_terms(zs, zt, difficulty="teacher_entropy_inverse")["weight"], 1 - d.mean()
    )
    t = cmkd_terms(zs, zt, difficulty="none")
    assert t["weight"].item() == 0.5
    torch.testing.assert_close(t["mix"], 0.5 * (t["pearson"] + t["spearman"]))
    # loss = tau^2 * (mix + intra_weight * intra)
    torch.testing.assert_close(
        cmkd_loss(zs, zt, difficulty="none", intra_weight=0.3), 16 * (t["mix"] + 0.3 * t["intra"])
    )


def test_soft_isotonic_falls_back_to_soft_sigmoid(monkeypatch):
    try:
        import torchsort  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchsort installed: isotonic rank is used, no fallback")
    monkeypatch.setattr(softrank, "_ISOTONIC_WARNED", False)
    zs, zt = _logits()
    with pytest.warns(RuntimeWarning, match="torchsort"):
        got = cmkd_loss(zs, zt, rank="soft_isotonic")
    torch.testing.assert_close(got, cmkd_loss(zs, zt, rank="soft_sigmoid"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmkd_loss(zs, zt, rank="soft_isotonic")  # warned once only


def test_autocast_bf16_finite_grads_fp32_value():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 100)
    x, zt = torch.randn(8, 16), torch.randn(8, 100) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = cmkd_loss(logits, zt.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    ref = cmkd_loss(logits.detach().float(), zt.bfloat16().float())
    torch.testing.assert_close(loss.detach(), ref)


def test_invalid_switches_name_value_and_choices():
    zs, zt = _logits()
    with pytest.raises(ValueError, match=r"difficulty='hard'.*teacher_entropy_inverse"):
        cmkd_loss(zs, zt, difficulty="hard")
    with pytest.raises(ValueError, match=r"rank='sort'.*soft_sigmoid.*soft_isotonic"):
        cmkd_loss(zs, zt, rank="sort")
    with pytest.raises(ValueError, match="rank_eps"):
        cmkd_loss(zs, zt, rank_eps=0.0)
    with pytest.raises(ValueError, match="2 classes"):
        cmkd_loss(zs[:, :1], zt[:, :1])
    with pytest.raises(ValueError, match="same shape"):
        cmkd_loss(zs, zt[:3])


@pytest.mark.parametrize("c,bound", [(10, 2e-2), (100, 6e-3), (1000, 5e-3)])
def test_sorting_network_rank_near_zero_at_equal_logits(c, bound):
    """rank="sorting_network": the Spearman term at z_s = z_t is its soft-rank error only.
    Measured (rank_eps 0.1): 1.2e-2 (C = 10), 4.2e-3 (C = 100), 3.3e-3 (C = 1000), larger than
    the pairwise sigmoid's because the relaxation compounds over the network's layers; it
    shrinks with rank_eps (rank_eps 0.01: 9e-4, 1.4e-4, 4e-5)."""
    torch.manual_seed(0)
    z = torch.randn(64 if c < 1000 else 16, c) * 3
    t = cmkd_terms(z, z.clone(), rank="sorting_network")
    assert abs(t["pearson"].item()) < 1e-6 and abs(t["intra"].item()) < 1e-6
    assert 0 <= t["spearman"].item() < bound
    sharp = cmkd_terms(z, z.clone(), rank="sorting_network", rank_eps=0.01)["spearman"].item()
    assert sharp < 0.3 * t["spearman"].item()
    assert cmkd_terms(-z, z, rank="sorting_network")["spearman"].item() > 1.8  # reversed order


def test_sorting_network_bf16_finite_grads():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 100)
    x, zt = torch.randn(8, 16), torch.randn(8, 100) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cmkd_loss(model(x), zt.bfloat16(), rank="sorting_network")
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
