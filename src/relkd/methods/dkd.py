"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022, arXiv 2203.08679)."""

from __future__ import annotations

from typing import ClassVar

from relkd.losses.dkd import dkd_terms
from relkd.losses.logit_std import maybe_standardize
from relkd.methods.base import Method, MethodContext, register_method


@register_method("dkd")
class DKD(Method):
    """``min((epoch + 1) / warmup, 1) * (alpha * TCKD + beta * NCKD)`` (both * T^2).

    Defaults of the paper / mdistiller CIFAR-100: CE 1, alpha 1, beta 8, T 4, 20-epoch linear
    warm-up of the KD terms (the factor counts epochs from 1 as mdistiller does). ImageNet uses
    beta 0.5, T 1 (set them in the config). ``logit_std`` z-scores the logits and uses
    ``logit_std_temperature`` (Sun et al., arXiv 2403.01427; see :mod:`relkd.losses.logit_std`).
    """

    epoch_args: ClassVar[dict[str, str]] = {
        "warmup": "the KD terms' weight ramps up linearly over that many epochs, so the run "
        "ends below their full weight"
    }

    def __init__(
        self,
        ctx: MethodContext,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup: int = 20,
        logit_std: bool = False,
        logit_std_temperature: float = 2.0,
    ) -> None:
        super().__init__(ctx)
        self.alpha, self.beta, self.temperature, self.warmup = alpha, beta, temperature, warmup
        self.logit_std, self.logit_std_temperature = logit_std, logit_std_temperature

    def forward(self, student, teacher, targets, **extras):
        z_s, z_t, temp = maybe_standardize(
            student.logits, teacher.logits, self.temperature, self.logit_std,
            self.logit_std_temperature,
        )  # fmt: skip
        w = min((self.epoch + 1) / self.warmup, 1.0) if self.warmup > 0 else 1.0
        w = w * temp**2  # dkd_terms leave out the T^2 gradient-scale factor
        t = dkd_terms(z_s, z_t, targets, temperature=temp)
        return {"tckd": w * self.alpha * t["tckd"], "nckd": w * self.beta * t["nckd"]}
