"""Variational information distillation (Ahn et al., "Variational Information Distillation for
Knowledge Transfer", CVPR 2019, arXiv 1904.05835) -- math only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relkd.losses._precision import fp32, no_autocast


def vid_log_scale_init(init_var: float = 5.0, eps: float = 1e-5) -> float:
    """The raw value whose softplus (+ ``eps``) is ``init_var``: the initial per-channel
    variance of the variational Gaussian (5 in the authors' code)."""
    return math.log(math.expm1(init_var - eps))


@no_autocast
def vid_loss(
    pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Negative log-likelihood of the teacher map under a per-channel Gaussian q(t | s).

    ``sigma_c^2 = softplus(log_scale_c) + eps`` (positive for any raw value) and the loss is
    ``mean( 0.5 * ((mu - t)^2 / sigma_c^2 + log sigma_c^2) )`` over all elements (the
    constant ``0.5 log 2 pi`` left out).

    Args:
        pred_mean: [B, C, H, W] regressor output mu(s).
        target: [B, C, H, W] teacher map (same shape).
        log_scale: [C] raw variance parameter.
    """
    if pred_mean.shape != target.shape or pred_mean.shape[1] != log_scale.numel():
        raise ValueError(
            f"vid: mean {list(pred_mean.shape)}, target {list(target.shape)} and log_scale "
            f"{list(log_scale.shape)} do not match"
        )
    var = (F.softplus(fp32(log_scale)) + eps).view(1, -1, *([1] * (pred_mean.ndim - 2)))
    err = (fp32(pred_mean) - fp32(target.detach())).pow(2)
    return (0.5 * (err / var + var.log())).mean()
