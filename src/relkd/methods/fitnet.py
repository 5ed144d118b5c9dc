"""FitNet hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv 1412.6550)."""

from __future__ import annotations

from typing import ClassVar

from relkd.losses.feature import hint_loss
from relkd.methods._connectors import (
    ConvReg,
    map_shape,
    require_teacher,
    stage_pair,
)
from relkd.methods.base import Method, MethodContext, register_method


@register_method("fitnet")
class FitNet(Method):
    """``weight * MSE(r(f_s), f_t)`` on one "hint" stage, ``r`` a trainable :class:`ConvReg`
    (conv + BN + ReLU, [B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]).

    CRD protocol defaults (RepDistiller ``--distill hint -b 100``): weight 100, CE weight 1, no
    KD, hint on the second stage (``hint_layer=2`` there, whose feature 0 is the stem; for the
    3-stage CIFAR ResNets / WRNs this is the middle stage), trained jointly from the start.

    The paper's stage-wise training is optional: ``init_epochs > 0`` adds a pre-training phase
    ``"init"`` in which only ``init_weight * MSE`` trains the student up to the hint stage (and
    the regressor), without CE.

    Args:
        hint_stage: index into the student's stages, or a stage's module name (default 1, or 0
            for a 1-stage model).
        teacher_hint_stage: index into the teacher's stages or a name (default: ``hint_stage``).
    """

    epoch_args: ClassVar[dict[str, str]] = {
        "init_epochs": "a pre-training phase of that many epochs runs before the run's own epochs"
    }

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 100.0,
        hint_stage: int | str | None = None,
        teacher_hint_stage: int | str | None = None,
        init_epochs: int = 0,
        init_weight: float = 1.0,
    ) -> None:
        super().__init__(ctx)
        if hint_stage is None:
            hint_stage = min(1, len(ctx.student_stages) - 1)
        self.weight, self.init_weight, self.init_epochs = weight, init_weight, int(init_epochs)
        self.s_name, self.t_name = stage_pair(ctx, "fitnet", hint_stage, teacher_hint_stage)
        self.regressor = ConvReg(
            map_shape(ctx, "student", self.s_name, "fitnet"),
            map_shape(ctx, "teacher", self.t_name, "fitnet"),
            relu=True,
        )

    def student_taps(self) -> list[str]:
        return [self.s_name]

    def teacher_taps(self) -> list[str]:
        return [self.t_name]

    def phases(self) -> list[tuple[str, int]]:
        return [("init", self.init_epochs)] if self.init_epochs > 0 else []

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "fitnet")
        if self.phase != "main" and (self.phase != "init" or not self.init_epochs):
            return {}  # another part's pre-training phase
        loss = hint_loss(self.regressor(student.feats[self.s_name]), teacher.feats[self.t_name])
        if self.phase == "init":
            return {"fitnet_init": self.init_weight * loss}
        return {"fitnet": self.weight * loss}
