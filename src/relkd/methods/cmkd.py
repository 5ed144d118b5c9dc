"""CMKD: Correlation Matching Knowledge Distillation (Niu et al., arXiv 2410.06561).

RECONSTRUCTED: no official code is public and the paper body was not available; the loss is our
reconstruction from the abstract and third-party summaries (see
:mod:`relkd.losses.cmkd`), every choice a switch so a user holding the paper can set it.
"""

from __future__ import annotations

from relkd import distributed as D
from relkd.losses.cmkd import cmkd_terms
from relkd.losses.logit_std import maybe_standardize
from relkd.methods.base import Method, MethodContext, register_method
from relkd.registry import RelkdError

DIFFICULTY = ("teacher_entropy", "teacher_entropy_inverse", "none")
RANK = ("soft_sigmoid", "soft_isotonic", "sorting_network")


@register_method("cmkd")
class CMKD(Method):
    """``weight * tau^2 * (mean_i[(1 - w_i) L_P,i + w_i L_S,i] + intra_weight * L_intra)``.

    From the abstract: Pearson (values) plus Spearman (ranks) correlation matching, mixed per
    sample by difficulty. Our reconstruction: DIST's inter/intra Pearson terms on softened
    probabilities, a Spearman term between the student's soft rank of its z-scored logits and the
    teacher's exact ranks, difficulty = normalised teacher entropy. Switches: ``difficulty``
    (teacher_entropy | teacher_entropy_inverse | none), ``rank`` (soft_sigmoid | soft_isotonic |
    sorting_network: a relaxed bitonic network, for the "differentiable sorting operation" a
    third-party description mentions; :func:`relkd.losses.softrank.soft_rank_network`),
    ``rank_eps``, ``intra_weight``, ``temperature`` (4 on CIFAR, 1 on ImageNet). CE weight 1.
    Works on top of other logit methods as a composition, e.g. ``kd+cmkd``. The intra-class term
    is computed on the batch gathered from every rank under DDP. ``logit_std`` z-scores the
    logits before the softmax (arXiv 2403.01427); the Spearman part z-scores in any case.
    """

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 1.0,
        temperature: float = 4.0,
        difficulty: str = "teacher_entropy",
        rank: str = "soft_sigmoid",
        rank_eps: float = 0.1,
        intra_weight: float = 1.0,
        logit_std: bool = False,
        logit_std_temperature: float = 2.0,
    ) -> None:
        super().__init__(ctx)
        for key, value, valid in (
            ("difficulty", difficulty, DIFFICULTY),
            ("rank", rank, RANK),
        ):
            if value not in valid:
                raise RelkdError(
                    f"cmkd: {key}={value!r} is not valid. Valid choices: {', '.join(valid)}"
                )
        self.weight, self.temperature, self.intra_weight = weight, temperature, intra_weight
        self.kw = {"difficulty": difficulty, "rank": rank, "rank_eps": rank_eps}
        self.logit_std, self.logit_std_temperature = logit_std, logit_std_temperature

    def forward(self, student, teacher, targets, **extras):
        z_s, z_t, temp = maybe_standardize(
            student.logits, teacher.logits, self.temperature, self.logit_std,
            self.logit_std_temperature,
        )  # fmt: skip
        t = cmkd_terms(z_s, z_t, temperature=temp, gather=D.is_dist(), **self.kw)
        s = self.weight * temp**2
        return {"cmkd_corr": s * t["mix"], "cmkd_intra": s * self.intra_weight * t["intra"]}
