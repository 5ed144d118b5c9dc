"""RKD: relational knowledge distillation (Park et al., "Relational Knowledge Distillation",
CVPR 2019, arXiv 1904.05068)."""

from __future__ import annotations

from relkd import distributed as D
from relkd.losses.relation import rkd_loss
from relkd.methods._connectors import require_teacher
from relkd.methods.base import Method, MethodContext, register_method
from relkd.models.base import POOLED


@register_method("rkd")
class RKD(Method):
    """``weight * (distance_weight * RKD-D + angle_weight * RKD-A)`` on the pooled features
    ([B, D_s] / [B, D_t]; distances and angles are dimension-free). No trainable parameters.

    Defaults: the paper's 25 (distance) and 50 (angle); CRD protocol (RepDistiller
    ``--distill rkd -b 1``): weight 1, CE weight 1, no KD, pooled features (``feat[-1]``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(ctx)
        self.weight, self.distance_weight, self.angle_weight = weight, distance_weight, angle_weight

    def student_taps(self) -> list[str]:
        return [POOLED]

    def teacher_taps(self) -> list[str]:
        return [POOLED]

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "rkd")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        # pairwise distances / angles within the batch: the gathered batch under DDP
        loss = D.on_global_batch(
            lambda s, t: rkd_loss(s, t, self.distance_weight, self.angle_weight),
            student.feats[POOLED],
            teacher.feats[POOLED],
        )
        return {"rkd": self.weight * loss}
