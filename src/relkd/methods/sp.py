"""SP: similarity-preserving distillation (Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019, arXiv 1907.09682)."""

from __future__ import annotations

from relkd import distributed as D
from relkd.losses.relation import sp_loss
from relkd.methods._connectors import require_teacher, stage_pair
from relkd.methods.base import Method, MethodContext, register_method


@register_method("sp")
class SP(Method):
    """``weight * ||G_t - G_s||_F^2 / B^2``, ``G`` the row-normalised [B, B] Gram matrix of the
    flattened stage maps. No trainable parameters; shapes may differ freely.

    CRD protocol defaults (RepDistiller ``--distill similarity -b 3000``): weight 3000, CE
    weight 1, no KD, the last stage (``feat[-2]`` there: the final map before pooling).

    Args:
        stage: student stage index (default -1, the deepest).
        teacher_stage: teacher stage index (default: ``stage``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 3000.0,
        stage: int = -1,
        teacher_stage: int | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight = weight
        self.s_name, self.t_name = stage_pair(ctx, "sp", stage, teacher_stage)

    def student_taps(self) -> list[str]:
        return [self.s_name]

    def teacher_taps(self) -> list[str]:
        return [self.t_name]

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "sp")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        # the [B, B] similarity of the batch: the gathered batch under DDP
        loss = D.on_global_batch(
            sp_loss, student.feats[self.s_name], teacher.feats[self.t_name].detach()
        )
        return {"sp": self.weight * loss}
