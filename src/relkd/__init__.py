"""relkd: relational knowledge distillation for PyTorch (CORSD, RRD, CLKD, CMKD and baselines)."""

from __future__ import annotations

from typing import Any

from torch import nn

from relkd import losses
from relkd.methods import list_methods
from relkd.models import FeatureTap, ModelOutput, create_model, list_models, load_checkpoint
from relkd.registry import RelkdError

__version__ = "0.1.0"


def train(
    config: Any,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    resume: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    quiet: bool = False,
    allow_change: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train a student as configured (see :func:`relkd.engine.fit`).

    ``config`` is a YAML path, a dict or a :class:`relkd.config.Config`; ``teacher`` /
    ``student`` may be any ``nn.Module`` (features tapped by module name). Returns a dict with at
    least ``best_top1``, ``last_top1`` and ``run_dir``.
    """
    from relkd.engine import fit

    return fit(
        config, teacher=teacher, student=student, resume=resume, overrides=overrides, quiet=quiet,
        allow_change=allow_change,
    )  # fmt: skip


__all__ = [
    "FeatureTap",
    "ModelOutput",
    "RelkdError",
    "create_model",
    "list_methods",
    "list_models",
    "load_checkpoint",
    "losses",
    "train",
]
