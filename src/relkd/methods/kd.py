"""Vanilla KD (Hinton et al., arXiv 1503.02531) with the CRD protocol defaults."""

from __future__ import annotations

from relkd.losses import kd_loss
from relkd.methods.base import Method, MethodContext, register_method


@register_method("kd")
class KD(Method):
    """``weight * KL(p_t^T || p_s^T) * T^2``; CRD protocol: T 4, KD weight 0.9, CE weight 0.1.

    In a composition ("rrd+kd", "crd+kd") the KD weight defaults to 1 as in those papers.
    """

    default_ce_weight = 0.1
    composite_defaults = {"weight": 1.0}

    def __init__(self, ctx: MethodContext, weight: float = 0.9, temperature: float = 4.0) -> None:
        super().__init__(ctx)
        self.weight = weight
        self.temperature = temperature

    def forward(self, student, teacher, targets, **extras):
        return {"kd": self.weight * kd_loss(student.logits, teacher.logits, self.temperature)}
