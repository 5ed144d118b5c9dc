"""A method as a config names it: ``"rrd+kd"`` with its arguments, parsed and checked once.

:class:`MethodSpec` is the one reading of a method spec. The CLI checks and :func:`relkd.train`
(through :mod:`relkd.preflight`), the engine's :func:`~relkd.methods.build_method`, the
benchmark suites, the report and ``relkd bench speed`` all parse through it, so the same mistake
gives the same message everywhere:

- the composition: parts distinct and non-empty, every part a registered method (an unknown
  name lists the close matches and the choices);
- the arguments: a mapping (keyed by part for a composition), every name one the part's
  ``__init__`` takes, of its annotated type, within the sign rules of
  :func:`relkd.methods.base.check_value`;
- what follows from the parts: whether a teacher is needed, the default CE weight, each part's
  effective arguments (a composition applies the part's ``composite_defaults`` first);
- :meth:`MethodSpec.schedule_notes`: the method's own schedules (a loss warm-up, a pre-training
  phase, declared by ``Method.epoch_args``) that do not fit the run's epochs.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relkd.methods.base import (
    METHODS,
    Composite,
    Method,
    MethodContext,
    build_part,
    check_type,
    check_value,
)
from relkd.registry import RelkdError


class MethodScheduleWarning(UserWarning):
    """A method's own schedule (a loss warm-up, a pre-training phase) is longer than the run."""


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method spec (build with :meth:`parse`).

    Attributes:
        name: the spec as written (``"rrd+kd"``).
        parts: the part names in order (one for a single method).
        classes: part name -> registered :class:`Method` class.
        given: part name -> the arguments the user gave for it.
    """

    name: str
    parts: tuple[str, ...]
    classes: Mapping[str, type[Method]]
    given: Mapping[str, Mapping[str, Any]]

    @staticmethod
    def split(name: str) -> tuple[str, ...]:
        """The part names of a spec as written (``"rrd + kd"`` -> ``("rrd", "kd")``), not
        looked up (for messages that list every unknown name at once)."""
        return tuple(p.strip() for p in str(name).split("+"))

    @classmethod
    def parse(cls, name: str, args: Mapping[str, Any] | None = None) -> MethodSpec:
        """Parse ``name`` and the ``args`` of a config's ``method`` section (argument names,
        types and values are checked by :meth:`check` / :meth:`argument_errors`).

        Raises:
            RelkdError: a malformed composition, an unknown part, args that are not a mapping
                or, for a composition, not keyed by part.
        """
        name = str(name)
        parts = cls.split(name)
        if len(parts) > 1 and (len(set(parts)) != len(parts) or not all(parts)):
            raise RelkdError(
                f"bad method composition {name!r}: parts must be distinct and non-empty"
            )
        classes = {p: METHODS.get(p) for p in parts}  # unknown: close matches, all choices
        if args is not None and not isinstance(args, Mapping):
            raise RelkdError(f"method {name!r}: args must be a mapping")
        args = dict(args or {})
        if len(parts) == 1:
            return cls(name, parts, classes, {parts[0]: args})
        unknown = set(args) - set(parts)
        if unknown:
            raise RelkdError(
                f"method {name!r}: args must be keyed by part ({', '.join(parts)}); got "
                f"{', '.join(sorted(map(str, unknown)))}"
            )
        given = {}
        for p in parts:
            a = args.get(p) or {}
            if not isinstance(a, Mapping):
                raise RelkdError(f"method {name!r}: args of part {p!r} must be a mapping")
            given[p] = dict(a)
        return cls(name, parts, classes, given)

    # -- what follows from the parts ----------------------------------------------------------
    @property
    def is_composite(self) -> bool:
        return len(self.parts) > 1

    @property
    def requires_teacher(self) -> bool:
        """Whether any part needs a teacher."""
        return any(c.requires_teacher for c in self.classes.values())

    @property
    def default_ce_weight(self) -> float:
        """The CE weight when the config leaves ``method.ce_weight`` unset: the method's own; a
        composition keeps the CE weight of the relational / first part's protocol, i.e. 1.0
        unless every part defaults lower (e.g. only logit KD parts)."""
        return max(c.default_ce_weight for c in self.classes.values())

    def part_args(self, part: str) -> dict[str, Any]:
        """The keyword arguments a part is built with (``composite_defaults`` first in a
        composition, then the user's)."""
        defaults = self.classes[part].composite_defaults if self.is_composite else {}
        return {**defaults, **self.given[part]}

    def valid_args(self, part: str) -> list[str]:
        """The argument names the part's ``__init__`` takes (besides ``ctx``)."""
        params = inspect.signature(self.classes[part].__init__).parameters
        return [k for k in params if k not in ("self", "ctx")]

    def resolved(self, part: str, arg: str) -> Any:
        """The value ``arg`` of ``part`` takes: the given one, else the signature's default."""
        args = self.part_args(part)
        if arg in args:
            return args[arg]
        p = inspect.signature(self.classes[part].__init__).parameters.get(arg)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    # -- checks -------------------------------------------------------------------------------
    def argument_errors(self) -> list[str]:
        """Every argument error of every part, in order (one line each)."""
        errors = []
        for part in self.parts:
            valid = self.valid_args(part)
            hints = typing.get_type_hints(self.classes[part].__init__)
            for key, value in self.part_args(part).items():
                if key not in valid:
                    errors.append(
                        f"method {part!r} has no argument {key!r}. Valid arguments: "
                        f"{', '.join(valid) or 'none'}"
                    )
                    continue
                try:
                    check_type(part, key, value, hints.get(key, inspect.Parameter.empty))
                    check_value(part, key, value)
                except RelkdError as e:
                    errors.append(str(e))
        return errors

    def check(self) -> None:
        """Raise the first argument error (:meth:`argument_errors`), if any."""
        errors = self.argument_errors()
        if errors:
            raise RelkdError(errors[0])

    def schedule_notes(self, epochs: int) -> list[str]:
        """One line per method schedule longer than a run of ``epochs`` main epochs (the
        arguments a method lists in ``epoch_args``), e.g. DKD's 20-epoch loss warm-up in an
        8-epoch run: it would end at 40 % of its weight."""
        notes = []
        for part in self.parts:
            for arg, what in self.classes[part].epoch_args.items():
                n = self.resolved(part, arg)
                if isinstance(n, (int, float)) and not isinstance(n, bool) and n > epochs:
                    key = f"method.args.{part}.{arg}" if self.is_composite else f"method.args.{arg}"
                    notes.append(
                        f"method {part!r}: {arg}={n} is longer than the run "
                        f"(train.epochs={epochs}): {what}; set {key} to fit the run"
                    )
        return notes

    # -- building -----------------------------------------------------------------------------
    def build(self, ctx: MethodContext) -> tuple[Method, float]:
        """The method (a :class:`~relkd.methods.base.Composite` for a composition) and its
        default CE weight; the arguments are checked first (:meth:`check`)."""
        self.check()
        if not self.is_composite:
            part = self.parts[0]
            return build_part(part, ctx, self.part_args(part)), self.default_ce_weight
        built = {p: build_part(p, ctx, self.part_args(p)) for p in self.parts}
        return Composite(ctx, built), self.default_ce_weight


def build_method(
    name: str, ctx: MethodContext, args: Mapping[str, Any] | None = None
) -> tuple[Method, float]:
    """Build a method (or a composition ``"a+b"``) and return it with its default CE weight.

    For a composition, ``args`` maps each part's name to its keyword arguments.
    """
    return MethodSpec.parse(name, args).build(ctx)
