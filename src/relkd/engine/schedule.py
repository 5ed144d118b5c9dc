"""Learning-rate schedules as a per-iteration multiplier (warm-up + multistep/cosine/onecycle)."""

from __future__ import annotations

import math


def lr_factor(
    step: int,
    steps_per_epoch: int,
    epochs: int,
    *,
    name: str = "multistep",
    milestones: list[int] | tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
    pct_start: float = 0.3,
) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps (step 0 = first step).

    multistep: ``gamma ** (#milestones <= epoch)`` with the epoch counted in whole epochs, as the
    CRD protocol's per-epoch MultiStepLR. cosine: from 1 to ``min_lr_ratio`` over all steps.
    onecycle: linear rise to 1 over ``pct_start`` of the steps from 1/25, cosine fall to
    ``min_lr_ratio`` (torch's OneCycleLR shape with ``anneal_strategy='cos'``, per iteration as in
    the CORSD recipe). A linear warm-up over ``warmup_epochs`` multiplies any of them.
    """
    total = max(1, steps_per_epoch * epochs)
    epoch_f = step / max(1, steps_per_epoch)
    if name == "multistep":
        f = gamma ** sum(1 for m in milestones if int(epoch_f) >= m)
    elif name == "cosine":
        t = min(1.0, step / total)
        f = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif name == "onecycle":
        up = max(1, int(pct_start * total))
        start = 1 / 25
        if step < up:
            f = start + (1 - start) * step / up
        else:
            t = min(1.0, (step - up) / max(1, total - up))
            f = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif name == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {name!r}; valid: multistep, cosine, onecycle, constant")
    if warmup_epochs > 0 and epoch_f < warmup_epochs:
        f *= (step + 1) / (warmup_epochs * steps_per_epoch)
    return f
