"""CLKD against loop/numpy references, hand values, gradcheck, bf16 autocast; and the 2-process
gloo test of ``gather=True`` for every batch-level loss (CLKD, DIST, CMKD)."""

from __future__ import annotations

import functools
import itertools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from relkd.losses.clkd import clkd_loss, clkd_terms
from relkd.losses.cmkd import cmkd_loss, cmkd_terms
from relkd.losses.dist import dist_loss, dist_terms

_EPS = 1e-8


def _rownorm(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    for i in range(m.shape[0]):
        out[i] = m[i] / max(np.sqrt((m[i] ** 2).sum()), _EPS)
    return out


def _ref_relation(z: np.ndarray, corr: str, normalized: bool, centered: bool) -> np.ndarray:
    """Entry by entry: the variables are the classes ("class") or the samples ("sample"); both
    centre each class column over the batch first."""
    z = z - z.mean(axis=0, keepdims=True) if centered else z.copy()
    c = z.shape[1]
    vecs = [z[:, j] for j in range(c)] if corr == "class" else [z[i] for i in range(z.shape[0])]
    k = len(vecs)
    g = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            u, v = vecs[a], vecs[b]
            if normalized:
                nu = max(np.sqrt((u**2).sum()), _EPS)
                nv = max(np.sqrt((v**2).sum()), _EPS)
                g[a, b] = (u * v).sum() / (nu * nv)
            else:
                g[a, b] = (u * v).sum() / (c - 1)
    return g


def _ref_clkd_terms(zs, zt, corr="class", normalized=True, centered=True, squared=True):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    c = zs.shape[1]
    ins = ((_rownorm(zs) - _rownorm(zt)) ** 2).mean()
    cla = ((_rownorm(zs.T) - _rownorm(zt.T)) ** 2).mean()
    d = _ref_relation(zs, corr, normalized, centered) - _ref_relation(
        zt, corr, normalized, centered
    )
    cc = (d**2).sum() / c**2 if squared else np.sqrt((d**2).sum()) / c**2
    return {"ins": ins, "cla": cla, "cc": cc}


def _reimpl_a_cc(zs: np.ndarray, zt: np.ndarray) -> float:
    """Re-implementation A's class-correlation term, transcribed: a [B, B] matrix summed over
    classes of outer products of the batch-centred class columns, / (C - 1); ||dB||_F^2 / C^2."""
    c = zs.shape[1]
    mats = []
    for z in (zs, zt):
        acc = np.zeros((z.shape[0], z.shape[0]))
        for j in range(c):
            col = z[:, j] - z[:, j].mean()
            acc += np.outer(col, col)
        mats.append(acc / (c - 1))
    return float(np.linalg.norm(mats[0] - mats[1], "fro") ** 2 / c**2)


def _reimpl_b_cc(zs: np.ndarray, zt: np.ndarray) -> float:
    """Re-implementation B's term, transcribed: the [C, C] covariance of the batch-centred
    logits with divisor C - 1, then ||dG||_F (not squared) / C^2."""
    c = zs.shape[1]
    cov = [(z - z.mean(0)).T @ (z - z.mean(0)) / (c - 1) for z in (zs, zt)]
    return float(np.linalg.norm(cov[0] - cov[1], "fro") / c**2)


def test_variants_compute_what_the_reimplementations_compute():
    zs, zt = _logits(6, 4)
    a, b = zs.numpy(), zt.numpy()
    got_a = clkd_terms(zs, zt, corr="sample", corr_normalized=False)["cc"].item()
    assert got_a == pytest.approx(_reimpl_a_cc(a, b), rel=1e-10)
    got_b = clkd_terms(zs, zt, corr_normalized=False, corr_squared=False)["cc"].item()
    assert got_b == pytest.approx(_reimpl_b_cc(a, b), rel=1e-10)


def _logits(b=4, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
        torch.randn(b, c, generator=g, dtype=dtype) * 2,
    )


_VARIANTS = list(
    itertools.product(("class", "sample"), (True, False), (True, False), (True, False))
)


@pytest.mark.parametrize("corr,normalized,centered,squared", _VARIANTS)
def test_all_variants_match_loop_reference(corr, normalized, centered, squared):
    zs, zt = _logits()
    kw = {
        "corr": corr,
        "corr_normalized": normalized,
        "corr_centered": centered,
        "corr_squared": squared,
    }
    got = clkd_terms(zs, zt, **kw)
    want = _ref_clkd_terms(zs, zt, corr, normalized, centered, squared)
    for k in ("ins", "cla", "cc"):
        np.testing.assert_allclose(got[k].item(), want[k], rtol=1e-10, err_msg=k)
    loss = clkd_loss(zs, zt, mu=0.7, beta=3.0, nu=0.2, **kw)
    np.testing.assert_allclose(
        loss.item(), 0.7 * (want["ins"] + 3.0 * want["cla"]) + 0.2 * want["cc"], rtol=1e-10
    )


def test_default_relation_is_numpy_corrcoef_and_cov():
    zs, zt = _logits(6, 4)
    want_cc = (
        (np.corrcoef(zs.numpy(), rowvar=False) - np.corrcoef(zt.numpy(), rowvar=False)) ** 2
    ).mean()
    assert clkd_terms(zs, zt)["cc"].item() == pytest.approx(want_cc, rel=1e-10)
    # covariance variant: np.cov rescaled from the divisor B - 1 to the re-implementations' C - 1
    b, c = zs.shape
    dcov = (np.cov(zs.numpy(), rowvar=False) - np.cov(zt.numpy(), rowvar=False)) * (b - 1) / (c - 1)
    got_cov = clkd_terms(zs, zt, corr_normalized=False)["cc"].item()
    assert got_cov == pytest.approx((dcov**2).mean(), rel=1e-10)


def test_hand_computed_values():
    # z_s = I, z_t = the swap: rows (and columns) normalise to unit vectors, each of the 4 entries
    # differs by 1 -> ins = cla = 1. Class columns after centring: student (+-1/2, -+1/2), teacher
    # the same up to order -> both correlation matrices [[1, -1], [-1, 1]] -> cc = 0.
    zs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    t = clkd_terms(zs, zt)
    assert [t[k].item() for k in ("ins", "cla", "cc")] == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    assert clkd_loss(zs, zt).item() == pytest.approx(0.5 * (1 + 2 * 1) + 0.4 * 0, abs=1e-6)
    # teacher columns perfectly correlated (+1) vs student's -1: off-diagonals differ by 2 ->
    # cc = (2^2 + 2^2) / 2^2 = 2; not squared: sqrt(2^2 + 2^2) / 2^2 = sqrt(8) / 4.
    zt = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert clkd_terms(zs, zt)["cc"].item() == pytest.approx(2.0, abs=1e-6)
    got = clkd_terms(zs, zt, corr_squared=False)["cc"].item()
    assert got == pytest.approx(8**0.5 / 4, abs=1e-6)
    # sample variant: batch-centred rows s = (1/2, -1/2), (-1/2, 1/2) -> cosines [[1, -1], [-1, 1]];
    # teacher rows (1/2, 1/2), (-1/2, -1/2) -> the same matrix -> cc = 0. Covariance variant
    # (divisor C - 1 = 1): student [[1/2, -1/2], [-1/2, 1/2]], teacher the same -> 0 as well;
    # with the 3-class teacher below the entries differ by hand-checked amounts.
    assert clkd_terms(zs, zt, corr="sample")["cc"].item() == pytest.approx(0.0, abs=1e-6)
    zs3 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    zt3 = torch.zeros(2, 3)
    # zc rows (1, 0, 0), (-1, 0, 0): zc zc^T / 2 = [[1/2, -1/2], [-1/2, 1/2]]; teacher 0 ->
    # ||d||_F^2 / C^2 = (4 * 1/4) / 9
    got = clkd_terms(zs3, zt3, corr="sample", corr_normalized=False)["cc"].item()
    assert got == pytest.approx(1 / 9, abs=1e-6)


def test_zero_at_equal_logits_and_scale_invariance_of_default():
    zs, zt = _logits(8, 6)
    assert clkd_loss(zs, zs.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # every default term is invariant to a global positive scale of either side
    torch.testing.assert_close(clkd_loss(3.0 * zs, 0.5 * zt), clkd_loss(zs, zt))
    # the covariance variant is not: it grows with the square of the logit scale
    a = clkd_terms(zs, zt, corr_normalized=False)["cc"]
    b = clkd_terms(10 * zs, 10 * zt, corr_normalized=False)["cc"]
    assert b.item() == pytest.approx(1e4 * a.item(), rel=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"corr": "sample"},
        {"corr_normalized": False, "corr_centered": False},
        {"corr_squared": False},
    ],
)
def test_gradcheck_float64(kw):
    zs, zt = _logits(4, 3, seed=2)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: clkd_loss(a, b, **kw), (zs, zt))


def test_autocast_bf16_finite_grads_fp32_value():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10)
    x, zt = torch.randn(8, 16), torch.randn(8, 10) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = clkd_loss(logits, zt.bfloat16())
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    ref = clkd_loss(logits.detach().float(), zt.bfloat16().float())
    torch.testing.assert_close(loss.detach(), ref)


def test_invalid_switches_name_value_and_choices():
    zs, zt = _logits()
    with pytest.raises(ValueError, match=r"corr='row'.*\['class', 'sample'\]"):
        clkd_loss(zs, zt, corr="row")
    with pytest.raises(ValueError, match=r"corr_normalized='yes'.*\[True, False\]"):
        clkd_loss(zs, zt, corr_normalized="yes")
    with pytest.raises(ValueError, match="corr_squared"):
        clkd_terms(zs, zt, corr_squared=1)
    with pytest.raises(ValueError, match="same shape"):
        clkd_loss(zs, zt.t())


# --------------------------------------------------------------------------------------------
# gather=True under a real (gloo, 2-process) process group
#
# DDP emulation: a linear "model" logits = x @ W with the same W on both ranks. Each rank holds
# half of a fixed global batch, computes loss(gather=True) on its half and back-propagates; DDP
# would then average grad_W over the ranks. That average must equal grad_W of the single-process
# loss (gather=False) on the whole batch, and the rank-mean of the loss values must equal the
# single-process loss value. Batch-level terms must have the global value on every rank.

_WORLD = 2
_DDP_LOSSES = {
    "clkd": clkd_loss,
    "clkd_sample_cov_fro": functools.partial(
        clkd_loss, corr="sample", corr_normalized=False, corr_squared=False
    ),
    "dist": functools.partial(dist_loss, beta=1.0, gamma=2.0, temperature=4.0),
    "cmkd": functools.partial(cmkd_loss, temperature=4.0),
    "cmkd_inverse": functools.partial(
        cmkd_loss, temperature=1.0, difficulty="teacher_entropy_inverse", intra_weight=0.5
    ),
}
# batch-level entries of the *_terms dicts, which must have the global-batch value on every rank
_DDP_TERMS = {
    "clkd.cla": lambda s, t, g: clkd_terms(s, t, gather=g)["cla"],
    "clkd.cc": lambda s, t, g: clkd_terms(s, t, gather=g)["cc"],
    "dist.intra": lambda s, t, g: dist_terms(s, t, temperature=4.0, gather=g)["intra"],
    "cmkd.intra": lambda s, t, g: cmkd_terms(s, t, gather=g)["intra"],
}


def _ddp_problem():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    zt = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3
    return x, w, zt


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=_WORLD)
    try:
        x, w0, zt = _ddp_problem()
        b = x.shape[0] // _WORLD
        sl = slice(rank * b, (rank + 1) * b)
        out = {}
        for name, fn in _DDP_LOSSES.items():
            w = w0.clone().requires_grad_(True)
            loss = fn(x[sl] @ w, zt[sl], gather=True)
            loss.backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)  # DDP: sum, then divide by the world size
            value = loss.detach().clone()
            dist.all_reduce(value)
            out[name] = (value / _WORLD, grad / _WORLD)
        for name, fn in _DDP_TERMS.items():
            out[name] = fn(x[sl] @ w0, zt[sl], True).detach()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_gather_under_two_process_gloo_equals_single_process(tmp_path):
    # fork where available: the children inherit the imported modules instead of re-importing
    # torch and relkd (seconds each); they run single-threaded, so no OpenMP pool is forked into use.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _ddp_worker,
        args=(str(tmp_path / "pg_init"), str(tmp_path)),
        nprocs=_WORLD,
        join=True,
        start_method=method,
    )
    x, w0, zt = _ddp_problem()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_WORLD)]
    for name, fn in _DDP_LOSSES.items():
        w = w0.clone().requires_grad_(True)
        loss = fn(x @ w, zt)  # single process, whole batch, gather=False
        loss.backward()
        for r, res in enumerate(ranks):
            value, grad = res[name]
            torch.testing.assert_close(value, loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(grad, w.grad, rtol=1e-9, atol=1e-12, msg=f"{name} rank{r}")
    for name, fn in _DDP_TERMS.items():
        want = fn(x @ w0, zt, False)
        for res in ranks:
            torch.testing.assert_close(res[name], want, rtol=1e-10, atol=1e-12, msg=name)
