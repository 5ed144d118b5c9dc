"""An exponential moving average of a model's weights (``train.ema_decay``).

After every optimizer step (the step's ``after_update`` seam) each floating-point parameter and
buffer ``s`` of the shadow copy moves toward the live tensor ``t``::

    d_u = min(decay, (1 + u) / (10 + u))        u = updates before this one (warm-up)
    s  <- d_u * s + (1 - d_u) * t               (integer buffers, e.g. BN's counter: s <- t)

The warm-up lets the average follow the fast-changing early weights (``d_0 = 0.1``) and
reaches ``decay`` after about ``10 / (1 - decay)`` updates. The average lives beside the model
(no copy of the module, so its hooks and input normalisation stay those of the model): for
evaluation and export :meth:`EMA.swapped` copies it into the model and restores the trained
weights exactly afterwards. Under DDP every rank updates its own copy from the same
(all-reduced) parameters; the state is one checkpoint entry (:meth:`state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """The moving average of ``module``'s parameters and buffers (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.module, self.decay, self.updates = module, float(decay), 0
        self.live = [*module.parameters(), *module.buffers()]
        self.shadow = [t.detach().clone() for t in self.live]
        self._float = [i for i, t in enumerate(self.live) if t.is_floating_point()]

    def current_decay(self) -> float:
        """The decay the next update uses (with the warm-up)."""
        u = self.updates
        return min(self.decay, (1.0 + u) / (10.0 + u))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        self.updates += 1
        shadow = [self.shadow[i] for i in self._float]
        live = [self.live[i].detach() for i in self._float]
        if shadow:
            torch._foreach_lerp_(shadow, live, 1.0 - d)  # s + (1 - d) (t - s)
        for s, t in zip(self.shadow, self.live):
            if not t.is_floating_point():
                s.copy_(t)

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """The module with the averaged weights inside the block, its own weights after."""
        with torch.no_grad():
            saved = [t.detach().clone() for t in self.live]
            for t, s in zip(self.live, self.shadow):
                t.copy_(s)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for t, s in zip(self.live, saved):
                    t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["shadow"]) != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(sd['shadow'])} tensors, the model {len(self.shadow)}"
            )
        with torch.no_grad():
            for s, t in zip(self.shadow, sd["shadow"]):
                s.copy_(t)
        self.updates = int(sd["updates"])
