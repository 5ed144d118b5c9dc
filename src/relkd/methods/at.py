"""AT: attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
arXiv 1612.03928)."""

from __future__ import annotations

from relkd.losses.feature import at_loss
from relkd.methods._connectors import StagePairTaps, require_teacher, stage_pairs
from relkd.methods.base import Method, MethodContext, register_method


@register_method("at")
class AT(StagePairTaps, Method):
    """``weight * sum_stages mean((Q_s - Q_t)^2)``, ``Q = l2norm(vec(mean_c |A_c|^p))`` [B, H*W].

    No trainable parameters: attention maps are channel-free, so any student / teacher pair
    works (the larger map is average-pooled to the smaller).

    CRD protocol defaults (RepDistiller ``--distill attention -b 1000``): weight 1000, p = 2,
    CE weight 1, no KD, every stage (RepDistiller's ``feat[1:-1]``).

    Args:
        stages: student stage indices (default: all, paired by position with the teacher's).
        teacher_stages: teacher stage indices (default: ``stages``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 1000.0,
        p: float = 2.0,
        stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight, self.p = weight, p
        self.pairs = stage_pairs(ctx, "at", stages, teacher_stages)

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "at")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        loss = sum(at_loss(student.feats[s], teacher.feats[t], self.p) for s, t in self.pairs)
        return {"at": self.weight * loss}
