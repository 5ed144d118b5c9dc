"""Vanilla KD (Hinton et al., arXiv 1503.02531) with the CRD protocol defaults."""

from __future__ import annotations

from relkd.losses import kd_loss
from relkd.losses.logit_std import zscore_logits
from relkd.methods.base import Method, MethodContext, register_method


@register_method("kd")
class KD(Method):
    """``weight * KL(p_t^T || p_s^T) * T^2``; CRD protocol: T 4, KD weight 0.9, CE weight 0.1.

    In a composition ("rrd+kd", "crd+kd") the KD weight defaults to 1 as in those papers.

    ``logit_std=True`` z-scores both logit vectors first and then uses the base temperature
    ``logit_std_temperature`` instead of ``temperature`` (Sun et al., "Logit Standardization
    in Knowledge Distillation", CVPR 2024, arXiv 2403.01427). The authors' CIFAR-100 runs use
    base temperature 2 (3 for a few pairs) and KD weight 9 with CE 0.1: set ``weight: 9``.
    """

    default_ce_weight = 0.1
    composite_defaults = {"weight": 1.0}

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 0.9,
        temperature: float = 4.0,
        logit_std: bool = False,
        logit_std_temperature: float = 2.0,
    ) -> None:
        super().__init__(ctx)
        self.weight = weight
        self.temperature = temperature
        self.logit_std = logit_std
        self.logit_std_temperature = logit_std_temperature

    def forward(self, student, teacher, targets, **extras):
        z_s, z_t, t = student.logits, teacher.logits, self.temperature
        if self.logit_std:
            z_s, z_t, t = zscore_logits(z_s), zscore_logits(z_t), self.logit_std_temperature
        return {"kd": self.weight * kd_loss(z_s, z_t, t)}
