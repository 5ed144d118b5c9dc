"""CC: correlation congruence (Peng et al., "Correlation Congruence for Knowledge
Distillation", ICCV 2019, arXiv 1904.01802)."""

from __future__ import annotations

from torch import nn

from relkd import distributed as D
from relkd.losses.relation import cc_gaussian_loss, cc_loss
from relkd.methods._connectors import require_teacher
from relkd.methods.base import Method, MethodContext, register_method
from relkd.methods.rrd import pooled_dim
from relkd.models.base import POOLED
from relkd.registry import RelkdError

_KERNELS = ("repdistiller", "gaussian")


@register_method("cc")
class CC(Method):
    """``weight * CC(W_s f_s, W_t f_t)`` on linear embeddings ([B, D_s] / [B, D_t] ->
    [B, dim]) of the pooled features; both embeddings are trainable (as in the CRD code).

    ``kernel="repdistiller"`` (default) is the form the CRD table used
    (:func:`relkd.losses.relation.cc_loss`, weight 0.02); ``kernel="gaussian"`` is the paper's
    Taylor-approximated Gaussian-RBF correlation matrix (:func:`cc_gaussian_loss`; paper
    gamma 0.4, order P = 2, on L2-normalised embeddings) -- its scale differs, so retune
    ``weight`` when switching.

    CRD protocol defaults (RepDistiller ``--distill correlation -b 0.02``): weight 0.02, CE
    weight 1, no KD, 128-d linear embeddings (``LinearEmbed``, no normalisation).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 0.02,
        dim: int = 128,
        kernel: str = "repdistiller",
        gamma: float = 0.4,
        order: int = 2,
    ) -> None:
        super().__init__(ctx)
        if kernel not in _KERNELS:
            raise RelkdError(f"method 'cc': kernel={kernel!r}; choose one of {list(_KERNELS)}")
        self.weight, self.kernel, self.gamma, self.order = weight, kernel, gamma, order
        self.embed_s = nn.Linear(pooled_dim(ctx, "student"), dim)
        self.embed_t = nn.Linear(pooled_dim(ctx, "teacher"), dim)

    def student_taps(self) -> list[str]:
        return [POOLED]

    def teacher_taps(self) -> list[str]:
        return [POOLED]

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "cc")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        e_s = self.embed_s(student.feats[POOLED].flatten(1))
        # The teacher features are fixed, but the teacher-side embedding trains with the loss.
        e_t = self.embed_t(teacher.feats[POOLED].detach().flatten(1))
        # correlations between the samples of a batch: the gathered batch under DDP
        if self.kernel == "gaussian":
            loss = D.on_global_batch(
                lambda s, t: cc_gaussian_loss(s, t, self.gamma, self.order), e_s, e_t
            )
        else:
            loss = D.on_global_batch(cc_loss, e_s, e_t)
        return {"cc": self.weight * loss}
