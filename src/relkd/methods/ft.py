"""FT: factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression
via Factor Transfer", NeurIPS 2018, arXiv 1802.04977)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from relkd.losses.feature import ft_loss
from relkd.methods._connectors import (
    conv_stack,
    map_shape,
    require_teacher,
    set_trainable,
    stage_pair,
)
from relkd.methods.base import Method, MethodContext, register_method
from relkd.registry import RelkdError


@register_method("ft")
class FT(Method):
    """Paraphraser pre-training, then ``weight * FT(translator(f_s), paraphraser(f_t))``.

    Phase ``"init"`` (``init_epochs``, 30 by default; no CE, no gradient to the student):
    the paraphraser -- an auto-encoder on the teacher's last stage map, encoder of three 3x3
    convs C_t -> C_t -> K -> K (K = ``rate * C_t``) and a mirrored transposed-conv decoder,
    LeakyReLU(0.1), no BN -- is trained to reconstruct it: ``init_weight * MSE(dec(enc(f_t)),
    f_t)``. Afterwards the paraphraser is frozen (as in the paper: the teacher's factors are a
    fixed target) and the main phase trains the student with the translator (three 3x3 convs
    C_s -> C_s -> K -> K with BN and LeakyReLU) on ``weight * ft_loss(factor_s, factor_t)``
    (:func:`relkd.losses.feature.ft_loss`, ``p`` and ``form`` passed through). With
    ``init_epochs=0`` the factors come from a random, frozen paraphraser.

    CRD protocol defaults (RepDistiller ``--distill factor -b 200``): weight 200, CE weight 1,
    no KD, rate 0.5, p = 1, the last stage, 30 init epochs, ``form="repdistiller"`` (factors
    reduced to normalised spatial maps; ``"paper"`` compares the whole normalised factors).

    Where relkd differs from RepDistiller (not matched yet: the optimizer belongs to the engine,
    see ``docs/fidelity.md``): RepDistiller's ``init`` builds its own SGD over the paraphraser
    with lr 0.01 when the student is a CIFAR ResNet or WRN (resnet8 ... resnet110, resnet8x4,
    resnet32x4, wrn_16_1/2, wrn_40_1/2), and the base lr otherwise (vgg8 0.05, MobileNetV2 /
    ShuffleNets 0.01); relkd's engine trains every phase at the base lr, so for ResNet / WRN
    students at the CRD base lr 0.05 the paraphraser here trains at 5x RepDistiller's lr, 30
    epochs at a constant lr in both. Momentum carry-over (the AB / FSP difference) does not
    matter for FT: the student and translator get no gradient in the init phase (no momentum
    state), and the paraphraser is frozen afterwards.
    """

    epoch_args: ClassVar[dict[str, str]] = {
        "init_epochs": "a pre-training phase of that many epochs runs before the run's own epochs"
    }

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 200.0,
        init_weight: float = 1.0,
        init_epochs: int = 30,
        rate: float = 0.5,
        p: int = 1,
        form: str = "repdistiller",
        stage: int = -1,
        teacher_stage: int | None = None,
    ) -> None:
        super().__init__(ctx)
        if form not in ("repdistiller", "paper") or p not in (1, 2) or not 0 < rate <= 1:
            raise RelkdError(
                f"method 'ft': need form in ('repdistiller', 'paper'), p in (1, 2), "
                f"0 < rate <= 1; got form={form!r}, p={p}, rate={rate}"
            )
        self.weight, self.init_weight, self.init_epochs = weight, init_weight, int(init_epochs)
        self.p, self.form = p, form
        self.s_name, self.t_name = stage_pair(ctx, "ft", stage, teacher_stage)
        c_s = map_shape(ctx, "student", self.s_name, "ft")[0]
        c_t = map_shape(ctx, "teacher", self.t_name, "ft")[0]
        k = max(1, int(c_t * rate))
        self.encoder = conv_stack([c_t, c_t, k, k], bn=False)
        self.decoder = conv_stack([k, k, c_t, c_t], bn=False, transpose=True)
        self.translator = conv_stack([c_s, c_s, k, k], bn=True)
        set_trainable(self.encoder, self._pretrains("init"))
        set_trainable(self.decoder, self._pretrains("init"))

    def student_taps(self) -> list[str]:
        return [self.s_name]

    def teacher_taps(self) -> list[str]:
        return [self.t_name]

    def phases(self) -> list[tuple[str, int]]:
        return [("init", self.init_epochs)] if self.init_epochs > 0 else []

    def _pretrains(self, phase: str) -> bool:
        return phase == "init" and self.init_epochs > 0 and self.init_weight > 0

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)
        set_trainable(self.encoder, self._pretrains(phase))
        set_trainable(self.decoder, self._pretrains(phase))

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "ft")
        self.set_phase(self.phase)  # idempotent; covers a caller that never called set_phase
        f_t = teacher.feats[self.t_name].detach()
        if self._pretrains(self.phase):
            rec = self.decoder(self.encoder(f_t))
            return {"ft_init": self.init_weight * F.mse_loss(rec.float(), f_t.float())}
        if self.phase != "main":
            return {}  # another part's pre-training phase
        with torch.no_grad():  # the paraphraser is frozen: its factor is a fixed target
            factor_t = self.encoder(f_t)
        factor_s = self.translator(student.feats[self.s_name])
        return {"ft": self.weight * ft_loss(factor_s, factor_t, self.p, self.form)}
