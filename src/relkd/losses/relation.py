"""Relational distillation losses of the CRD baseline table: SP, CC, RKD, PKT (math only).

Each compares how the samples of a batch relate to each other in the student's and in the
teacher's feature space. Inputs are ``[B, ...]`` (flattened to ``[B, D]``; D may differ between
student and teacher); the teacher side is detached (except in CC, whose teacher-side embedding
trains); the result is a scalar in fp32 (Gram matrices and distances of bf16 features are too
coarse).

Papers:
    SP   Tung & Mori, "Similarity-Preserving Knowledge Distillation", arXiv 1907.09682.
    CC   Peng et al., "Correlation Congruence for Knowledge Distillation", arXiv 1904.01802.
    RKD  Park et al., "Relational Knowledge Distillation", arXiv 1904.05068.
    PKT  Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
         Transfer", arXiv 1803.10837.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relkd.losses._precision import fp32, no_autocast


def _flat(
    f_s: torch.Tensor, f_t: torch.Tensor, detach: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"batch sizes differ: {f_s.shape[0]} vs {f_t.shape[0]}")
    return fp32(f_s).flatten(1), fp32(f_t.detach() if detach else f_t).flatten(1)


@no_autocast
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity preserving: ``||G_t - G_s||_F^2 / B^2`` with ``G = rownorm(F F^T)`` [B, B].

    Args:
        f_s: [B, ...] student features (e.g. the last stage map); f_t: [B, ...].
    """
    s, t = _flat(f_s, f_t)
    g_s = F.normalize(s @ s.t(), dim=1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


@no_autocast
def cc_loss(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Correlation congruence as used for the CRD table (RepDistiller, code from the CC authors).

    With ``d_i = |e_s,i - e_t,i|`` ([B, D] embeddings), the loss is the batch mean of
    ``d_i . d_{i+1}`` over consecutive samples -- a cheap stand-in for the paper's kernel
    correlation matrices (see :func:`cc_gaussian_loss` for that form).

    Unlike the other losses here, ``e_t`` is *not* detached: in CC both embeddings are
    trainable (detach the teacher side yourself when it is fixed).
    """
    s, t = _flat(e_s, e_t, detach=False)
    d = (s - t).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


@no_autocast
def gaussian_correlation(e: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Gaussian-RBF correlation matrix by its Taylor series (CC paper, eq. 9), [B, D] -> [B, B].

    ``k(x, y) = exp(-gamma ||x - y||^2) ~= exp(-2 gamma) sum_{p=0..P} (2 gamma)^p / p! (x.y)^p``,
    exact as P -> inf for unit-norm rows.
    """
    dot = e @ e.t()
    out = torch.zeros_like(dot)
    for p in range(order + 1):
        out = out + (2 * gamma) ** p / math.factorial(p) * dot.pow(p)
    return math.exp(-2 * gamma) * out


@no_autocast
def cc_gaussian_loss(
    e_s: torch.Tensor, e_t: torch.Tensor, gamma: float = 0.4, order: int = 2
) -> torch.Tensor:
    """The CC paper's form: ``||C_t - C_s||_F^2 / B^2`` with :func:`gaussian_correlation` of
    the L2-normalised embeddings (paper: gamma 0.4, P = 2). ``e_t`` is not detached (see
    :func:`cc_loss`)."""
    s, t = _flat(e_s, e_t, detach=False)
    c_s = gaussian_correlation(F.normalize(s, dim=1), gamma, order)
    c_t = gaussian_correlation(F.normalize(t, dim=1), gamma, order)
    return (c_t - c_s).pow(2).sum() / s.shape[0] ** 2


@no_autocast
def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances [B, D] -> [B, B], zero diagonal (clamped at ``eps`` before the sqrt
    so that the gradient at coincident points stays finite)."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


@no_autocast
def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber (smooth L1, beta 1) between pairwise distances, each normalised by its mean
    over distinct pairs."""
    s, t = _flat(f_s, f_t)
    d_t = pairwise_distances(t)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = pairwise_distances(s)
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def _angles(e: torch.Tensor) -> torch.Tensor:
    # [i, j, k] = cos of the angle at vertex i between e_j and e_k; i == j gives a zero vector.
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [i, j] = unit(e_j - e_i)
    return torch.bmm(diff, diff.transpose(1, 2))


@no_autocast
def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber (smooth L1, beta 1) between the cosines of all B^3 triplet angles."""
    s, t = _flat(f_s, f_t)
    return F.smooth_l1_loss(_angles(s), _angles(t))


@no_autocast
def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """``distance_weight * RKD-D + angle_weight * RKD-A`` (paper defaults 25 and 50).

    Memory is O(B^2 D + B^3) for the angle term (~34 MB of fp32 at B = 64, D = 2048).
    """
    out = torch.zeros((), device=f_s.device)
    if distance_weight:
        out = out + distance_weight * rkd_distance_loss(f_s, f_t)
    if angle_weight:
        out = out + angle_weight * rkd_angle_loss(f_s, f_t)
    return out


@no_autocast
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer with the cosine kernel.

    Conditional probabilities ``p_{j|i} = k(i, j) / sum_j k(i, j)`` with
    ``k = (cos + 1) / 2`` (diagonal included, as in the authors' code) and
    ``mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))`` over all B^2 entries
    (mean, not the per-row sum of a true KL; the CRD weight 30000 was tuned on this scale).
    """
    s, t = _flat(f_s, f_t)
    # A zero feature vector has no direction: it is left at 0 (cosine 0), never NaN.
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    t = t / (t.norm(dim=1, keepdim=True) + eps)
    k_s = (s @ s.t() + 1.0) / 2.0
    k_t = (t @ t.t() + 1.0) / 2.0
    p_s = k_s / k_s.sum(1, keepdim=True)
    p_t = k_t / k_t.sum(1, keepdim=True)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
