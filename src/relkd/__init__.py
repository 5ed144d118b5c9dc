"""relkd: relational knowledge distillation for PyTorch (CORSD, RRD, CLKD, CMKD and baselines)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from relkd import losses
from relkd._version import __version__ as __version__  # the one place it is set
from relkd.api import Distillation, DistillationOutput
from relkd.deploy.export import export_onnx
from relkd.deploy.profile import profile_model, profile_run
from relkd.deploy.runs import eval_onnx, export_run
from relkd.methods import Method, MethodContext, list_methods, register_method
from relkd.models import FeatureTap, ModelOutput, create_model, list_models, load_checkpoint
from relkd.models.registry import register_model
from relkd.registry import RelkdError


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

    ``config`` is a YAML path, a packaged config name (``"cifar100/kd/resnet32x4_resnet8x4"``,
    see ``relkd configs list``), a dict or a :class:`relkd.config.Config`; ``teacher`` /
    ``student`` may be any ``nn.Module`` (features tapped by module name). Returns a dict with at
    least ``best_top1``, ``last_top1`` and ``run_dir``.

    Raises:
        RelkdError: a bad config, checked most basic first (method name and arguments, model
            names, the teacher a method needs, checkpoint files; then data and models).
    """
    from relkd.engine import fit

    if isinstance(config, (str, os.PathLike)):
        from relkd.resources import resolve

        config = resolve(config)
    # fit loads the config once and runs every check once (relkd.preflight, in its order).
    return fit(
        config, teacher=teacher, student=student, resume=resume, overrides=overrides, quiet=quiet,
        allow_change=allow_change,
    )  # fmt: skip


__all__ = [
    "Distillation",
    "DistillationOutput",
    "FeatureTap",
    "Method",
    "MethodContext",
    "ModelOutput",
    "RelkdError",
    "create_model",
    "eval_onnx",
    "export_onnx",
    "export_run",
    "list_methods",
    "list_models",
    "load_checkpoint",
    "losses",
    "profile_model",
    "profile_run",
    "register_method",
    "register_model",
    "train",
]
