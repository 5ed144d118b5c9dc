"""Soft / hard ranks: reference values, eps -> 0 limit, chunking, gradients, bounded memory."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from relkd.losses import softrank
from relkd.losses.softrank import hard_rank, soft_rank, soft_rank_isotonic, soft_rank_network


def _ref_soft_rank(x: np.ndarray, eps: float) -> np.ndarray:
    """Plain loops: r_i = 0.5 + sum_j sigmoid((x_i - x_j) / eps)."""
    out = np.zeros_like(x, dtype=np.float64)
    for row in range(x.shape[0]):
        for i in range(x.shape[1]):
            s = 0.5
            for j in range(x.shape[1]):
                s += 1.0 / (1.0 + np.exp(-(x[row, i] - x[row, j]) / eps))
            out[row, i] = s
    return out


def _distinct(b: int, c: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Rows of distinct values, consecutive sorted values at least 0.05 apart."""
    g = torch.Generator().manual_seed(seed)
    steps = 0.05 + torch.rand(b, c, generator=g, dtype=torch.float64)
    vals = steps.cumsum(dim=1)
    perm = torch.argsort(torch.rand(b, c, generator=g), dim=1)
    return torch.gather(vals, 1, perm).to(dtype)


def test_hard_rank_known_values_and_double_argsort():
    x = torch.tensor([[3.0, 1.0, 2.0], [0.5, -1.0, 7.0]])
    assert torch.equal(hard_rank(x), torch.tensor([[3.0, 1.0, 2.0], [2.0, 1.0, 3.0]]))
    # ties: distinct ranks in index order
    assert torch.equal(hard_rank(torch.tensor([1.0, 1.0, 0.0])), torch.tensor([2.0, 3.0, 1.0]))
    y = torch.randn(5, 17, 11)
    assert torch.equal(hard_rank(y), (y.argsort(-1).argsort(-1) + 1).float())
    assert hard_rank(torch.tensor([[2, 0, 1]])).dtype == torch.float32


def test_soft_rank_matches_loop_reference():
    x = torch.randn(4, 5, dtype=torch.float64)
    for eps in (0.1, 1.0):
        got = soft_rank(x, eps).numpy()
        np.testing.assert_allclose(got, _ref_soft_rank(x.numpy(), eps), rtol=1e-12, atol=1e-12)
    # fp32 path
    np.testing.assert_allclose(
        soft_rank(x.float(), 0.1).numpy(), _ref_soft_rank(x.numpy(), 0.1), rtol=1e-5, atol=1e-5
    )


def test_soft_rank_hand_value():
    # two values 0 and eps*ln(3): sigmoid(+ln 3) = 3/4, sigmoid(-ln 3) = 1/4
    eps = 0.2
    x = torch.tensor([[0.0, eps * np.log(3.0)]], dtype=torch.float64)
    torch.testing.assert_close(soft_rank(x, eps), torch.tensor([[1.25, 1.75]], dtype=torch.float64))


def test_soft_rank_tends_to_hard_rank():
    x = _distinct(6, 40)  # min gap 0.05 -> gap / eps >= 500 at eps = 1e-4
    err = (soft_rank(x, 1e-4) - hard_rank(x)).abs().max().item()
    assert err < 1e-12
    errs = [(soft_rank(x, e) - hard_rank(x)).abs().max().item() for e in (0.1, 0.03, 0.01)]
    assert errs[0] > errs[1] > errs[2]
    # ranks always sum to C (C + 1) / 2 (every pair contributes sigmoid(u) + sigmoid(-u) = 1)
    torch.testing.assert_close(soft_rank(x, 0.3).sum(-1), torch.full((6,), 40 * 41 / 2.0).double())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_chunked_equals_unchunked(dtype, tol):
    """Blocks of rows, and blocks of positions inside a row, give the unchunked values.

    Not bit for bit in general: PyTorch's vectorised CPU sigmoid and its scalar tail loop differ by
    up to 1 ulp, and the tail an element falls into depends on the block shape. So: agreement to
    float rounding (relative tol a few ulps of the rank magnitude).
    """
    torch.manual_seed(0)
    x = (torch.randn(13, 37) * 2).to(dtype).requires_grad_(True)
    g = torch.randn(13, 37, dtype=dtype)
    ref = soft_rank(x, 0.1, chunk_size=13)
    (gref,) = torch.autograd.grad((ref * g).sum(), x)
    settings = [
        {"chunk_size": 1},
        {"chunk_size": 4},
        {"chunk_size": 100},
        {"budget_elements": 37 * 37 * 5},  # 5 rows per block
        {"budget_elements": 37 * 3},  # 1 row, 3 positions per block
        {"budget_elements": 1},  # 1 row, 1 position per block
    ]
    for kw in settings:
        out = soft_rank(x, 0.1, **kw)
        (gout,) = torch.autograd.grad((out * g).sum(), x)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * 37, msg=str(kw))
        torch.testing.assert_close(gout, gref, rtol=tol * 10, atol=tol * 37, msg=str(kw))


def test_block_sizes():
    assert softrank._blocks(256, 1000, None, 2**24) == (16, 1000)
    assert softrank._blocks(3, 1000, None, 2**24) == (3, 1000)
    assert softrank._blocks(256, 10_000, None, 2**24) == (1, 1677)
    assert softrank._blocks(256, 1000, 7, 2**24) == (7, 1000)
    with pytest.raises(ValueError, match="chunk_size"):
        softrank._blocks(2, 3, 0, 2**24)


def test_gradcheck_float64():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, 0.3, chunk_size=2), (x,))
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, 0.5, budget_elements=10), (x,))
    # leading dims are flattened and restored
    y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert soft_rank(y).shape == (2, 3, 4)
    assert torch.autograd.gradcheck(lambda t: soft_rank(t, 0.4), (y,))


def test_constant_upstream_gradient_is_exactly_zero():
    # sum of ranks is constant -> its gradient is 0; the difference form gives exactly 0.
    x = torch.randn(3, 50, requires_grad=True)
    soft_rank(x, 0.05).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_only_input_saved_for_backward():
    """Backward memory is bounded: the autograd graph keeps only x, not the [B, C, C] pairs."""
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(8, 300, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = soft_rank(x)
    assert sum(saved) <= x.numel()
    r.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kib("VmHWM") is not None


def test_imagenet_size_runs_in_bounded_memory():
    """C = 1000, B = 256 forward + backward; peak RSS growth measured where Linux allows it.

    Unchunked, one [256, 1000, 1000] fp32 buffer alone is 977 MiB (autograd would keep several).
    With the default budget (2**24 elements = 64 MiB per block, at most two blocks at a time) the
    growth must stay far below that.
    """
    torch.manual_seed(0)
    x = torch.randn(256, 1000, requires_grad=True)
    g = torch.randn(256, 1000)
    soft_rank(torch.randn(2, 8)).sum()  # load the kernels before the baseline
    measured = _reset_peak_rss()
    base = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    (soft_rank(x, 0.1) * g).sum().backward()
    seconds = time.perf_counter() - t0
    assert torch.isfinite(x.grad).all()
    print(f"C=1000 B=256 soft_rank forward+backward: {seconds:.2f} s")
    if measured:
        peak_mib = (_vm_kib("VmHWM") - base) / 1024
        print(f"peak RSS growth {peak_mib:.0f} MiB")
        assert peak_mib < 400


def test_isotonic_falls_back_with_one_warning(monkeypatch):
    try:
        import torchsort  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchsort is installed: no fallback to test")
    monkeypatch.setattr(softrank, "_ISOTONIC_WARNED", False)
    x = torch.randn(3, 7)
    with pytest.warns(RuntimeWarning, match="torchsort"):
        out = soft_rank_isotonic(x, 0.1)
    torch.testing.assert_close(out, soft_rank(x, 0.1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        soft_rank_isotonic(x, 0.1)  # second call: silent


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        soft_rank(torch.randn(2, 3), 0.0)
    with pytest.raises(TypeError, match="floating"):
        soft_rank(torch.arange(6).reshape(2, 3))
    assert soft_rank(torch.empty(0, 5)).shape == (0, 5)


# ------------------------------------------------------------------- sorting-network soft rank


def _network_reference(x: np.ndarray, eps: float) -> np.ndarray:
    """Independent reference: build the soft permutation matrix P of the relaxed bitonic
    network explicitly (n x n per row, layer by layer) and return P^T (1..n) for the real
    elements."""
    c = x.shape[-1]
    n = 1 << max(0, (c - 1).bit_length())
    out = np.zeros_like(x)
    for row in range(x.shape[0]):
        v = np.concatenate([x[row], np.full(n - c, x[row].max() + 1.0 + 50 * eps)])
        p = np.eye(n)
        k = 2
        while k <= n:
            j = k // 2
            while j >= 1:
                layer = np.eye(n)
                new = v.copy()
                for i in range(n):
                    partner = i ^ j
                    if partner > i:
                        lo, hi = (i, partner) if (i & k) == 0 else (partner, i)
                        s = 1 / (1 + np.exp(-(v[hi] - v[lo]) / eps))
                        new[lo] = s * v[lo] + (1 - s) * v[hi]
                        new[hi] = (1 - s) * v[lo] + s * v[hi]
                        layer[lo, lo], layer[lo, hi] = s, 1 - s
                        layer[hi, lo], layer[hi, hi] = 1 - s, s
                v = new
                p = layer @ p
                j //= 2
            k *= 2
        assert np.allclose(p.sum(0), 1) and np.allclose(p.sum(1), 1)  # doubly stochastic
        out[row] = (p.T @ np.arange(1, n + 1))[:c]
    return out


@pytest.mark.parametrize("c", [1, 2, 3, 6, 8, 13])
def test_network_matches_explicit_permutation_matrix(c):
    x = torch.randn(3, c, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
    got = soft_rank_network(x, 0.5)
    np.testing.assert_allclose(got.numpy(), _network_reference(x.numpy(), 0.5), rtol=1e-10)
    assert torch.allclose(got.sum(-1), torch.full((3,), c * (c + 1) / 2, dtype=torch.float64))
    assert got.min() >= 1 - 1e-12 and got.max() <= c + 1e-12  # padding never leaks in


def test_network_tends_to_hard_rank_and_blocks_change_nothing():
    x = torch.randn(5, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(soft_rank_network(x, 1e-6), hard_rank(x), rtol=0, atol=1e-6)
    # not permutation-equivariant at a finite eps (a property of relaxed sorting networks: the
    # comparisons a value meets depend on its input position), unlike the pairwise sigmoid
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(1))
    moved = soft_rank_network(x[:, perm], 0.3)
    assert not torch.allclose(moved, soft_rank_network(x, 0.3)[:, perm])
    torch.testing.assert_close(soft_rank_network(x[:, perm], 1e-6), hard_rank(x)[:, perm])
    # leading dims and blocks of rows change nothing
    y = x.reshape(5, 1, 37)
    small = soft_rank_network(x, 0.3, budget_elements=1)  # one row per block
    torch.testing.assert_close(soft_rank_network(y, 0.3).reshape(5, 37), small)


def test_network_gradcheck_float64_and_bf16_input():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: soft_rank_network(t, 0.5), (x,))
    xb = torch.randn(4, 100).bfloat16().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = soft_rank_network(xb, 0.1)
    (r * torch.randn(4, 100)).sum().backward()
    assert torch.isfinite(xb.grad).all() and xb.grad.abs().sum() > 0


def test_network_imagenet_size_runs_in_bounded_memory():
    """C = 1000, B = 256 forward + backward. diffsort's [B, n, n] permutation matrix alone would
    be 1 GiB; the reverse-order rank computation keeps O(n log^2 n) per row, in checkpointed
    blocks of at most DEFAULT_BUDGET_ELEMENTS: the growth must stay far below that."""
    torch.manual_seed(0)
    x = torch.randn(256, 1000, requires_grad=True)
    g = torch.randn(256, 1000)
    soft_rank_network(torch.randn(2, 8)).sum()
    measured = _reset_peak_rss()
    base = _vm_kib("VmRSS")
    (soft_rank_network(x, 0.1) * g).sum().backward()
    assert torch.isfinite(x.grad).all()
    if measured:
        peak_mib = (_vm_kib("VmHWM") - base) / 1024
        print(f"sorting network: peak RSS growth {peak_mib:.0f} MiB")
        assert peak_mib < 400


def test_network_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        soft_rank_network(torch.zeros(2, 3), 0.0)
    with pytest.raises(TypeError, match="floating"):
        soft_rank_network(torch.zeros(2, 3, dtype=torch.long))
