"""The Distiller: student + the method's trainable extras. The only module DDP wraps."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.methods.base import Method
from relkd.models.base import FeatureTap, ModelOutput


class Distiller(nn.Module):
    """``forward(images, targets, teacher_out, **extras) -> (logits [B, C], terms)``.

    ``terms`` maps names to already-weighted scalar losses; the engine sums them. CE with the
    labels is added here as the term ``"ce"`` when ``ce_weight > 0``.
    """

    def __init__(self, student: nn.Module, method: Method, ce_weight: float) -> None:
        super().__init__()
        self.student = student
        self.method = method
        self.ce_weight = float(ce_weight)
        self.tap = FeatureTap(student, method.student_taps())

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_out: ModelOutput | None = None,
        **extras: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.tap(images)
        terms: dict[str, torch.Tensor] = {}
        # No CE during a method's pre-training phase (e.g. FitNet's hint stage).
        if self.ce_weight > 0 and self.method.phase == "main":
            # fp32 cross-entropy under autocast (log-softmax precision).
            terms["ce"] = self.ce_weight * F.cross_entropy(out.logits.float(), targets)
        terms.update(self.method(out, teacher_out, targets, **extras))
        return out.logits, terms
