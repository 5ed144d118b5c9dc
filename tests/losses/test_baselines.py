"""The CRD-table baseline losses against (a) the formulas written out by hand with plain numpy
loops, independent of relkd, and (b) torchdistill's implementations where it has the method.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from relkd.losses.feature import (
    ab_loss,
    at_loss,
    fsp_loss,
    fsp_matrix,
    ft_loss,
    hint_loss,
    match_spatial,
    nst_loss,
)
from relkd.losses.logit_std import zscore_logits
from relkd.losses.relation import (
    cc_gaussian_loss,
    cc_loss,
    gaussian_correlation,
    pairwise_distances,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
from relkd.losses.vid import vid_log_scale_init, vid_loss


def _rand(*shape, seed=0, relu=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.clamp(min=0) if relu else x


def _np(x):
    return x.detach().double().numpy()


def _pool2(x):
    """2x2 average pooling of a numpy [B, C, H, W] array (= adaptive pooling to H/2)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def _td():
    return pytest.importorskip("torchdistill.losses.mid_level")


# ---------------------------------------------------------------- hand-written references


def _att(f, p=2):  # [C, H, W] -> [H*W], L2-normalised mean_c |f|^p
    a = (np.abs(f) ** p).mean(axis=0).reshape(-1)
    return a / max(np.sqrt((a**2).sum()), 1e-12)


def _unit(v):
    return v / max(np.sqrt((v**2).sum()), 1e-12)


def _huber(x, y):
    d = np.abs(x - y)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


# ---------------------------------------------------------------- feature losses


def test_match_spatial_pools_the_larger_map():
    a, b = _rand(2, 3, 8, 8), _rand(2, 5, 4, 4, seed=1)
    pa, pb = match_spatial(a, b)
    assert pb is b and pa.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(_np(pa), _pool2(_np(a)), rtol=1e-12)


def test_hint_loss_hand():
    s, t = _rand(2, 3, 4, 4), _rand(2, 3, 4, 4, seed=1)
    assert hint_loss(s, t).item() == pytest.approx(((_np(s) - _np(t)) ** 2).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="hint"):
        hint_loss(s, t[:, :2])


def test_at_loss_hand_with_pooling():
    s, t = _rand(3, 4, 4, 4, relu=True), _rand(3, 6, 8, 8, seed=1, relu=True)
    ts = _pool2(_np(t))
    ref = np.mean([((_att(_np(s)[b]) - _att(ts[b])) ** 2).mean() for b in range(3)])
    assert at_loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    # p = 4 through the same formula
    ref4 = np.mean([((_att(_np(s)[b], 4) - _att(ts[b], 4)) ** 2).mean() for b in range(3)])
    assert at_loss(s, t, p=4).item() == pytest.approx(ref4, rel=1e-5)


def test_at_loss_matches_torchdistill():
    td = _td()
    s, t = _rand(3, 4, 6, 6, relu=True), _rand(3, 6, 6, 6, seed=1, relu=True)
    pair = {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}
    ref = td.ATLoss({"p": pair}, mode="code")({"s": {"output": s}}, {"t": {"output": t}})
    assert at_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_nst_loss_hand():
    s, t = _rand(2, 3, 4, 4), _rand(2, 5, 8, 8, seed=1)
    ts = _pool2(_np(t))
    per = []
    for b in range(2):
        xs = [_unit(c.reshape(-1)) for c in _np(s)[b]]
        xt = [_unit(c.reshape(-1)) for c in ts[b]]

        def mk(a_list, b_list):
            return np.mean([(x @ y) ** 2 for x in a_list for y in b_list])

        per.append(mk(xt, xt) + mk(xs, xs) - 2 * mk(xs, xt))
    assert nst_loss(s, t).item() == pytest.approx(np.mean(per), rel=1e-5)
    assert nst_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_fsp_matrix_and_loss_hand():
    s = [_rand(2, 3, 8, 8), _rand(2, 4, 4, 4, seed=1), _rand(2, 5, 4, 4, seed=2)]
    t = [_rand(2, 3, 8, 8, seed=3), _rand(2, 4, 4, 4, seed=4), _rand(2, 5, 4, 4, seed=5)]

    def g(a, b):  # a [B, C1, H, W] (pooled to b's size when larger), b [B, C2, H', W']
        if a.shape[2] > b.shape[2]:
            a = _pool2(a)
        out = np.zeros((a.shape[0], a.shape[1], b.shape[1]))
        for n in range(a.shape[0]):
            for i in range(a.shape[1]):
                for j in range(b.shape[1]):
                    out[n, i, j] = (a[n, i] * b[n, j]).mean()
        return out

    np.testing.assert_allclose(
        _np(fsp_matrix(s[0], s[1])), g(_np(s[0]), _np(s[1])), rtol=1e-5, atol=1e-6
    )
    ref = sum(
        ((g(_np(s[i]), _np(s[i + 1])) - g(_np(t[i]), _np(t[i + 1]))) ** 2).mean() for i in range(2)
    )
    assert fsp_loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ValueError, match="fsp"):
        fsp_loss(s[:1], t[:1])


def test_fsp_matrix_matches_torchdistill():
    td = _td()
    a, b = _rand(2, 3, 4, 4), _rand(2, 6, 4, 4, seed=1)
    ref = td.FSPLoss.compute_fsp_matrix(a, b)
    torch.testing.assert_close(fsp_matrix(a, b).double(), ref, rtol=1e-5, atol=1e-7)


def test_ab_loss_hand():
    s, t = _rand(2, 3, 4, 4) * 2, _rand(2, 3, 4, 4, seed=1)
    m = 1.0
    ns, nt = _np(s), _np(t)
    total = 0.0
    for x, y in zip(ns.reshape(-1), nt.reshape(-1)):
        if y > 0 and x <= m:
            total += (x - m) ** 2
        elif y <= 0 and x > -m:
            total += (x + m) ** 2
    assert ab_loss(s, t, m).item() == pytest.approx(total / 2, rel=1e-6)
    # the post-ReLU teacher map has the same sign pattern, hence the same loss
    assert ab_loss(s, t.clamp(min=0), m).item() == pytest.approx(total / 2, rel=1e-6)


def test_ab_loss_matches_torchdistill():
    td = _td()
    s, t = _rand(2, 3, 4, 4) * 2, _rand(2, 3, 4, 4, seed=1)
    pair = {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}
    crit = td.AltActTransferLoss({"p": pair}, margin=1.0, reduction="mean")
    ref = crit({"s": {"output": s}}, {"t": {"output": t}})
    assert ab_loss(s, t, 1.0).item() == pytest.approx(ref.item(), rel=1e-6)


def test_ft_loss_hand_both_forms():
    s, t = _rand(2, 4, 4, 4), _rand(2, 4, 8, 8, seed=1)
    ns, ts = _np(s), _pool2(_np(t))
    ref = np.mean([np.abs(_att(ns[b]) - _att(ts[b])).mean() for b in range(2)])
    assert ft_loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    ref_paper = np.mean(
        [np.abs(_unit(ns[b].reshape(-1)) - _unit(ts[b].reshape(-1))).sum() for b in range(2)]
    )
    assert ft_loss(s, t, p=1, form="paper").item() == pytest.approx(ref_paper, rel=1e-5)
    with pytest.raises(ValueError, match="form"):
        ft_loss(s, t, form="nope")


def test_ft_paper_form_matches_torchdistill():
    td = _td()
    s, t = _rand(2, 4, 4, 4), _rand(2, 4, 4, 4, seed=1)
    ref = td.FTLoss(p=2)({"translator": {"output": s}}, {"paraphraser": {"output": t}})
    assert ft_loss(s, t, p=2, form="paper").item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- relational losses


def test_sp_loss_hand():
    s, t = _rand(4, 3, 2, 2), _rand(4, 5, 2, 2, seed=1)
    fs, ft = _np(s).reshape(4, -1), _np(t).reshape(4, -1)
    gs = np.stack([_unit(r) for r in fs @ fs.T])
    gt = np.stack([_unit(r) for r in ft @ ft.T])
    assert sp_loss(s, t).item() == pytest.approx(((gt - gs) ** 2).sum() / 16, rel=1e-6)


# No torchdistill comparison for SP: its SPKDLoss (1.1.5) calls ``normalize(G, 1)``, i.e. an L1
# row normalisation (the second positional argument is p), where the paper and the CRD code
# L2-normalise the rows.


def test_cc_loss_hand():
    s, t = _rand(5, 4), _rand(5, 4, seed=1)
    d = np.abs(_np(s) - _np(t))
    ref = np.mean([(d[i] * d[i + 1]).sum() for i in range(4)])
    assert cc_loss(s, t).item() == pytest.approx(ref, rel=1e-6)


def test_gaussian_correlation_approximates_the_rbf_kernel():
    e = torch.nn.functional.normalize(_rand(4, 3), dim=1)
    exact = np.array([[math.exp(-0.4 * ((a - b) ** 2).sum()) for b in _np(e)] for a in _np(e)])
    np.testing.assert_allclose(_np(gaussian_correlation(e, 0.4, order=12)), exact, rtol=1e-9)
    # P = 2 by hand
    dot = _np(e) @ _np(e).T
    ref2 = math.exp(-0.8) * (1 + 0.8 * dot + 0.8**2 / 2 * dot**2)
    np.testing.assert_allclose(_np(gaussian_correlation(e, 0.4, 2)), ref2, rtol=1e-9)


def test_cc_gaussian_matches_torchdistill_correlation_and_hand_loss():
    td = _td()
    s = torch.nn.functional.normalize(_rand(4, 3), dim=1)
    t = torch.nn.functional.normalize(_rand(4, 3, seed=1), dim=1)
    crit = td.CCKDLoss("s", "t", {"type": "gaussian", "gamma": 0.4, "max_p": 2}, "batchmean")
    torch.testing.assert_close(
        gaussian_correlation(s, 0.4, 2), crit.compute_cc_mat_by_gaussian_rbf(s)
    )
    c_s, c_t = _np(gaussian_correlation(s, 0.4, 2)), _np(gaussian_correlation(t, 0.4, 2))
    ref = ((c_t - c_s) ** 2).sum() / 16  # paper: squared Frobenius norm / n^2
    assert cc_gaussian_loss(s * 3, t * 0.5).item() == pytest.approx(ref, rel=1e-5)


def test_rkd_hand():
    s, t = _rand(5, 3), _rand(5, 4, seed=1)

    def dists(x):
        return np.array([[np.sqrt(((a - b) ** 2).sum()) for b in x] for a in x])

    def angles(x):
        n = len(x)
        out = np.zeros((n, n, n))
        for i in range(n):  # cos at vertex i between x_j and x_k (zero vector when j == i)
            for j in range(n):
                for k in range(n):
                    if j == i or k == i:
                        continue
                    out[i, j, k] = _unit(x[j] - x[i]) @ _unit(x[k] - x[i])
        return out

    ds, dt = dists(_np(s)), dists(_np(t))
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    np.testing.assert_allclose(_np(pairwise_distances(s)), dists(_np(s)), rtol=1e-9, atol=1e-9)
    assert rkd_distance_loss(s, t).item() == pytest.approx(_huber(ds, dt), rel=1e-6)
    ref_a = _huber(angles(_np(s)), angles(_np(t)))
    assert rkd_angle_loss(s, t).item() == pytest.approx(ref_a, rel=1e-6)
    total = 25 * _huber(ds, dt) + 50 * ref_a
    assert rkd_loss(s, t).item() == pytest.approx(total, rel=1e-6)


def test_rkd_matches_torchdistill():
    td = _td()
    s, t = _rand(6, 3), _rand(6, 4, seed=1)
    crit = td.RKDLoss("s", "t", dist_factor=25, angle_factor=50, reduction="mean")
    ref = crit({"s": {"output": s}}, {"t": {"output": t}})
    assert rkd_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_pkt_hand_and_torchdistill():
    s, t = _rand(4, 3), _rand(4, 5, seed=1)
    eps = 1e-7

    def cond(x):
        x = np.stack([r / (np.sqrt((r**2).sum()) + eps) for r in x])
        k = (x @ x.T + 1) / 2
        return k / k.sum(1, keepdims=True)

    ps, pt = cond(_np(s)), cond(_np(t))
    ref = (pt * np.log((pt + eps) / (ps + eps))).mean()
    assert pkt_loss(s, t).item() == pytest.approx(ref, rel=1e-6)
    td = _td()
    ref_td = td.PKTLoss("s", "input", "t", "input").cosine_similarity_loss(s.clone(), t.clone())
    assert pkt_loss(s, t).item() == pytest.approx(ref_td.item(), rel=1e-6)


# ---------------------------------------------------------------- VID


def test_vid_hand_and_torchdistill():
    mu, t = _rand(2, 3, 2, 2), _rand(2, 3, 2, 2, seed=1)
    raw = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    var = np.log1p(np.exp(_np(raw))) + 1e-5
    ref = np.mean(
        [
            0.5 * ((m - x) ** 2 / var[c] + np.log(var[c]))
            for b in range(2)
            for c in range(3)
            for m, x in zip(_np(mu)[b, c].reshape(-1), _np(t)[b, c].reshape(-1))
        ]
    )
    assert vid_loss(mu, t, raw).item() == pytest.approx(ref, rel=1e-6)
    init = vid_log_scale_init(5.0)
    assert math.log1p(math.exp(init)) + 1e-5 == pytest.approx(5.0, rel=1e-9)
    td = _td()
    pair = {"student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}}
    var_t = torch.tensor(var).view(1, -1, 1, 1)
    ref_td = td.VIDLoss({"p": pair})({"s": {"output": (mu, var_t)}}, {"t": {"output": t}})
    assert vid_loss(mu, t, raw).item() == pytest.approx(ref_td.item(), rel=1e-6)


# ---------------------------------------------------------------- logit standardisation


def test_zscore_logits_hand():
    z = _rand(3, 7) * 4 + 2
    ref = np.stack([(r - r.mean()) / (r.std(ddof=1) + 1e-7) for r in _np(z)])
    out = zscore_logits(z)
    assert out.dtype == torch.float64 and zscore_logits(z.bfloat16()).dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    # invariant to a per-sample shift and positive scale of the logits
    torch.testing.assert_close(zscore_logits(z * 3.0 - 5.0), out, rtol=1e-5, atol=1e-5)
    const = torch.full((2, 5), 3.0, requires_grad=True)
    out_c = zscore_logits(const)
    assert torch.equal(out_c, torch.zeros(2, 5))
    (out_c * torch.randn(2, 5)).sum().backward()
    assert torch.isfinite(const.grad).all()


def test_logit_std_kd_matches_torchdistill():
    td = _td()
    from relkd.losses import kd_loss

    zs, zt = _rand(4, 10).float(), _rand(4, 10, seed=1).float() * 3
    crit = td.LogitStdKDLoss(".", "output", ".", "output", temperature=2.0, alpha=0.0)
    ref = crit({".": {"output": zs}}, {".": {"output": zt}}) * 2.0**2  # T^2 left out there
    ours = kd_loss(zscore_logits(zs), zscore_logits(zt), 2.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize(
    "fn,shape_s,shape_t",
    [
        (at_loss, (2, 3, 4, 4), (2, 5, 4, 4)),
        (nst_loss, (2, 3, 4, 4), (2, 5, 4, 4)),
        (sp_loss, (4, 3, 2, 2), (4, 5, 2, 2)),
        (pkt_loss, (4, 6), (4, 8)),
        (rkd_loss, (4, 6), (4, 8)),
        (ft_loss, (2, 3, 4, 4), (2, 3, 4, 4)),
    ],
)
def test_teacher_gets_no_gradient_and_fp32_result(fn, shape_s, shape_t):
    s = torch.randn(*shape_s, requires_grad=True)
    t = torch.randn(*shape_t, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(s.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_zero_at_identical_inputs():
    f = torch.randn(4, 3, 4, 4)
    for fn in (at_loss, nst_loss, sp_loss, pkt_loss, rkd_loss, ft_loss):
        assert fn(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6), fn.__name__
    assert fsp_loss([f, f], [f.clone(), f.clone()]).item() == pytest.approx(0.0, abs=1e-9)
    assert cc_loss(f.flatten(1), f.flatten(1)).item() == 0.0
