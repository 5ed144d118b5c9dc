"""The method interface, the method registry and composition of methods ("kd+cmkd").

A method is an ``nn.Module`` holding its trainable extras (projections, connectors, queues as
buffers) and computing already-weighted loss terms from the model outputs. The engine sums the
terms, logs each, and calls backward; no method calls backward and the engine has no
method-specific branch. Per-sample extras (sample index, triplet structure) reach a method as
keyword arguments of :meth:`Method.forward`.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from relkd.models.base import FeatureInfo, ModelOutput
from relkd.registry import Registry, RelkdError

# check: what an import path must name (check_method, below: resolved when called)
METHODS: Registry[type[Method]] = Registry("method", check=lambda o, p: check_method(o, p))


@dataclass
class MethodContext:
    """What a method may know about the models when it builds its extras.

    ``student_shapes`` / ``teacher_shapes`` map every tappable name (stage names from
    ``feature_info`` and ``"pooled"``) to the feature shape without the batch dim, measured by a
    dummy forward pass.
    """

    num_classes: int
    student_stages: list[FeatureInfo] = field(default_factory=list)
    teacher_stages: list[FeatureInfo] = field(default_factory=list)
    student_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    teacher_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: size of the (rank-global) training set, for per-sample memories (CRD).
    num_train_samples: int = 0
    #: the run's seed (for data-side draws that must not depend on the rank, e.g. triplets).
    seed: int = 0


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement :meth:`forward`."""

    #: registry key (lowercase), set by :func:`register_method`.
    name: ClassVar[str] = ""
    #: whether a teacher is required; CE and self-distillation methods say False.
    requires_teacher: ClassVar[bool] = True
    #: CE weight used when the config leaves ``method.ce_weight`` unset.
    default_ce_weight: ClassVar[float] = 1.0
    #: keyword overrides applied when the method is a part of a composition ("rrd+kd").
    composite_defaults: ClassVar[dict[str, Any]] = {}
    #: per-sample extras the data pipeline must deliver, e.g. ("index",).
    batch_extras: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`wrap_train_dataset` changes the training set (e.g. CORSD's triplets). The
    #: engine's planner (:mod:`relkd.engine.plan`) reads this declaration, never the code: a
    #: subclass overriding the hook without declaring it is refused at registration.
    wraps_train_set: ClassVar[bool] = False
    #: whether :meth:`prepare_batch` changes the batch (its size or images), which rules out
    #: teacher outputs looked up per sample (exact cache, replay). Checked like the above.
    changes_batch: ClassVar[bool] = False
    #: arguments that are lengths in epochs of the method's own schedule, with what they do
    #: (``relkd.methods.spec.MethodSpec.schedule_notes`` says so when one is longer than the
    #: run), e.g. DKD's loss warm-up, a pre-training phase.
    epoch_args: ClassVar[dict[str, str]] = {}

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.epoch = 0  # 0-based epoch of the main schedule, set by the engine (set_epoch)
        self.phase = "main"  # current phase, set by the engine (set_phase)

    def student_taps(self) -> list[str]:
        """Tap names of the student this method reads from ``ModelOutput.feats``."""
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def phases(self) -> list[tuple[str, int]]:
        """Pre-training phases run before the main schedule, as ``[(name, epochs), ...]``.

        The general multi-stage mechanism (FitNet's hint stage, AB / FT / FSP initialisation):
        during a phase the engine calls ``set_phase(name)``, trains with the base lr, skips CE
        and evaluation, and the method returns that phase's terms. Default: no phase.
        """
        return []

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def wrap_train_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        """Hook for methods that need a different training set structure (e.g. triplets)."""
        return dataset

    def prepare_batch(
        self, images: torch.Tensor, targets: torch.Tensor, extras: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Hook run before the forward passes (e.g. flatten triplets into one batch)."""
        return images, targets, extras

    def forward(
        self,
        student: ModelOutput,
        teacher: ModelOutput | None,
        targets: torch.Tensor,
        **extras: Any,
    ) -> dict[str, torch.Tensor]:
        """Return the method's already-weighted loss terms (scalars), CE excluded."""
        raise NotImplementedError


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (lowercase)."""

    def deco(cls: type[Method]) -> type[Method]:
        if name != name.lower() or "+" in name:
            raise ValueError(f"method names are lowercase without '+', got {name!r}")
        check_declarations(cls)
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


#: hook -> the class attribute that must declare an override of it (see :class:`Method`).
DECLARED_HOOKS: dict[str, str] = {
    "wrap_train_dataset": "wraps_train_set",
    "prepare_batch": "changes_batch",
}


def check_declarations(cls: type[Method]) -> None:
    """Refuse a method class that overrides a data hook without declaring it: the planner
    trusts the declarations (``wraps_train_set``, ``changes_batch``), so an undeclared override
    would silently get a pipeline or teacher source that ignores the hook."""
    for hook, flag in DECLARED_HOOKS.items():
        if getattr(cls, hook) is not getattr(Method, hook) and not getattr(cls, flag):
            raise TypeError(
                f"method class {cls.__name__} overrides {hook}() but does not declare "
                f"{flag} = True (the engine plans the data pipeline from that declaration)"
            )


def list_methods() -> list[str]:
    return METHODS.names()


def check_type(method: str, key: str, value: Any, annotation: Any) -> None:
    """Loud failure for obviously wrong argument types (the config is YAML, so be forgiving
    only where YAML is: ints for floats)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else ()
    allowed = options or (annotation,)
    for a in allowed:
        a = typing.get_origin(a) or a
        if a is Any or (a is type(None) and value is None):
            return
        if a is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if (
            isinstance(a, type)
            and isinstance(value, a)
            and not (a is int and isinstance(value, bool))
        ):
            return
        if typing.get_origin(a) is typing.Literal or a is typing.Literal:
            return
    names = ", ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise RelkdError(f"method {method!r}: argument {key}={value!r} should be of type {names}")


def build_part(name: str, ctx: MethodContext, args: Mapping[str, Any]) -> Method:
    """Construct the registered method ``name`` with checked ``args`` (see
    :meth:`relkd.methods.spec.MethodSpec.check`); a method's own argument check (a
    ``ValueError`` / ``TypeError`` of its ``__init__``) becomes one :class:`RelkdError` line."""
    cls = METHODS.get(name)
    try:
        return cls(ctx, **dict(args))
    except RelkdError:  # already one line that names the method: do not wrap it again
        raise
    except (ValueError, TypeError) as e:  # a method's own argument checks: one line, exit 2
        raise RelkdError(f"method {name!r}: {str(e).splitlines()[0] if str(e) else e!r}") from e


# Sign rules for numeric method arguments, by name: scales and sizes must be > 0, weights and
# other coefficients >= 0 (a negative weight turns a loss into gradient ascent). Stage indices
# (``stage``, ``*_stage``) may be negative and are not listed.
_POSITIVE_ARGS = ("temperature", "tau", "p", "eps", "rank_eps", "init_var", "nce_t", "dim",
                  "queue_size", "nce_k", "order")  # fmt: skip
_NONNEGATIVE_ARGS = ("alpha", "beta", "gamma", "mu", "nu", "margin", "rate", "momentum",
                     "init_epochs", "warmup")  # fmt: skip


def check_value(method: str, key: str, value: Any) -> None:
    """The sign rules of numeric method arguments (finite; scales > 0; weights >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise RelkdError(f"method {method!r}: {key}={value} must be a finite number")
    if (key in _POSITIVE_ARGS or key.startswith(("temperature", "tau"))) and value <= 0:
        raise RelkdError(f"method {method!r}: {key}={value} must be > 0")
    if (key in _NONNEGATIVE_ARGS or "weight" in key or key.startswith("w_")) and value < 0:
        raise RelkdError(f"method {method!r}: {key}={value} must be >= 0")


class Composite(Method):
    """Sum of several methods' terms ("rrd+kd", "kd+cmkd"): one CE, each part's own terms.

    Term names stay as the parts return them; a clash is prefixed with the part's name.
    """

    def __init__(self, ctx: MethodContext, parts: dict[str, Method]) -> None:
        super().__init__(ctx)
        # nn.ModuleDict keys may not hold "." (an import path part, "mypkg.methods:MyKD")
        self.parts = nn.ModuleDict({k.replace(".", "_"): v for k, v in parts.items()})
        # Instance attributes shadow the class defaults: a composition needs what any part needs.
        self.requires_teacher = any(p.requires_teacher for p in parts.values())  # type: ignore[misc]
        self.batch_extras = tuple(sorted({e for p in parts.values() for e in p.batch_extras}))  # type: ignore[misc]
        self.wraps_train_set = any(p.wraps_train_set for p in parts.values())  # type: ignore[misc]
        self.changes_batch = any(p.changes_batch for p in parts.values())  # type: ignore[misc]

    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(t for p in self.parts.values() for t in p.student_taps()))

    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t for p in self.parts.values() for t in p.teacher_taps()))

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for p in self.parts.values():
            p.set_epoch(epoch)

    def phases(self) -> list[tuple[str, int]]:
        return [ph for p in self.parts.values() for ph in p.phases()]

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)
        for p in self.parts.values():
            p.set_phase(phase)

    def wrap_train_dataset(self, dataset):
        for p in self.parts.values():
            dataset = p.wrap_train_dataset(dataset)
        return dataset

    def prepare_batch(self, images, targets, extras):
        for p in self.parts.values():
            images, targets, extras = p.prepare_batch(images, targets, extras)
        return images, targets, extras

    def forward(self, student, teacher, targets, **extras):
        terms: dict[str, torch.Tensor] = {}
        for pname, part in self.parts.items():
            # A pre-training phase belongs to the parts that declare it ("ab+kd": no KD in
            # AB's init phase, as in RepDistiller).
            if self.phase != "main" and self.phase not in {n for n, _ in part.phases()}:
                continue
            for k, v in part(student, teacher, targets, **extras).items():
                terms[f"{pname}/{k}" if k in terms else k] = v
        return terms


def check_method(obj: Any, path: str) -> Any:
    """``obj`` (named by the import path ``path``) if it is a :class:`Method` subclass whose
    data hooks are declared; else one :class:`RelkdError` line naming the path."""
    from relkd.plugins import not_a

    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise not_a("method", path, obj)
    try:
        check_declarations(obj)
    except TypeError as e:
        raise RelkdError(f"method {path!r}: {e}") from None
    return obj
