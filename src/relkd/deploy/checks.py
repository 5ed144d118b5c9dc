"""What ``relkd profile`` checks before and around a model's forward: the timing counts, and a
forward that raises on the input asked for (one line naming the input and what the model's first
convolution takes, not a traceback that reads as a relkd bug); and the lower bounds of numeric
command-line flags (``relkd profile``, ``relkd export``, ``relkd eval``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from relkd.models.input_check import channel_mismatch, expected_channels
from relkd.registry import RelkdError


def forward_error(
    model: nn.Module, name: str | None, shape: Sequence[int], batch: int, err: BaseException
) -> RelkdError:
    """One line for a forward of ``model`` that raised on a ``[batch, *shape]`` input: the
    input asked for, what the model expects when its first convolution says so, and the
    model's own error (its first line): the model cannot run on that input, relkd is fine."""
    label = name or type(model).__name__
    given = "x".join(map(str, shape))
    first = (str(err).strip().splitlines() or [""])[0][:200]
    mismatch = channel_mismatch(model, shape[0])
    if mismatch is not None:
        fix = "x".join(map(str, (expected_channels(model)[1], *shape[1:])))  # type: ignore[index]
        return RelkdError(
            f"model {label!r} cannot run on input {given}: {mismatch} (e.g. --input {fix}); "
            f"the forward raised {type(err).__name__}: {first}"
        )
    return RelkdError(
        f"model {label!r} failed on an input of shape {given} (batch {batch}): "
        f"{type(err).__name__}: {first}"
    )


@contextlib.contextmanager
def forward_errors(model: nn.Module, name: str | None, shape: Sequence[int], batch: int):
    """Turn an exception of the model's forward into :func:`forward_error`'s line (a
    :class:`RelkdError` raised inside passes unchanged)."""
    try:
        yield
    except RelkdError:
        raise
    except Exception as e:
        raise forward_error(model, name, shape, batch, e) from e


def flags_at_least(args: Any, limits: Mapping[str, tuple[int, str]]) -> None:
    """Refuse a numeric command-line flag below its lower bound in one line naming the flag, the
    value and the bound (``--repeats 0`` used to time one call, ``--verify-images 0`` to verify
    on nothing, ``relkd eval --batch-size 0`` named a config key the user never wrote).

    Args:
        args: the parsed flags (``argparse.Namespace``); an unset flag (None) is not checked.
        limits: flag dest (``batch_size`` for ``--batch-size``) -> (lower bound, what it is).
    """
    for dest, (low, what) in limits.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            flag = "--" + dest.replace("_", "-")
            raise RelkdError(f"{flag} {value} is not valid: must be >= {low} ({what})")


def check_counts(batches: Sequence[int], warmup: int, repeats: int, threads: int | None) -> None:
    """The timing counts, refused before anything runs (``repeats=0`` used to time one call)."""
    checks = [
        ("repeats", repeats, 1, "timed calls"),
        ("warmup", warmup, 0, "untimed calls first"),
        *(("batches", b, 1, "batch sizes timed") for b in batches),
    ]
    if threads is not None:
        checks.append(("threads", threads, 1, "torch CPU threads"))
    for key, value, low, what in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RelkdError(f"{key}={value!r} is not valid: must be an int >= {low} ({what})")
