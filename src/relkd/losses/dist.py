"""DIST: relational (Pearson-correlation) logit KD, inter-class plus intra-class.

Paper: Tao Huang, Shan You, Fei Wang, Chen Qian, Chang Xu, "Knowledge Distillation from A Stronger
Teacher", NeurIPS 2022, arXiv 2205.10536. Shapes: logits [B, C].

    p_s = softmax(z_s / tau), p_t = softmax(z_t / tau)                       [B, C]
    pearson(a, b) = cosine(a - mean(a), b - mean(b))                         (eps 1e-8)
    inter = 1 - mean_i pearson(p_s[i, :], p_t[i, :])      per sample, over the classes
    intra = 1 - mean_c pearson(p_s[:, c], p_t[:, c])      per class, over the batch
    dist_loss = beta * tau^2 * inter + gamma * tau^2 * intra               (CE left to the caller)

Defaults beta = gamma = tau = 1 are the paper's ImageNet setting (its CIFAR-100 runs use tau = 4).

Distributed training (``gather=True``): ``inter`` is a mean over samples and stays on the local
batch (with equal local batches DDP's gradient average equals the global mean's gradient). ``intra``
correlates columns over the batch, so it is computed on the logits gathered from every rank with
``all_gather_with_grad`` and wrapped in ``global_batch_term`` (gradient x world size, because each
rank back-propagates only into its own slice and DDP divides by the world size). The averaged
gradient then equals the single-process gradient at the same global batch.

Numerics: fp32 with autocast disabled (softmax and the correlations; float64 stays float64). The
eps of the official code is kept: a constant row/column (e.g. all-zero student logits) has a
zero-norm centred vector and gets gradients of order 1/eps = 1e8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relkd.distributed import all_gather_with_grad, global_batch_term

__all__ = ["dist_loss", "dist_terms", "pearson_rows"]

_EPS = 1e-8  # as in the official DIST code (cosine_similarity eps)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # Distribution losses in fp32 even under autocast; float64 is kept (gradcheck, references).
    return x if x.dtype == torch.float64 else x.float()


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Pearson correlation of each row pair of a, b [N, D] -> [N]."""
    return F.cosine_similarity(
        a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1, eps=eps
    )


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "expected student and teacher logits of the same shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def dist_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    gather: bool = False,
) -> dict[str, torch.Tensor]:
    """Unweighted DIST terms {"inter", "intra"} (no tau^2), scalars; logits [B, C].

    ``dist_loss = tau^2 * (beta * inter + gamma * intra)``. With ``gather=True`` under
    torch.distributed, "intra" has the global-batch value and a world-size-scaled gradient.
    """
    _check(student_logits, teacher_logits, temperature)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        ps = F.softmax(_fp32(student_logits) / temperature, dim=1)
        pt = F.softmax(_fp32(teacher_logits) / temperature, dim=1)
        inter = 1.0 - pearson_rows(ps, pt).mean()
        if gather:
            ps, pt = all_gather_with_grad(ps), all_gather_with_grad(pt)
        intra = 1.0 - pearson_rows(ps.t(), pt.t()).mean()
        if gather:
            intra = global_batch_term(intra)
    return {"inter": inter, "intra": intra}


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    gather: bool = False,
) -> torch.Tensor:
    """DIST loss ``beta * tau^2 * inter + gamma * tau^2 * intra`` for [B, C] logits (scalar, fp32).

    tau^2 keeps the gradient scale comparable across temperatures, as in KD (the official code
    multiplies both terms by tau^2).
    """
    t = dist_terms(student_logits, teacher_logits, temperature=temperature, gather=gather)
    return temperature**2 * (beta * t["inter"] + gamma * t["intra"])
