"""CLKD: Class-aware Logit Knowledge Distillation (Zhang et al., arXiv 2211.14773).

RECONSTRUCTED from three independent public re-implementations: no official code is public and
the paper body was not available (see :mod:`relkd.losses.clkd`).
"""

from __future__ import annotations

from relkd import distributed as D
from relkd.losses.clkd import clkd_terms
from relkd.methods.base import Method, MethodContext, register_method
from relkd.registry import RelkdError


@register_method("clkd")
class CLKD(Method):
    """``mu * (L_ins + beta * L_cla) + nu * L_cc``; CE weight ``lambda`` = 1 by default.

    L_ins / L_cla: MSE of row-normalised logits of the [B, C] matrix and of its transpose
    (instance and class level); L_cc: squared Frobenius distance of the [C, C] class correlation
    matrices / C^2. Defaults: mu 0.5, beta 2, nu 0.4 (the re-implementations' consensus) and
    lambda 1 (their consensus is 0.1). Switches ``corr`` (class | sample: re-implementation A's [B, B] sample matrix),
    ``corr_normalized`` (correlation, default, vs the raw covariance / (C - 1) of the
    re-implementations, which collapsed training to chance in our Fashion-MNIST check),
    ``corr_centered``, ``corr_squared`` (False: ||dG||_F / C^2 not squared, re-implementation B);
    exact formulas in :mod:`relkd.losses.clkd`. The class-level and correlation terms use the
    batch gathered from every rank under DDP.

    Why lambda 1, not the consensus 0.1 (chosen on a validation split, never on a test set):
    in ``benchmarks/results/cifar10jpg-val-study/`` (CIFAR-10 JPEG, resnet20 -> resnet8, 16
    epochs, a stratified 10 % hold-out of the training set, 3 seeds) lambda 0.1 reached 52.65 +-
    0.79 last-epoch validation top-1 and lambda 1 65.47 +- 0.32: better on every seed and by
    more than twice the larger seed spread (the study's pre-registered rule). Neither beat the
    CE student there (65.62 +- 0.37); corr sample (43.81 +- 6.15) and corr_squared False
    (52.70 +- 0.21) did not beat lambda 0.1. The evidence is one pair at one short budget: the
    shipped CIFAR-100 configs and suites pin 0.1, the setting the re-implementations use there.
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        mu: float = 0.5,
        beta: float = 2.0,
        nu: float = 0.4,
        corr: str = "class",
        corr_normalized: bool = True,
        corr_centered: bool = True,
        corr_squared: bool = True,
    ) -> None:
        super().__init__(ctx)
        if corr not in ("class", "sample"):
            raise RelkdError(f"clkd: corr={corr!r} is not valid. Valid choices: class, sample")
        self.mu, self.beta, self.nu = mu, beta, nu
        self.kw = {
            "corr": corr,
            "corr_normalized": corr_normalized,
            "corr_centered": corr_centered,
            "corr_squared": corr_squared,
        }

    def forward(self, student, teacher, targets, **extras):
        t = clkd_terms(student.logits, teacher.logits, gather=D.is_dist(), **self.kw)
        return {
            "clkd_ins": self.mu * t["ins"],
            "clkd_cla": self.mu * self.beta * t["cla"],
            "clkd_cc": self.nu * t["cc"],
        }
