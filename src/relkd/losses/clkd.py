"""CLKD: class-aware logit KD (instance, class and class-correlation terms on raw logits).

Paper: Shuoxi Zhang, Hanpeng Liu, John E. Hopcroft, Kun He, "Class-aware Information for Logit-based
Knowledge Distillation", arXiv 2211.14773 (2022). No official code is public and the paper body was
not available to us: the loss below is RECONSTRUCTED from three independent public
re-implementations (their consensus), not copied from the paper. Shapes: logits [B, C].

    rownorm(X) = X / ||X||_2 per row
    L_ins = MSE(rownorm(z_s), rownorm(z_t))              mean over the B*C elements (per sample)
    L_cla = MSE(rownorm(z_s^T), rownorm(z_t^T))          same on the transposed [C, B] matrix
    G(z)  = (zc / ||zc||_col)^T (zc / ||zc||_col)        [C, C] Pearson correlation of the classes,
            zc = z - mean over the batch
    L_cc  = ||G(z_s) - G(z_t)||_F^2 / C^2
    clkd_loss = mu * (L_ins + beta * L_cla) + nu * L_cc   (lambda * CE is left to the caller)

No temperature and no softmax. Variants (the re-implementations disagree), as keyword switches:
  * ``corr="sample"``: the [B, B] correlation of the samples instead of the [C, C] one of the
    classes, i.e. G(z^T): each sample's logit vector is centred over its classes (and
    normalised), and L_cc divides by B^2.
  * ``corr_normalized=False``: the covariance zc^T zc / (N - 1) (N = batch size for "class", C for
    "sample") instead of the correlation. Its scale grows with the square of the logit scale; on a
    small Fashion-MNIST test it drove the student to chance accuracy, hence the default.
  * ``corr_centered=False``: no mean subtraction (cosine similarity, or the raw second moment with
    the same N - 1 divisor when not normalised).
  * ``corr_squared=False``: our reading of the "not squared" variant is the mean ABSOLUTE entry
    difference, mean |G_s - G_t| (= ||G_s - G_t||_1 / C^2), the L1 analogue of the default mean
    squared entry difference. (The other possible reading, ||G_s - G_t||_F / C, is not offered.)

Distributed training (``gather=True``). L_ins is a mean over samples: each rank computes it on its
local batch, and with equal local batches DDP's gradient average equals the gradient of the global
mean. L_cla and L_cc are batch-level (column norms, batch centring, [C, C] correlations): each rank
gathers all ranks' logits with ``all_gather_with_grad`` (the local slice keeps its graph), computes
the term on the global batch (same value on every rank), and ``global_batch_term`` multiplies its
gradient by the world size W, because each rank back-propagates only into its own slice and DDP
then divides the summed gradient by W. Net effect: the averaged parameter gradient equals the
single-process gradient at the same global batch. Without a process group ``gather`` is a no-op.

Numerics: computed in fp32 with autocast disabled (the [C, C] matmul would otherwise run in
bf16/fp16); float64 inputs stay float64. Norms are clamped at 1e-8, so an all-zero row or column
(e.g. a zero-initialised classifier) gets gradients of order 1e8: the direction of a zero vector is
undefined, any normalisation has this property.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relkd.distributed import all_gather_with_grad, global_batch_term

__all__ = ["CORR_CHOICES", "clkd_loss", "clkd_terms", "relation_matrix"]

CORR_CHOICES = ("class", "sample")
_EPS = 1e-8  # norm clamp: only matters for (near) all-zero rows / columns


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # Distribution losses in fp32 even under autocast; float64 is kept (gradcheck, references).
    return x if x.dtype == torch.float64 else x.float()


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **switches) -> None:
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "expected student and teacher logits of the same shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    corr = switches.pop("corr")
    if corr not in CORR_CHOICES:
        raise ValueError(f"corr={corr!r} is not valid; choose one of {list(CORR_CHOICES)}")
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is not valid; choose one of [True, False]")


def relation_matrix(
    z: torch.Tensor, *, corr: str = "class", normalized: bool = True, centered: bool = True
) -> torch.Tensor:
    """CLKD's relation matrix of logits z [B, C]: [C, C] for corr="class", [B, B] for "sample".

    The columns of m (m = z for "class", m = z^T for "sample") are the variables and its rows the
    observations: centre each column over the observations, then either normalise the columns
    (correlation) or divide by (N - 1) (covariance), N the number of observations.
    """
    m = z if corr == "class" else z.t()
    if centered:
        m = m - m.mean(dim=0, keepdim=True)
    if normalized:
        m = F.normalize(m, dim=0, eps=_EPS)
        return m.t() @ m
    return m.t() @ m / max(m.shape[0] - 1, 1)


def clkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    corr: str = "class",
    corr_normalized: bool = True,
    corr_centered: bool = True,
    corr_squared: bool = True,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """The three unweighted CLKD terms {"ins", "cla", "cc"} (scalars, fp32) for logits [B, C].

    ``clkd_loss`` is exactly ``mu * (ins + beta * cla) + nu * cc`` of these tensors. With
    ``gather=True`` under torch.distributed, "cla" and "cc" have the global-batch value and a
    gradient scaled by the world size (see the module docstring): log them, or weight and sum them,
    but do not rescale them again.
    """
    _check(
        student_logits,
        teacher_logits,
        corr=corr,
        corr_normalized=corr_normalized,
        corr_centered=corr_centered,
        corr_squared=corr_squared,
    )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        zs, zt = _fp32(student_logits), _fp32(teacher_logits)
        # Instance level: each sample's logit vector normalised over its classes.
        ins = F.mse_loss(F.normalize(zs, dim=1, eps=_EPS), F.normalize(zt, dim=1, eps=_EPS))
        if gather:
            zs, zt = all_gather_with_grad(zs), all_gather_with_grad(zt)
        # Class level: rownorm of the transposed [C, B] matrix = normalise each class column over
        # the batch; the mean runs over the same B*C elements.
        cla = F.mse_loss(F.normalize(zs, dim=0, eps=_EPS), F.normalize(zt, dim=0, eps=_EPS))
        kw = {"corr": corr, "normalized": corr_normalized, "centered": corr_centered}
        diff = relation_matrix(zs, **kw) - relation_matrix(zt, **kw)
        # .mean() over the K x K entries = ||.||_F^2 / K^2 (squared) or ||.||_1 / K^2 (absolute).
        cc = diff.square().mean() if corr_squared else diff.abs().mean()
        if gather:
            cla, cc = global_batch_term(cla), global_batch_term(cc)
    return {"ins": ins, "cla": cla, "cc": cc}


def clkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    beta: float = 2.0,
    nu: float = 0.4,
    corr: str = "class",
    corr_normalized: bool = True,
    corr_centered: bool = True,
    corr_squared: bool = True,
    gather: bool = False,
) -> torch.Tensor:
    """CLKD loss ``mu * (L_ins + beta * L_cla) + nu * L_cc`` (CE left out), a scalar fp32 tensor.

    Args:
        student_logits, teacher_logits: [B, C] raw logits (teacher normally without grad).
        mu, beta, nu: the consensus weights of the re-implementations (paper: lambda 0.1 for CE).
        corr, corr_normalized, corr_centered, corr_squared: L_cc variants, see the module docstring.
        gather: compute the batch-level terms on the batch gathered from all ranks (DDP).

    Raises:
        ValueError: mismatched shapes or an invalid switch value (the message lists the choices).
    """
    t = clkd_terms(
        student_logits,
        teacher_logits,
        corr=corr,
        corr_normalized=corr_normalized,
        corr_centered=corr_centered,
        corr_squared=corr_squared,
        gather=gather,
    )
    return mu * (t["ins"] + beta * t["cla"]) + nu * t["cc"]
