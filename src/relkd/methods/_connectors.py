"""Shared pieces of the feature-based baselines: stage selection and the small trainable
connectors (regressors) between student and teacher feature maps.

Connectors are built from ``MethodContext`` shapes (``(C, H, W)`` without the batch dim), so a
method knows every size at build time and fails there, naming the stages, when a pair cannot
be connected.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from relkd.methods.base import MethodContext
from relkd.models.base import ModelOutput
from relkd.registry import RelkdError


def require_teacher(teacher: ModelOutput | None, method: str) -> ModelOutput:
    if teacher is None:
        raise RelkdError(f"method {method!r} needs teacher outputs")
    return teacher


def _names(ctx: MethodContext, side: str, method: str) -> list[str]:
    stages = ctx.student_stages if side == "student" else ctx.teacher_stages
    if not stages:
        raise RelkdError(
            f"method {method!r} reads intermediate feature maps, but the {side} declares no "
            "stages (feature_info); use a zoo model or give the model a `feature_info` list"
        )
    return [s.name for s in stages]


def _pick(names: list[str], index: int | str, side: str, method: str) -> str:
    if isinstance(index, str):  # a stage given by its module name
        if index not in names:
            raise RelkdError(
                f"method {method!r}: {index!r} is not a {side} stage; the {side} has stages "
                f"{names} (give a name or an index)"
            )
        return index
    if not -len(names) <= index < len(names):
        raise RelkdError(
            f"method {method!r}: {side} stage index {index} is out of range; the {side} has "
            f"{len(names)} stages {names} (negative indices count from the deepest)"
        )
    return names[index]


def stage_pairs(
    ctx: MethodContext,
    method: str,
    stages: Sequence[int | str] | None = None,
    teacher_stages: Sequence[int | str] | None = None,
) -> list[tuple[str, str]]:
    """(student stage name, teacher stage name) pairs, shallow to deep.

    ``stages`` indexes the student's stages (``ctx.student_stages``) and ``teacher_stages`` the
    teacher's (default: the same indices); an entry may also be a stage's module name. Default: every stage, paired by position from the
    shallowest; with unequal stage counts the extra deep stages of the deeper model are left
    out (the CRD benchmark code zips the two lists the same way).
    """
    s_names, t_names = _names(ctx, "student", method), _names(ctx, "teacher", method)
    if stages is None:
        if teacher_stages is not None:
            raise RelkdError(f"method {method!r}: teacher_stages needs stages (student indices)")
        stages = list(range(min(len(s_names), len(t_names))))
    # Default teacher stages: the same positions (a student stage given by name: its index).
    t_idx = (
        [s_names.index(i) if isinstance(i, str) and i in s_names else i for i in stages]
        if teacher_stages is None
        else list(teacher_stages)
    )
    if not stages or len(t_idx) != len(stages):
        raise RelkdError(
            f"method {method!r}: stages {list(stages)} and teacher_stages {t_idx} must be "
            "non-empty lists of the same length"
        )
    return [
        (_pick(s_names, i, "student", method), _pick(t_names, j, "teacher", method))
        for i, j in zip(stages, t_idx)
    ]


def stage_pair(
    ctx: MethodContext, method: str, stage: int | str, teacher_stage: int | str | None = None
) -> tuple[str, str]:
    """One (student, teacher) stage pair; ``teacher_stage`` defaults to ``stage``."""
    return stage_pairs(ctx, method, [stage], None if teacher_stage is None else [teacher_stage])[0]


def map_shape(ctx: MethodContext, side: str, name: str, method: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of a tapped stage; a clear error for non-spatial features."""
    shapes = ctx.student_shapes if side == "student" else ctx.teacher_shapes
    shape = tuple(shapes.get(name, ()))
    if len(shape) != 3:
        raise RelkdError(
            f"method {method!r} needs [C, H, W] feature maps, but the {side}'s stage {name!r} "
            f"has shape {list(shape) or 'unknown'} (known taps: {sorted(shapes)})"
        )
    return shape  # type: ignore[return-value]


class ConvReg(nn.Sequential):
    """Convolutional regressor: student map (C_s, H_s, W_s) -> teacher map (C_t, H_t, W_t).

    The spatial rule follows the CRD benchmark's FitNet regressor: equal size -> 1x1 conv;
    twice as large -> 3x3 stride-2 conv; half as large -> 4x4 stride-2 transposed conv; larger
    -> a valid conv of kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``. Smaller by another factor
    (not in that code) -> 1x1 conv then bilinear upsampling. Then BN, then ReLU if ``relu``.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True) -> None:
        (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
        conv: nn.Module
        if (hs, ws) == (2 * ht, 2 * wt):
            conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            conv = nn.Sequential(
                nn.Conv2d(cs, ct, 1),
                nn.Upsample(size=(ht, wt), mode="bilinear", align_corners=False),
            )
        layers = [conv, nn.BatchNorm2d(ct)] + ([nn.ReLU()] if relu else [])
        super().__init__(*layers)


def conv_stack(channels: Sequence[int], bn: bool, transpose: bool = False) -> nn.Sequential:
    """3x3 same-size (transposed) convs ``channels[0] -> ... -> channels[-1]``, each followed by
    optional BN and LeakyReLU(0.1) (the FT paraphraser / translator building block)."""
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    for cin, cout in itertools.pairwise(channels):
        layers.append(conv(cin, cout, 3, stride=1, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def set_trainable(module: nn.Module, trainable: bool) -> None:
    """Freeze / unfreeze a part that trains only in some phases.

    The engine builds its optimizer once, before the first phase, from every parameter that
    requires grad then; a part trained only during a pre-training phase is therefore built
    trainable and frozen here afterwards. A frozen parameter keeps ``grad = None``, which
    SGD / AdamW skip entirely (no momentum, no weight decay), so it stays as trained.
    """
    for p in module.parameters():
        if p.requires_grad != trainable:
            p.requires_grad_(trainable)


def stage_feats(out: ModelOutput, names: Sequence[str]) -> list[torch.Tensor]:
    return [out.feats[n] for n in names]


class InitPhaseMixin:
    """The RepDistiller "init" stage shared by AB and FSP: ``init_epochs`` of pre-training with
    weight ``init_weight`` before the main phase (weight ``weight``); ``self.connectors`` are
    trainable exactly in the phases whose weight is non-zero. Mix into a :class:`Method`."""

    epoch_args: ClassVar[dict[str, str]] = {
        "init_epochs": "a pre-training phase of that many epochs runs before the run's own epochs"
    }
    init_epochs: int
    init_weight: float
    weight: float
    connectors: nn.Module

    def _weight_in(self, phase: str) -> float:
        if phase == "main":
            return self.weight
        return self.init_weight if phase == "init" and self.init_epochs else 0.0

    def _init_trainable(self) -> None:
        # Trainable at build time if any phase uses them (the optimizer is built from that).
        set_trainable(self.connectors, self._weight_in("init") > 0 or self._weight_in("main") > 0)

    def phases(self) -> list[tuple[str, int]]:
        return [("init", self.init_epochs)] if self.init_epochs > 0 else []

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)  # type: ignore[misc]
        set_trainable(self.connectors, self._weight_in(phase) > 0)


class StagePairTaps:
    """``student_taps`` / ``teacher_taps`` from ``self.pairs`` (student stage, teacher stage),
    the shape every stage-matching method (AT, NST, VID, AB, FSP) shares. Mix into a Method."""

    pairs: list[tuple[str, str]]

    def student_taps(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def teacher_taps(self) -> list[str]:
        return [t for _, t in self.pairs]
