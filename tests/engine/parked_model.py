"""A model that parks its process at the first training step (tests name it by import path,
``tests.engine.parked_model:parked_net``).

Its first forward pass in training mode with gradients writes the process id to the file named
by ``$RELKD_TEST_PARKED`` and then sleeps: the process has opened its run folder (claim taken,
``run.json`` written) and writes nothing while parked, so a test can act on that state without
guessing how long anything takes. Without the variable it is a plain linear classifier.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

ENV = "RELKD_TEST_PARKED"


class Parked(nn.Module):
    """[B, C, 28, 28] -> [B, classes] logits (one linear layer)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(in_chans * 28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        marker = os.environ.get(ENV)
        if marker and self.training and torch.is_grad_enabled():
            tmp = Path(f"{marker}.tmp")
            tmp.write_text(str(os.getpid()))
            tmp.replace(marker)  # appears whole
            time.sleep(3600)  # until the test kills the process
        return self.fc(x.flatten(1))


def parked_net(num_classes: int = 10, in_chans: int = 1) -> Parked:
    return Parked(num_classes, in_chans)
