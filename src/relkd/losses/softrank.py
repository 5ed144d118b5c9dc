"""Differentiable (soft) ranks along the last dimension, used by the Spearman term of CMKD.

``soft_rank`` is the pairwise-sigmoid relaxation

    r_i = 0.5 + sum_j sigmoid((x_i - x_j) / eps)          (the j = i term contributes 0.5)

so r_i -> 1 + #{j : x_j < x_i}, the exact 1-based rank, as eps -> 0 on distinct values. It costs
O(C^2) per row. To keep ImageNet-sized inputs (C = 1000, B = 256: 2.6e8 pairs) inside a fixed memory
budget the pairs are materialised block by block (a block of rows, and for very large C a block of
positions i inside a row) in a reused work buffer, and the backward pass is a custom autograd
function that saves only the (B x C) input and recomputes the pairwise sigmoid block by block. Peak
extra memory: one block (``budget_elements`` elements) in the forward, two in the backward,
independent of the batch size. (torch.utils.checkpoint per block would also bound the memory, but
recomputes the forward and keeps more temporaries.) Trade-off of the custom function: it is
differentiable once (no double backward), which is all a training loss needs.

``soft_rank_network`` relaxes a bitonic sorting network (the idea of Petersen et al.,
"Differentiable Sorting Networks for Scalable Sorting and Ranking Supervision", ICML 2021,
arXiv 2105.04019, whose package is ``diffsort``); our own code, O(C log^2 C) per row, see its
docstring.

``soft_rank_isotonic`` is the O(C log C) soft rank of Blondel et al., "Fast Differentiable Sorting
and Ranking" (arXiv 2002.08871), taken from the ``torchsort`` package when it is importable. relkd
does not depend on torchsort (it does not build everywhere); when it is missing the function warns
once per process and falls back to the pairwise-sigmoid ``soft_rank``.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DEFAULT_BUDGET_ELEMENTS",
    "hard_rank",
    "soft_rank",
    "soft_rank_isotonic",
    "soft_rank_network",
]

# 2**24 elements = 64 MiB per fp32 block; at most two blocks live at a time. Large enough that each
# block is milliseconds of work (Python overhead negligible), small enough for any CPU or GPU.
DEFAULT_BUDGET_ELEMENTS = 2**24


def _blocks(n_rows: int, c: int, chunk_size: int | None, budget: int) -> tuple[int, int]:
    """(rows per block, positions i per block) so that rows * positions * c <= budget."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return chunk_size, c
    if budget < 1:
        raise ValueError(f"budget_elements must be positive, got {budget!r}")
    if c * c <= budget:
        return max(1, min(n_rows, budget // (c * c))), c
    # A single row does not fit: split the positions i of that row as well.
    return 1, max(1, budget // c)


def _block(buf: torch.Tensor, n: int, ci: int, c: int) -> torch.Tensor:
    """A contiguous [n, ci, c] view of the front of the flat work buffer."""
    return buf[: n * ci * c].view(n, ci, c)


class _SoftRank(torch.autograd.Function):
    """Soft rank of x [N, C] (already divided by eps) in blocks of ``rows`` x ``cols`` x C.

    The pairwise blocks are written into one preallocated work buffer (``out=``): allocating a
    fresh 64 MiB tensor per block costs more than the arithmetic (page faults on every block).
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        ctx.save_for_backward(xs)
        ctx.rows, ctx.cols = rows, cols
        n, c = xs.shape
        out = torch.empty_like(xs)
        # autocast off: the blocks must stay in the input's dtype.
        with torch.autocast(device_type=xs.device.type, enabled=False):
            buf = xs.new_empty(min(rows, n) * cols * c)
            for r0 in range(0, n, rows):
                xr = xs[r0 : r0 + rows]
                for i0 in range(0, c, cols):
                    i1 = min(c, i0 + cols)
                    u = _block(buf, xr.shape[0], i1 - i0, c)
                    torch.sub(xr[:, i0:i1, None], xr[:, None, :], out=u)
                    # the j = i term is sigmoid(0) = 0.5, so r_i = 0.5 + sum_j sigmoid(u_ij) is
                    # 1 + (soft count of smaller values): 1-based ranks.
                    out[r0 : r0 + rows, i0:i1] = u.sigmoid_().sum(-1).add_(0.5)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (xs,) = ctx.saved_tensors
        rows, cols = ctx.rows, ctx.cols
        n, c = xs.shape
        grad_out = grad_out.contiguous().to(xs.dtype)
        grad_x = torch.empty_like(xs)
        # d r_i / d xs_k = delta_ik sum_j s'_ij - s'_ik with s'_ij = sigmoid'(xs_i - xs_j); s' is
        # symmetric, so grad_k = sum_j s'_kj (g_k - g_j). Summing products of differences (not
        # g_k * rowsum - s' @ g) avoids cancellation: e.g. a constant g, whose exact gradient is 0
        # because the ranks always sum to C (C + 1) / 2, gives exactly 0.
        with torch.autocast(device_type=xs.device.type, enabled=False):
            m = min(rows, n) * cols * c
            buf, buf2 = xs.new_empty(m), xs.new_empty(m)
            for r0 in range(0, n, rows):
                xr, gr = xs[r0 : r0 + rows], grad_out[r0 : r0 + rows]
                for i0 in range(0, c, cols):
                    i1 = min(c, i0 + cols)
                    a = _block(buf, xr.shape[0], i1 - i0, c)
                    dg = _block(buf2, xr.shape[0], i1 - i0, c)
                    torch.sub(xr[:, i0:i1, None], xr[:, None, :], out=a)
                    # sigmoid'(u) = a (1 - a) with a = sigmoid(-|u|) <= 0.5: 1 - a has no
                    # cancellation, so the tails stay accurate.
                    a.abs_().neg_().sigmoid_()
                    a.addcmul_(a, a, value=-1.0)
                    torch.sub(gr[:, i0:i1, None], gr[:, None, :], out=dg)
                    grad_x[r0 : r0 + rows, i0:i1] = a.mul_(dg).sum(-1)
        return grad_x, None, None


def soft_rank(
    x: torch.Tensor,
    eps: float = 0.1,
    chunk_size: int | None = None,
    *,
    budget_elements: int = DEFAULT_BUDGET_ELEMENTS,
) -> torch.Tensor:
    """Pairwise-sigmoid soft rank of ``x`` along the last dim; ranks are 1-based like ``hard_rank``.

    Args:
        x: [..., C] floating tensor (any leading shape; typically [B, C] logits).
        eps: sigmoid temperature, in the units of ``x``. Smaller is closer to the exact rank but
            gives sharper, sparser gradients; CMKD applies it to Z-scored logits (scale-free).
        chunk_size: rows (of the flattened leading dims) per block; None chooses it from
            ``budget_elements`` (rows * C^2 <= budget; for C^2 > budget a row is split further).
            Chunking changes no formula; results agree with the unchunked computation to float
            rounding (not bit for bit: PyTorch's vectorised CPU ``sigmoid`` and its scalar tail loop
            differ by up to 1 ulp, and which one an element meets depends on the block shape).
        budget_elements: elements per pairwise block when ``chunk_size`` is None.

    Returns:
        [..., C] soft ranks in the dtype of ``x``; differentiable (once) w.r.t. ``x``.
    """
    if not x.is_floating_point():
        raise TypeError(f"soft_rank needs a floating tensor, got {x.dtype}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if x.ndim == 0:
        raise ValueError("soft_rank needs at least one dimension")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.numel() == 0:
        return torch.zeros_like(x)
    rows, cols = _blocks(x2.shape[0], shape[-1], chunk_size, budget_elements)
    # Divide once by eps here (autograd handles the 1/eps factor of the gradient) instead of once
    # per pair inside the O(C^2) blocks.
    return _SoftRank.apply((x2 / eps).contiguous(), rows, cols).reshape(shape)


def hard_rank(x: torch.Tensor) -> torch.Tensor:
    """Exact 1-based ranks (1 = smallest) along the last dim, as floats. Not differentiable.

    Equivalent to the double argsort ``x.argsort().argsort() + 1``; implemented as one stable
    argsort plus the inverse permutation (a scatter), which is cheaper. Ties get distinct ranks in
    index order (not averaged), which only matters for exactly equal values.
    """
    dtype = x.dtype if x.is_floating_point() else torch.float32
    order = torch.argsort(x.detach(), dim=-1, stable=True)
    ranks = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=dtype).expand(x.shape)
    return torch.empty(x.shape, device=x.device, dtype=dtype).scatter_(-1, order, ranks)


_ISOTONIC_WARNED = False


def soft_rank_isotonic(x: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Isotonic-regression soft rank (Blondel et al. 2020, arXiv 2002.08871) of [B, C] ``x``.

    Uses ``torchsort.soft_rank(x, regularization_strength=eps)`` (L2 regularisation) when the
    ``torchsort`` package is importable. Note that ``eps`` then has torchsort's meaning (a
    regularisation strength), not the sigmoid temperature of ``soft_rank``. When torchsort is not
    installed this warns once per process and falls back to ``soft_rank(x, eps)``.
    """
    global _ISOTONIC_WARNED
    try:
        import torchsort  # optional dependency, looked up at call time
    except ImportError:
        if not _ISOTONIC_WARNED:
            _ISOTONIC_WARNED = True
            warnings.warn(
                "rank='soft_isotonic' needs the optional package 'torchsort', which is not "
                "installed; falling back to the pairwise-sigmoid soft rank (rank='soft_sigmoid').",
                RuntimeWarning,
                stacklevel=2,
            )
        return soft_rank(x, eps)
    if x.ndim != 2:
        raise ValueError(f"soft_rank_isotonic expects [B, C], got shape {tuple(x.shape)}")
    return torchsort.soft_rank(x, regularization_strength=eps)


@functools.lru_cache(maxsize=16)
def _bitonic_layers(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """Layers of the bitonic sorting network on n = 2^k wires (ascending).

    Each layer is ``(lo, hi, inverse)``: comparator p sends the smaller value to wire ``lo[p]``
    and the larger to ``hi[p]``; every wire is in exactly one comparator, and ``inverse`` maps
    ``cat(lo, hi)`` back to wire order. k (k + 1) / 2 layers (55 for n = 1024).
    """
    layers = []
    k = 2
    while k <= n:
        j = k // 2
        while j >= 1:
            lo, hi = [], []
            for i in range(n):
                partner = i ^ j
                if partner > i:
                    ascending = (i & k) == 0
                    lo.append(i if ascending else partner)
                    hi.append(partner if ascending else i)
            order = lo + hi
            inverse = [0] * n
            for pos, wire in enumerate(order):
                inverse[wire] = pos
            layers.append((tuple(lo), tuple(hi), tuple(inverse)))
            j //= 2
        k *= 2
    return tuple(layers)


def _network_rank(x: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """Soft ranks [r, C] of x [r, C] through the relaxed bitonic network on n >= C wires."""
    r, c = x.shape
    if n > c:  # pad with values far above the row: they sort to the top, exactly (see below)
        pad = x.detach().amax(dim=1, keepdim=True) + 1.0 + 50.0 * eps
        x = torch.cat([x, pad.expand(r, n - c)], dim=1)
    idx = [tuple(torch.tensor(t, device=x.device) for t in layer) for layer in _bitonic_layers(n)]
    mix = []
    v = x
    for lo, hi, inverse in idx:
        a, b = v[:, lo], v[:, hi]
        s = torch.sigmoid((b - a) / eps)  # P(a is the smaller): weight of keeping the order
        v = torch.cat([s * a + (1 - s) * b, (1 - s) * a + s * b], dim=1)[:, inverse]
        mix.append(s)
    # The network's soft permutation is P = L_K ... L_1, each layer L_l mixing its comparator
    # pairs with the symmetric block [[s, 1 - s], [1 - s, s]]. Element e's soft rank is
    # sum_w (w + 1) P[w, e] = (P^T pos)[e] = L_1 (L_2 (... L_K pos)): the layers applied in
    # reverse to the position vector, O(n) each, never forming the [n, n] matrix.
    pos = torch.arange(1, n + 1, device=x.device, dtype=x.dtype).expand(r, n)
    for (lo, hi, inverse), s in zip(reversed(idx), reversed(mix)):
        a, b = pos[:, lo], pos[:, hi]
        pos = torch.cat([s * a + (1 - s) * b, (1 - s) * a + s * b], dim=1)[:, inverse]
    return pos[:, :c]


def soft_rank_network(
    x: torch.Tensor, eps: float = 0.1, *, budget_elements: int = DEFAULT_BUDGET_ELEMENTS
) -> torch.Tensor:
    """Soft rank of ``x`` along the last dim through a relaxed bitonic sorting network; 1-based.

    Each comparator of the network (C padded to the next power of two n) replaces the hard
    min / max of its two values a, b by the mixture with weight s = sigmoid((b - a) / eps), the
    logistic relaxation of Petersen et al. (arXiv 2105.04019). The network then defines a
    doubly stochastic soft permutation matrix P; the ``diffsort`` package forms it as a
    [B, n, n] tensor (1 GiB per copy at B = 256, C = 1000, several kept for backward), so we do
    not use it: the ranks P^T (1..n) are obtained by applying the layers' symmetric mixing in
    reverse order to the position vector, O(n log^2 n) per row and O(n log^2 n) memory per row
    for backward. Rows are processed in blocks of at most ``budget_elements`` saved elements,
    each under activation checkpointing when a gradient is needed, so the backward memory is
    bounded independently of the batch size. Padding values sit 50 eps above the row maximum,
    where the sigmoid is 1 to float precision, so they never mix with real values.

    Args:
        x: [..., C] floating tensor (any leading shape).
        eps: comparator temperature in the units of ``x`` (CMKD: Z-scored logits). The
            relaxation compounds over the k (k + 1) / 2 layers, so at the same eps it is softer
            than the pairwise-sigmoid ``soft_rank``.
        budget_elements: elements kept per row block (forward graph of one block).

    Unlike ``soft_rank`` the result is not permutation-equivariant at a finite eps: which
    comparisons a value meets depends on its input position (true of relaxed sorting networks in
    general); it becomes so as eps -> 0.

    Returns:
        [..., C] soft ranks in the dtype of ``x``: a convex combination of 1..n per element
        (exact ranks as eps -> 0 on distinct values), summing to C (C + 1) / 2 per row.
    """
    if not x.is_floating_point():
        raise TypeError(f"soft_rank_network needs a floating tensor, got {x.dtype}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if x.ndim == 0:
        raise ValueError("soft_rank_network needs at least one dimension")
    shape, c = x.shape, x.shape[-1]
    x2 = x.reshape(-1, c)
    if x2.numel() == 0:
        return torch.zeros_like(x)
    n = 1 << max(0, (c - 1).bit_length())
    layers = len(_bitonic_layers(n))
    per_row = 8 * n * (layers + 1)  # ~ tensors of n elements kept per layer, both passes
    rows = max(1, budget_elements // per_row)
    grad = torch.is_grad_enabled() and x2.requires_grad
    out = []
    for chunk in x2.split(rows):
        if grad:
            out.append(checkpoint(_network_rank, chunk, eps, n, use_reentrant=False))
        else:
            out.append(_network_rank(chunk, eps, n))
    return torch.cat(out).reshape(shape)
