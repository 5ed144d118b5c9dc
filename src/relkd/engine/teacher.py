"""The frozen teacher: eval mode, no gradients, never wrapped in DDP, never checkpointed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from relkd.models.base import FeatureTap, ModelOutput


class Teacher:
    """Frozen by construction. Deliberately *not* an ``nn.Module``: it cannot end up in the
    Distiller's parameters, state dict, optimizer or DDP wrapper by accident.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str] = ()) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tap = FeatureTap(self.model, taps)

    def to(self, *args, **kwargs) -> Teacher:
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> ModelOutput:
        # eval() again: a user's model.train() call elsewhere must not switch BN to batch stats.
        self.model.eval()
        return self.tap(images)
