"""torch.distributed helpers that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [b, ...] from every rank along dim 0 -> [sum b, ...] in rank order.

    The local slice keeps its autograd graph; the other ranks' slices are constants (their
    gradients are computed on their own ranks). Ranks may hold different batch sizes.
    """
    if not is_dist() or world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    bmax = max(sizes_i)
    padded = x.new_zeros((bmax, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes_i]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes_i)]
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def global_batch_term(loss: torch.Tensor) -> torch.Tensor:
    """Value unchanged, gradient multiplied by the world size.

    A term computed on the all-gathered batch has the same value on every rank, but each rank only
    back-propagates into its local slice and DDP then *averages* gradients over ranks; scaling the
    gradient by W makes the averaged gradient equal the single-process gradient of the global batch.
    """
    w = world_size()
    if w == 1:
        return loss
    return loss + (w - 1) * (loss - loss.detach())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def local_rows(global_t: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's rows of a tensor built for the all-gathered batch (rank order).

    Random draws that a method makes per sample (CRD negatives, CORSD's wrong classes) are
    drawn for the *global* batch with the RNG that every rank holds in the same state, then
    sliced: N ranks then draw exactly what one process at the global batch draws.
    """
    if not is_dist() or world_size() == 1:
        return global_t
    n = torch.tensor([n_local], device=global_t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    start = int(sum(int(s.item()) for s in sizes[: rank()]))
    return global_t[start : start + n_local]


def on_global_batch(fn, *xs: torch.Tensor) -> torch.Tensor:
    """``fn(*xs)`` for a loss that relates the samples of a batch to each other (SP, RKD, PKT,
    CC, ...), computed on the batch gathered from every rank: the value equals one process at
    the global batch, and :func:`global_batch_term` makes the DDP-averaged gradient equal too."""
    if not is_dist() or world_size() == 1:
        return fn(*xs)
    return global_batch_term(fn(*(all_gather_with_grad(x) for x in xs)))
