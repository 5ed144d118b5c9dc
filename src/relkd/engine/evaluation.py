"""Evaluation of a classifier on a loader: top-1 / top-5 and the mean cross-entropy, summed over
the ranks of a distributed run (used by ``fit``, ``relkd eval`` and the linear probe)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from relkd import distributed as D
from relkd.engine.plan import unpack

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp_ctx=nullcontext
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean CE of ``model`` on ``loader`` (summed over ranks)."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, ce sum
    for batch in loader:
        x, y, _ = unpack(batch, device)
        with amp_ctx():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        stats[0] += y.numel()
        stats[1] += hit[:, 0].sum()
        stats[2] += hit.any(dim=1).sum()
        stats[3] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    model.train(was)
    stats = D.all_reduce_sum(stats)
    n = max(1.0, float(stats[0]))
    return {
        "top1": 100.0 * float(stats[1]) / n,
        "top5": 100.0 * float(stats[2]) / n,
        "test_loss": float(stats[3]) / n,
    }
