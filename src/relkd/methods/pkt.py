"""PKT: probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations
with Probabilistic Knowledge Transfer", ECCV 2018, arXiv 1803.10837)."""

from __future__ import annotations

from relkd import distributed as D
from relkd.losses.relation import pkt_loss
from relkd.methods._connectors import require_teacher
from relkd.methods.base import Method, MethodContext, register_method
from relkd.models.base import POOLED


@register_method("pkt")
class PKT(Method):
    """``weight * PKT(f_s, f_t)`` on the pooled features ([B, D_s] / [B, D_t]; the cosine
    kernel makes the two dimensions independent). No trainable parameters.

    CRD protocol defaults (RepDistiller ``--distill pkt -b 30000``): weight 30000, CE weight 1,
    no KD, the pooled penultimate features (``feat[-1]`` there).
    """

    default_ce_weight = 1.0

    def __init__(self, ctx: MethodContext, weight: float = 30000.0, eps: float = 1e-7) -> None:
        super().__init__(ctx)
        self.weight, self.eps = weight, eps

    def student_taps(self) -> list[str]:
        return [POOLED]

    def teacher_taps(self) -> list[str]:
        return [POOLED]

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "pkt")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        # pairwise similarities within the batch: the gathered batch under DDP
        loss = D.on_global_batch(
            lambda s, t: pkt_loss(s, t, self.eps), student.feats[POOLED], teacher.feats[POOLED]
        )
        return {"pkt": self.weight * loss}
