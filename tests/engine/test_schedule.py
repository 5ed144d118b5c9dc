"""relkd's schedules equal torch.optim.lr_scheduler's, step by step (lr and momentum)."""

from __future__ import annotations

import math

import pytest
import torch

from relkd.engine.schedule import Schedule, lr_factor
from relkd.registry import RelkdError

SPE, EPOCHS, LR = 37, 11, 0.05  # 407 steps; a step count that divides nothing evenly


def _torch_trace(make, steps: int, *, per_epoch: bool = False, adam: bool = False):
    """(lr, momentum) used by each optimizer step under a torch scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (
        torch.optim.AdamW([p], lr=LR, betas=(0.9, 0.999))
        if adam
        else torch.optim.SGD([p], lr=LR, momentum=0.9)
    )
    sched = make(opt)
    out = []
    for i in range(steps):
        g = opt.param_groups[0]
        out.append((g["lr"], g["betas"][0] if adam else g["momentum"]))
        opt.step()
        if not per_epoch or (i + 1) % SPE == 0:
            sched.step()
    return out


def _ours(s: Schedule, steps: int, adam: bool = False):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (
        torch.optim.AdamW([p], lr=LR, betas=(0.9, 0.999))
        if adam
        else torch.optim.SGD([p], lr=LR, momentum=0.9)
    )
    out = []
    for i in range(steps):
        s.apply(opt, i)
        g = opt.param_groups[0]
        out.append((g["lr"], g["betas"][0] if adam else g["momentum"]))
    return out


def _close(a, b, rel=1e-9):
    assert len(a) == len(b)
    for i, ((la, ma), (lb, mb)) in enumerate(zip(a, b)):
        assert la == pytest.approx(lb, rel=rel, abs=1e-12), f"lr differs at step {i}: {la} vs {lb}"
        assert ma == pytest.approx(mb, rel=rel, abs=1e-12), f"momentum differs at step {i}"


@pytest.mark.parametrize("adam", [False, True])
@pytest.mark.parametrize("pct", [0.3, 0.25, 0.5])
def test_onecycle_equals_torch_including_momentum(pct: float, adam: bool) -> None:
    n = SPE * EPOCHS
    ref = _torch_trace(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=LR, total_steps=n, pct_start=pct, anneal_strategy="cos"
        ),
        n,
        adam=adam,
    )
    ours = _ours(
        Schedule(name="onecycle", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS, pct_start=pct),
        n,
        adam=adam,
    )
    _close(ours, ref)
    # The cycle is real: momentum goes 0.95 -> 0.85 -> 0.95, and the warm-up is a cosine.
    moms = [m for _, m in ours]
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85, abs=1e-4)
    assert moms[-1] == pytest.approx(0.95)


def test_onecycle_without_momentum_cycle_keeps_optimizer_momentum() -> None:
    n = SPE * EPOCHS
    ours = _ours(
        Schedule(
            name="onecycle", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS, cycle_momentum=False
        ),
        n,
    )
    assert {m for _, m in ours} == {0.9}


def test_cosine_equals_torch() -> None:
    n = SPE * EPOCHS
    for eta in (0.0, 1e-3):
        ref = _torch_trace(
            lambda o, eta=eta: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n, eta_min=eta),
            n,
        )
        ours = _ours(
            Schedule(name="cosine", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS, min_lr=eta), n
        )
        _close([(lr, 0.9) for lr, _ in ours], [(lr, 0.9) for lr, _ in ref], rel=1e-7)


def test_multistep_equals_torch_per_epoch() -> None:
    n = SPE * EPOCHS
    ref = _torch_trace(
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 7, 9], gamma=0.1),
        n,
        per_epoch=True,
    )
    ours = _ours(
        Schedule(
            name="multistep",
            base_lr=LR,
            steps_per_epoch=SPE,
            epochs=EPOCHS,
            milestones=(3, 7, 9),
            gamma=0.1,
        ),
        n,
    )
    _close(ours, ref, rel=1e-12)


def test_warmup_equals_linearlr_chained_with_multistep() -> None:
    n, warm_epochs = SPE * EPOCHS, 2
    w = warm_epochs * SPE
    ref = _torch_trace(
        lambda o: torch.optim.lr_scheduler.ChainedScheduler(
            [
                torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / w, total_iters=w - 1),
                # per-epoch milestones expressed in steps: the same lr at every step
                torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5 * SPE, 8 * SPE], gamma=0.2),
            ]
        ),
        n,
    )
    ours = _ours(
        Schedule(
            name="multistep",
            base_lr=LR,
            steps_per_epoch=SPE,
            epochs=EPOCHS,
            milestones=(5, 8),
            gamma=0.2,
            warmup_epochs=warm_epochs,
        ),
        n,
    )
    _close(ours, ref, rel=1e-9)
    assert ours[0][0] == pytest.approx(LR / w) and ours[w][0] == pytest.approx(LR)


def test_constant_and_lr_factor_compat() -> None:
    s = Schedule(name="constant", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS)
    assert {s.lr(i) for i in range(0, 400, 7)} == {LR}
    assert lr_factor(10, SPE, EPOCHS, name="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 10 / (SPE * EPOCHS)))
    )


def test_resume_is_exact_schedule_is_a_function_of_the_step() -> None:
    s = Schedule(name="onecycle", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS)
    full = _ours(s, SPE * EPOCHS)
    # A "resumed" optimizer whose groups hold other values gets the same lr / momentum.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=123.0, momentum=0.1)
    for i in range(200, SPE * EPOCHS):
        s.apply(opt, i)
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == full[i]


def test_bad_schedule_values_fail_loudly() -> None:
    with pytest.raises(RelkdError, match="warm"):
        Schedule(name="warm", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS)
    with pytest.raises(RelkdError, match="min_lr"):
        Schedule(name="onecycle", base_lr=LR, steps_per_epoch=SPE, epochs=EPOCHS, min_lr=1e-4)
