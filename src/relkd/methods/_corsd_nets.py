"""Relation networks of CORSD (Yu et al., arXiv 2305.00918), built from any backbone's stages.

The official code hard-codes four relation nets for a CIFAR ResNet with base width C = 64
(inputs 2C..16C channels, all ending at 16C = 1024-d). Here the plan is derived from the stage
channels and resolutions, so the same rule rebuilds the official nets for that ResNet-18 and also
fits any backbone with >= 2 stages:

- a shallow stage's net halves the spatial size with stride-2 :class:`SepConv` blocks until the
  deepest stage's resolution is reached, doubling the channels each block (capped) and ending at
  2x the deepest stage's channels (the input is two samples' features concatenated, so 2x);
  a shallow stage already at the deepest resolution gets one stride-1 block (our rule);
- the deepest stage's net is a global average pool only (official).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.registry import RelkdError


class SepConv(nn.Sequential):
    """Official SepConv: dw3x3(stride) -> 1x1 -> BN -> ReLU -> dw3x3 -> 1x1(c_out) -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


def sepconv_plan(c_in: int, c_out: int, halvings: int, deepest: bool) -> list[tuple[int, int, int]]:
    """``[(c_in, c_out, stride), ...]`` of the SepConv blocks of one relation net body.

    ``halvings`` stride-2 blocks (at least one block for a non-deepest stage), channels doubling
    per block (never above ``c_out``), the last block ending at ``c_out``. Deepest: no block.
    """
    if deepest:
        return []
    n = max(1, halvings)
    plan, c = [], c_in
    for j in range(n):
        nxt = c_out if j == n - 1 else min(2 * c, c_out)
        plan.append((c, nxt, 2 if j < halvings else 1))
        c = nxt
    return plan


def count_halvings(size: int, target: int) -> int:
    """Stride-2 steps from a map of side ``size`` to about ``target`` (rounded log2 ratio)."""
    if size <= target:
        return 0
    return max(0, round(math.log2(size / target)))


class RelationNet(nn.Module):
    """One stage's relation net: body -> global average pool -> v [N, d].

    ``forward(pair [N, 2c_k, H, W]) -> (score [N] in (0, 1), aux logits [N, num_classes])``.
    Head: Linear(d -> h) -> BN1d -> ReLU -> Linear(h -> 1) -> Sigmoid with h = d/4 for the
    deepest net and d/8 for the others (as the official nets: 1024 -> 256 and 1024 -> 128).
    Aux classifier: Linear(d -> C).
    """

    def __init__(
        self, plan: list[tuple[int, int, int]], dim: int, num_classes: int, deepest: bool
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(*(SepConv(a, b, s) for a, b, s in plan))
        hidden = max(1, dim // (4 if deepest else 8))
        self.head = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        self.aux = nn.Linear(dim, num_classes)
        for m in self.body.modules():  # the official model's conv init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.body(pair).mean(dim=(2, 3))
        return torch.sigmoid(self.head(v)).squeeze(1), self.aux(v)


class ClassCentreNet(nn.Sequential):
    """Official RN_logits: Linear(2C -> 1) -> BN1d(1) -> ReLU -> Linear(1 -> 1) -> Sigmoid.

    ``[N, 2C] -> [N, 1]``; needs N >= 2 rows in train mode (BatchNorm1d).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(
            nn.Linear(2 * num_classes, 1),
            nn.BatchNorm1d(1),
            nn.ReLU(),
            nn.Linear(1, 1),
            nn.Sigmoid(),
        )


def build_relation_nets(
    stages: list[FeatureInfo], shapes: list[tuple[int, ...]], num_classes: int
) -> nn.ModuleList:
    """One :class:`RelationNet` per stage, deepest first (``stages[0]``).

    ``shapes`` are the measured feature shapes ``(C, H, W)`` (``MethodContext.student_shapes``);
    an empty one falls back to the stage's ``channels`` / ``reduction``.
    """
    if any(len(s) not in (0, 3) for s in shapes):
        raise RelkdError(f"corsd taps feature maps [C, H, W]; stage shapes: {shapes}")
    deep, deep_shape = stages[0], shapes[0]
    dim = 2 * (deep_shape[0] if deep_shape else deep.channels)
    nets = nn.ModuleList()
    for k, (info, shape) in enumerate(zip(stages, shapes)):
        if shape and deep_shape:
            c, halvings = shape[0], count_halvings(shape[-1], deep_shape[-1])
        else:
            c, halvings = info.channels, count_halvings(deep.reduction, info.reduction)
        plan = sepconv_plan(2 * c, dim, halvings, deepest=k == 0)
        nets.append(RelationNet(plan, dim, num_classes, deepest=k == 0))
    return nets
