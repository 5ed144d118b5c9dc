"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation",
CVPR 2024, arXiv 2403.01427).

The paper replaces the shared temperature of logit distillation by a per-sample one: each
logit vector is z-scored before the usual ``softmax(z / T)`` with a small *base* temperature
(mostly 2 for KD on CIFAR-100 in the authors' runs, with the KD weight raised from 0.9 to 9). The
student then has to match the teacher's logit *relations*, not its logit range.
"""

from __future__ import annotations

import torch


def zscore_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``(z - mean(z)) / std(z)`` along the class dim, in fp32 (float64 kept).

    Args:
        z: [B, C] logits (C >= 2).
        eps: guards a constant logit vector (std 0): it maps to zeros.

    Returns:
        [B, C] fp32, each row with mean 0 and standard deviation ~1. ``std`` is the unbiased
        estimate (divides by C - 1), as ``torch.std`` in the authors' code; dividing by C
        instead would only change the result by the constant factor sqrt(C / (C - 1)).
    """
    z = z if z.dtype == torch.float64 else z.float()
    zc = z - z.mean(dim=-1, keepdim=True)
    # sqrt(var + eps^2) instead of the authors' std + eps: equal up to ~eps, but the gradient of
    # std is 0/0 for a constant row, this one is finite.
    return zc / torch.sqrt(zc.square().sum(dim=-1, keepdim=True) / (z.shape[-1] - 1) + eps**2)


def maybe_standardize(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    enabled: bool,
    base_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The switch every logit method shares: ``(z_s, z_t, T)`` unchanged when ``enabled`` is
    False, else both z-scored and ``T`` replaced by the base temperature."""
    if not enabled:
        return student_logits, teacher_logits, temperature
    return zscore_logits(student_logits), zscore_logits(teacher_logits), base_temperature
