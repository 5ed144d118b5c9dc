"""Classic knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", arXiv 1503.02531)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)) * T^2, averaged over the batch.

    Args:
        student_logits: [B, C].
        teacher_logits: [B, C] (no gradient is taken through them).
        temperature: T > 0.

    Returns:
        scalar tensor (fp32).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # fp32 even under autocast: log-softmax of bf16 logits loses the small probabilities.
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    # "batchmean" is the true KL per sample; "mean" would also divide by C.
    # T^2 keeps the gradient magnitude independent of T (Hinton et al., section 2).
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
