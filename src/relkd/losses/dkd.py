"""DKD: Decoupled Knowledge Distillation (target-class and non-target-class KD).

Paper: Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiao, Jiajun Liang, "Decoupled Knowledge
Distillation", CVPR 2022, arXiv 2203.08679. Shapes: logits [B, C], targets [B] (int64).

    b = [p_gt, 1 - p_gt]       binary target / non-target probabilities, p = softmax(z / T)
    p_hat = softmax over the non-target classes only (the gt logit masked out)
    TCKD = KL(b_t || b_s),  NCKD = KL(p_hat_t || p_hat_s)                   batchmean
    dkd_loss = T^2 * (alpha * TCKD + beta * NCKD)                           (CE left to the caller)

Defaults alpha 1, beta 8, T 4 (CIFAR-100). The paper's 20-epoch linear warm-up of the KD terms is a
schedule, not part of the loss: the method applies it. As in the paper's pseudo-code, NCKD masks the
gt class by subtracting 1000 from its (temperature-scaled) logit before the softmax, which gives the
renormalised non-target distribution exactly in fp32 (exp(-1000) underflows to 0).
TCKD is computed from log-probabilities (log-sum-exp of the target and of the non-target logits),
not as log(sum of probabilities): same value, but finite even when the teacher puts all its mass
on one side in fp32, where the pseudo-code's log(0) would give inf/nan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dkd_loss", "dkd_terms"]

_MASK = 1000.0  # the paper's pseudo-code constant


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # Distribution losses in fp32 even under autocast; float64 is kept (gradcheck, references).
    return x if x.dtype == torch.float64 else x.float()


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 4.0,
) -> dict[str, torch.Tensor]:
    """Unweighted DKD terms {"tckd", "nckd"}: the two KL divergences, batchmean, without T^2."""
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "expected student and teacher logits of the same shape [B, C], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, c = student_logits.shape
    if c < 2:
        raise ValueError(f"DKD needs at least 2 classes, got C={c}")
    if targets.shape != (b,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be integer class indices of shape [{b}], got {targets.dtype} "
            f"{tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        zs = _fp32(student_logits) / temperature
        zt = _fp32(teacher_logits) / temperature
        gt = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, targets.long()[:, None], True)

        def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
            # [B, 2] = log [p_gt, 1 - p_gt] = [z_gt, lse(z_non-gt)] - lse(z)
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            z_gt = z.gather(1, targets.long()[:, None])
            z_other = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1, keepdim=True)
            return torch.cat([z_gt, z_other], dim=1) - lse

        # batchmean: sum over the entries / B (per-sample KL, averaged), as in the paper.
        tckd = F.kl_div(
            binary_log_probs(zs), binary_log_probs(zt), reduction="batchmean", log_target=True
        )
        mask = _MASK * gt.to(zs.dtype)
        # Teacher side as log-probabilities too (log_target): KL is exactly 0 at equal logits, and
        # the masked entry contributes exp(-1000) * (...) = 0 to the value and to the gradient
        # (a probability target would put log(0) into the teacher's gradient).
        nckd = F.kl_div(
            F.log_softmax(zs - mask, dim=1),
            F.log_softmax(zt - mask, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return {"tckd": tckd, "nckd": nckd}


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """DKD loss ``T^2 * (alpha * TCKD + beta * NCKD)`` for [B, C] logits and [B] targets (scalar).

    T^2 compensates the 1/T^2 scale of the soft-target gradients (Hinton et al.), as in the paper.
    No warm-up here: multiply by the warm-up factor in the method.
    """
    t = dkd_terms(student_logits, teacher_logits, targets, temperature=temperature)
    return temperature**2 * (alpha * t["tckd"] + beta * t["nckd"])
