"""AB: activation-boundary distillation (Heo et al., "Knowledge Transfer via Distillation of
Activation Boundaries Formed by Hidden Neurons", AAAI 2019, arXiv 1811.03233)."""

from __future__ import annotations

from torch import nn

from relkd.losses.feature import ab_loss
from relkd.methods._connectors import (
    ConvReg,
    InitPhaseMixin,
    StagePairTaps,
    map_shape,
    require_teacher,
    stage_pairs,
)
from relkd.methods.base import Method, MethodContext, register_method

#: Scale of the summed per-stage losses in the authors' code (kept by RepDistiller).
AB_SCALE = 3e-3


@register_method("ab")
class AB(InitPhaseMixin, StagePairTaps, Method):
    """Activation-boundary transfer as a pre-training phase, then plain training.

    Phase ``"init"`` (``init_epochs``, 30 by default; the engine skips CE there) returns
    ``init_weight * 3e-3 * sum_i 2^(i-n+1) * AB(r_i(f_s,i), f_t,i)`` over the n stage pairs
    (deeper stages weigh more), with per-stage connectors ``r_i`` (conv + BN, no ReLU,
    :class:`ConvReg`) and margin 1 (:func:`relkd.losses.feature.ab_loss`). The connectors are
    frozen afterwards. The main phase adds ``weight *`` the same loss (default 0).

    CRD protocol (RepDistiller ``--distill abound -b 1``): 30 init epochs of the unweighted AB
    loss (so ``init_weight`` 1), then CE only -- RepDistiller's main loop sets the AB term to 0,
    so its ``-b 1`` has no effect; hence ``weight`` 0 here. CE weight 1, no KD, every stage.

    Our decisions: the stage taps are post-ReLU maps while the paper and RepDistiller feed the
    student's *pre*-activations to the connector, so a connector is always built (RepDistiller
    uses the identity for equal shapes); the teacher side needs only its sign pattern, which
    ReLU keeps. The student's BN layers run in training mode during the init phase.

    Where relkd differs from RepDistiller (not matched yet: the optimizer belongs to the engine,
    see ``docs/fidelity.md``): RepDistiller's ``init`` uses its own SGD (connectors + student
    feature modules) and the main phase then starts a *fresh* SGD, so the main phase begins with
    zero momentum. relkd's engine keeps one optimizer across phases: the student's SGD momentum
    buffers from the last init step carry into the first main steps (with momentum 0.9 their
    share decays as 0.9^t: ~0.5 % after 50 steps). Both run the init phase at the base lr,
    constant.
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 0.0,
        init_weight: float = 1.0,
        init_epochs: int = 30,
        margin: float = 1.0,
        stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight, self.init_weight, self.margin = weight, init_weight, margin
        self.init_epochs = int(init_epochs)
        self.pairs = stage_pairs(ctx, "ab", stages, teacher_stages)
        n = len(self.pairs)
        self.stage_weights = [2.0 ** (i - n + 1) for i in range(n)]
        self.connectors = nn.ModuleList(
            ConvReg(map_shape(ctx, "student", s, "ab"), map_shape(ctx, "teacher", t, "ab"), False)
            for s, t in self.pairs
        )
        self._init_trainable()

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "ab")
        self.set_phase(self.phase)  # idempotent; covers a caller that never called set_phase
        w = self._weight_in(self.phase)
        if not w:
            return {}
        loss = 0.0
        for (s, t), conn, sw in zip(self.pairs, self.connectors, self.stage_weights):
            loss = loss + sw * ab_loss(conn(student.feats[s]), teacher.feats[t], self.margin)
        return {"ab_init" if self.phase == "init" else "ab": w * AB_SCALE * loss}
