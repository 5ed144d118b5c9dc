"""VID: variational information distillation (Ahn et al., "Variational Information
Distillation for Knowledge Transfer", CVPR 2019, arXiv 1904.05835)."""

from __future__ import annotations

import torch
from torch import nn

from relkd.losses.feature import match_spatial
from relkd.losses.vid import vid_log_scale_init, vid_loss
from relkd.methods._connectors import StagePairTaps, map_shape, require_teacher, stage_pairs
from relkd.methods.base import Method, MethodContext, register_method


class VIDRegressor(nn.Module):
    """mu(s): three bias-free 1x1 convs C_s -> C_t -> C_t -> C_t with ReLUs between, plus the
    per-channel raw variance ``log_scale`` [C_t] of q(t | s)."""

    def __init__(self, c_s: int, c_t: int, init_var: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((c_t,), vid_log_scale_init(init_var, eps)))


@register_method("vid")
class VID(StagePairTaps, Method):
    """``weight * sum_stages NLL(f_t | mu(f_s), sigma^2)`` with a trainable regressor and
    per-channel variance per stage pair (:func:`relkd.losses.vid.vid_loss`); the larger of the
    two maps is average-pooled to the smaller before the regressor.

    CRD protocol defaults (RepDistiller ``--distill vid -b 1``): weight 1, CE weight 1, no KD,
    every stage, hidden width = teacher channels, initial variance 5, eps 1e-5 (authors' code).

    Args:
        stages: student stage indices (default: all, paired by position with the teacher's).
        teacher_stages: teacher stage indices (default: ``stages``).
    """

    default_ce_weight = 1.0

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 1.0,
        init_var: float = 5.0,
        eps: float = 1e-5,
        stages: list[int] | None = None,
        teacher_stages: list[int] | None = None,
    ) -> None:
        super().__init__(ctx)
        self.weight, self.eps = weight, eps
        self.pairs = stage_pairs(ctx, "vid", stages, teacher_stages)
        self.regressors = nn.ModuleList(
            VIDRegressor(
                map_shape(ctx, "student", s, "vid")[0],
                map_shape(ctx, "teacher", t, "vid")[0],
                init_var,
                eps,
            )
            for s, t in self.pairs
        )

    def forward(self, student, teacher, targets, **extras):
        teacher = require_teacher(teacher, "vid")
        if self.phase != "main":
            return {}  # another part's pre-training phase
        loss = 0.0
        for (s, t), reg in zip(self.pairs, self.regressors):
            f_s, f_t = match_spatial(student.feats[s], teacher.feats[t].detach())
            loss = loss + vid_loss(reg.mean(f_s), f_t, reg.log_scale, self.eps)
        return {"vid": self.weight * loss}
