"""Learning-rate (and momentum) schedules as pure functions of the optimizer step.

Each schedule equals its ``torch.optim.lr_scheduler`` counterpart stepped once per iteration
(``tests/engine/test_schedule.py`` checks every step against torch):

- ``multistep``: ``MultiStepLR`` stepped per epoch (the CRD protocol's recipe);
- ``cosine``: ``CosineAnnealingLR(T_max=all steps, eta_min=min_lr)``;
- ``onecycle``: ``OneCycleLR(anneal_strategy="cos")`` including its momentum cycle (SGD momentum
  or AdamW's beta1 go ``max_momentum -> base_momentum -> max_momentum``);
- ``constant``: the base lr;
- ``warmup_epochs``: ``LinearLR(start_factor=1/W, total_iters=W-1)`` over the first ``W`` steps,
  multiplied onto any of them (as ``ChainedScheduler`` composes it).

Being a function of the step alone (torch's are stateful), a resumed run continues exactly: the
optimizer step counter is all the state there is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from relkd.registry import RelkdError

SCHEDULES = ("multistep", "cosine", "onecycle", "constant")


def _cos(start: float, end: float, pct: float) -> float:
    # torch's OneCycleLR._anneal_func for anneal_strategy="cos".
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The lr (and, for onecycle, momentum) of every optimizer step of a run. Built by keyword
    (``Schedule(name="cosine", base_lr=0.1, steps_per_epoch=390, epochs=240)``).

    Args:
        name: ``multistep | cosine | onecycle | constant``.
        base_lr: the peak / starting lr (onecycle's ``max_lr``).
        steps_per_epoch, epochs: the run's length; onecycle and cosine span all steps.
        milestones, gamma: multistep (epochs at which the lr is multiplied by ``gamma``).
        warmup_epochs: linear warm-up length in epochs (0: none).
        min_lr: cosine's floor (``eta_min``).
        pct_start, div_factor, final_div_factor: onecycle, as torch (start lr
            ``base_lr / div_factor``, final lr ``start / final_div_factor``).
        cycle_momentum, base_momentum, max_momentum: onecycle's momentum cycle, as torch.
    """

    name: str
    base_lr: float
    steps_per_epoch: int
    epochs: int
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise RelkdError(
                f"schedule.name={self.name!r} is unknown; valid: {', '.join(SCHEDULES)}"
            )
        if self.name == "onecycle" and self.min_lr:
            raise RelkdError(
                f"schedule.min_lr={self.min_lr} applies to cosine only; onecycle ends at "
                "lr / (div_factor * final_div_factor) as torch's OneCycleLR (set those instead)"
            )

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)

    def _onecycle(self, step: int) -> tuple[float, float]:
        # torch's OneCycleLR.get_lr with two phases; the phase boundaries are floats there too.
        total = self.total_steps
        start = self.base_lr / self.div_factor
        final = start / self.final_div_factor
        phases = (
            (float(self.pct_start * total) - 1, start, self.base_lr, self.max_momentum, self.base_momentum),
            (float(total - 1), self.base_lr, final, self.base_momentum, self.max_momentum),
        )  # fmt: skip
        s = min(step, total - 1)
        begin = 0.0
        for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
            if s <= end or i == len(phases) - 1:
                pct = (s - begin) / (end - begin) if end != begin else 1.0
                return _cos(lr0, lr1, pct), _cos(m0, m1, pct)
            begin = end
        raise AssertionError("unreachable")

    def lr(self, step: int) -> float:
        """The lr of optimizer step ``step`` (0 = the first step)."""
        spe = max(1, self.steps_per_epoch)
        if self.name == "multistep":
            epoch = step // spe
            lr = self.base_lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        elif self.name == "cosine":
            t = min(1.0, step / self.total_steps)
            lr = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        elif self.name == "onecycle":
            lr = self._onecycle(step)[0]
        else:
            lr = self.base_lr
        warm = self.warmup_epochs * spe
        if warm > 0 and step < warm:
            lr *= (step + 1) / warm
        return lr

    def momentum(self, step: int) -> float | None:
        """onecycle's momentum (SGD) / beta1 (AdamW) at ``step``; None: leave the optimizer's."""
        if self.name != "onecycle" or not self.cycle_momentum:
            return None
        return self._onecycle(step)[1]

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every param group's lr (and cycled momentum) for optimizer step ``step``."""
        lr, m = self.lr(step), self.momentum(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
            if m is not None:
                if "betas" in g:
                    g["betas"] = (m, *tuple(g["betas"])[1:])
                else:
                    g["momentum"] = m


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
    """Multiplier of the base lr after ``step`` optimizer steps: :meth:`Schedule.lr` at lr 1."""
    return Schedule(
        name=name, base_lr=1.0, steps_per_epoch=steps_per_epoch, epochs=epochs,
        milestones=tuple(milestones), gamma=gamma, warmup_epochs=warmup_epochs,
        min_lr=0.0 if name == "onecycle" else min_lr_ratio, pct_start=pct_start,
    ).lr(step)  # fmt: skip
