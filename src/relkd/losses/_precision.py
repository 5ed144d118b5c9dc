"""Numerics shared by the feature / relational baseline losses: fp32 math even under autocast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32; float64 is kept (tests compare against float64 references)."""
    return x if x.dtype == torch.float64 else x.float()


def _device_type(args: Any) -> str:
    for a in args:
        if torch.is_tensor(a):
            return a.device.type
        if isinstance(a, (list, tuple)):
            found = _device_type(a)
            if found:
                return found
    return ""


def no_autocast(fn: F) -> F:
    """Run ``fn`` with autocast off on the device of its first tensor argument: autocast would
    run the Gram matrices / kernels / distances in bf16 even on fp32 inputs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(_device_type(args) or "cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
