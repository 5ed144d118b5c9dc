"""FSP: flow-of-solution-procedure matrices (Yim et al., "A Gift from Knowledge Distillation:
Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017)."""

from __future__ import annotations

from torch import nn

from relkd.losses.feature import fsp_loss
from relkd.methods._connectors import (
    InitPhaseMixin,
    StagePairTaps,
    map_shape,
    require_teacher,
    stage_pairs,
)
from relkd.methods.base import Method, MethodContext, register_method
from relkd.registry import RelkdError


@register_method("fsp")
class FSP(InitPhaseMixin, StagePairTaps, Method):
    """FSP matching as a pre-training phase, then plain training.

    Phase ``"init"`` (``init_epochs``, 30 by default; no CE) returns ``init_weight *
    sum_i mean((G_s,i - G_t,i)^2)``, ``G_i`` [B, C_i, C_i+1] the FSP matrix between consecutive
    tapped stages (:func:`relkd.losses.feature.fsp_loss`). The main phase adds ``weight *`` the
    same loss (default 0).

    CRD protocol (RepDistiller ``--distill fsp -b 50``): 30 init epochs of the unweighted sum,
    then CE only -- RepDistiller's main loop sets the FSP term to 0, so its ``-b 50`` has no
    effect; hence ``init_weight`` 1 and ``weight`` 0 here. CE weight 1, no KD.

    Differences: RepDistiller also pairs the stem output with the first stage; relkd taps only
    the declared stages. FSP needs equal channel counts stage by stage (CRD: "n/a" for
    wrn_40_2 -> wrn_40_1); where they differ relkd maps the student's stage with a trainable
    1x1 conv + BN connector (trained in the init phase, frozen afterwards unless ``weight`` >
    0), an extension of the paper.

    Where relkd differs from RepDistiller (not matched yet: the optimizer belongs to the engine,
    see ``docs/fidelity.md``): RepDistiller's ``init`` trains the student's feature modules with
    its own SGD and the main phase starts a *fresh* SGD (zero momentum); relkd's engine keeps one
    optimizer, so the student's momentum buffers from the init phase carry into the first main
    steps (share 0.9^t after t steps with momentum 0.9). Both use the base lr, constant, in init.

    Args:
        stages: >= 2 student stage indices (default: all, paired by position).
        teacher_stages: teacher stage indices (default: ``stages``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 0.0,
        init_weight: float = 1.0,
        init_epochs: int = 30,
        stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight, self.init_weight, self.init_epochs = weight, init_weight, int(init_epochs)
        self.pairs = stage_pairs(ctx, "fsp", stages, teacher_stages)
        if len(self.pairs) < 2:
            raise RelkdError(f"method 'fsp' needs >= 2 stage pairs, got {self.pairs}")
        conns: list[nn.Module] = []
        for s, t in self.pairs:
            c_s, c_t = (
                map_shape(ctx, "student", s, "fsp")[0],
                map_shape(ctx, "teacher", t, "fsp")[0],
            )
            conns.append(
                nn.Identity()
                if c_s == c_t
                else nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
            )
        self.connectors = nn.ModuleList(conns)
        self._init_trainable()

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "fsp")
        self.set_phase(self.phase)  # idempotent; covers a caller that never called set_phase
        w = self._weight_in(self.phase)
        if not w:
            return {}
        f_s = [c(student.feats[s]) for (s, _), c in zip(self.pairs, self.connectors)]
        f_t = [teacher.feats[t] for _, t in self.pairs]
        return {"fsp_init" if self.phase == "init" else "fsp": w * fsp_loss(f_s, f_t)}
