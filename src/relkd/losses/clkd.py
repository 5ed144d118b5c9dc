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

No temperature and no softmax. Variants (the re-implementations disagree), as keyword switches;
each non-default switch computes what one re-implementation computes (tested against transcribed
formulas in ``tests/losses/test_clkd.py``). zc below is z centred over the batch (each class
column minus its batch mean), as in every re-implementation; C is the number of classes.
  * ``corr="sample"``: the [B, B] matrix of the samples, zc zc^T (rows normalised to unit length
    by default: the cosine of the samples' batch-centred logit vectors), and L_cc still divides by
    C^2. With ``corr_normalized=False`` this is re-implementation A's [B, B] matrix
    sum_j zc[:, j] zc[:, j]^T / (C - 1) with its ||dG||_F^2 / C^2.
  * ``corr_normalized=False``: the raw covariance zc^T zc / (C - 1) (``"class"``) or
    zc zc^T / (C - 1) (``"sample"``) instead of the correlation; the divisor is C - 1 in both
    re-implementations that use a covariance (not the statistical B - 1). Its scale grows with the
    square of the logit scale; on a small Fashion-MNIST test it drove the student to chance
    accuracy, hence the default.
  * ``corr_centered=False``: no centring (cosine similarity of the raw columns / rows, or the raw
    second moment with the same C - 1 divisor when not normalised).
  * ``corr_squared=False``: L_cc = ||G_s - G_t||_F / C^2, the Frobenius norm NOT squared, still
    divided by C^2: re-implementation B (class covariance, ``corr_normalized=False``) does this.
    (Before this was fixed relkd computed mean |G_s - G_t| here, which no re-implementation does.)
The third re-implementation (uncentred Gram z^T z compared by row-normalised MSE) is not offered.

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

    Both centre each class column of z over the batch (``centered``). "class": zc^T zc with the
    columns normalised (Pearson correlation of the classes) or divided by C - 1; "sample":
    zc zc^T with the rows normalised or divided by C - 1 (see the module docstring).
    """
    c = z.shape[1]
    if corr == "class":
        m = z
        if centered:
            m = m - m.mean(dim=0, keepdim=True)
        if normalized:
            m = F.normalize(m, dim=0, eps=_EPS)
            return m.t() @ m
        return m.t() @ m / max(c - 1, 1)
    m = z - z.mean(dim=0, keepdim=True) if centered else z  # batch-centred, as for "class"
    if normalized:
        m = F.normalize(m, dim=1, eps=_EPS)
        return m @ m.t()
    return m @ m.t() / max(c - 1, 1)


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
        c2 = zs.shape[1] ** 2
        if corr_squared:
            # ||.||_F^2 / C^2; for "class" (K = C) the mean over the C x C entries (the default)
            cc = diff.square().mean() if corr == "class" else diff.square().sum() / c2
        else:  # ||.||_F / C^2 (vector_norm's gradient at 0 is 0, not NaN)
            cc = torch.linalg.vector_norm(diff) / c2
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
