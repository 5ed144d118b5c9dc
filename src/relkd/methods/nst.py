"""NST: neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer", arXiv 1707.01219)."""

from __future__ import annotations

from relkd.losses.feature import nst_loss
from relkd.methods._connectors import StagePairTaps, require_teacher, stage_pairs
from relkd.methods.base import Method, MethodContext, register_method


@register_method("nst")
class NST(StagePairTaps, Method):
    """``weight * sum_stages MMD^2`` between the student's and the teacher's channel maps
    (polynomial kernel ``(x.y)^2``, maps L2-normalised over H*W; see
    :func:`relkd.losses.feature.nst_loss`). No trainable parameters; channel counts may differ.

    CRD protocol defaults (RepDistiller ``--distill nst -b 50``): weight 50, CE weight 1, no
    KD, every stage.

    Args:
        stages: student stage indices (default: all, paired by position with the teacher's).
        teacher_stages: teacher stage indices (default: ``stages``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 50.0,
        stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight = weight
        self.pairs = stage_pairs(ctx, "nst", stages, teacher_stages)

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "nst")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        loss = sum(nst_loss(student.feats[s], teacher.feats[t]) for s, t in self.pairs)
        return {"nst": self.weight * loss}
