"""The format of the teacher-output cache of :mod:`relkd.data.teacher_cache`.

The constants every cache folder carries (:data:`CACHE_VERSION`, :data:`FORMAT`, the
:data:`MANIFEST` file name, the storage dtypes), the row order of the augmentation outcomes
(:func:`num_outcomes`, :func:`outcome_index`, :func:`outcome_table`), the key that identifies a
cache (:func:`teacher_fingerprint`, :func:`data_fingerprint`, :func:`cache_key`) and reading a
folder's manifest. What the key covers and why is in the docstring of
:mod:`relkd.data.teacher_cache`; these names stay importable from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd._fs import read_text
from relkd.models.base import POOLED
from relkd.registry import RelkdError

#: Bumped whenever the layout or the meaning of the stored entries changes (part of every key).
CACHE_VERSION = 2  # 2: per-file sha256 checksums in the manifest
FORMAT = "relkd-teacher-cache"
MANIFEST = "manifest.json"
_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def num_outcomes(padding: int, flip: bool) -> int:
    """K, the number of augmentation outcomes: ``(2p + 1)^2 * (2 if flip else 1)``."""
    return (2 * padding + 1) ** 2 * (2 if flip else 1)


def outcome_index(
    offsets: torch.Tensor, flips: torch.Tensor, padding: int, flip: bool
) -> torch.Tensor:
    """Row of outcome ``(oy, ox, f)`` in a cache: ``(oy * (2p + 1) + ox) * nf + f``, nf = 2 with
    flips, else 1. ``offsets`` int [B, 2] in [0, 2p], ``flips`` bool [B] -> int64 [B]."""
    n_off = 2 * padding + 1
    k = offsets[:, 0].long() * n_off + offsets[:, 1].long()
    if flip:
        k = k * 2 + flips.long()
    return k


def outcome_table(padding: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All K outcomes in row order: offsets int64 [K, 2], flips bool [K]."""
    n_off = 2 * padding + 1
    nf = 2 if flip else 1
    k = torch.arange(num_outcomes(padding, flip))
    f, o = k % nf, k // nf
    return torch.stack([o // n_off, o % n_off], 1), f.bool()


def _dtype_name(dtype: str | torch.dtype) -> str:
    if dtype in (torch.float16, "float16", "fp16"):
        return "fp16"
    if dtype in (torch.float32, "float32", "fp32"):
        return "fp32"
    raise RelkdError(f"teacher cache dtype must be fp16 or fp32, got {dtype!r}")


def _check_taps(taps: Sequence[str]) -> tuple[str, ...]:
    taps = tuple(dict.fromkeys(["logits", *taps]))
    bad = [t for t in taps if t not in ("logits", POOLED)]
    if bad:
        raise RelkdError(
            f"the teacher cache stores logits and {POOLED!r} features only, not {bad}: methods "
            "that read feature maps need the online teacher"
        )
    return taps


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and every state-dict entry (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    # The model's own input normalisation (relkd.models.normalization): "" when there is none,
    # so keys of models fed the data's statistics are unchanged.
    from relkd.models.normalization import input_norm_fingerprint

    h.update(input_norm_fingerprint(model).encode())
    return h.hexdigest()


def data_fingerprint(images_u8: torch.Tensor) -> str:
    """sha256 of the images' dtype, shape and bytes (order matters: entry i is image i)."""
    h = hashlib.sha256(f"{images_u8.dtype}|{tuple(images_u8.shape)}|".encode())
    h.update(_tensor_bytes(images_u8))
    return h.hexdigest()


def cache_key(
    model: nn.Module,
    images_u8: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    taps: Sequence[str] = ("logits",),
    dtype: str | torch.dtype = "fp16",
) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: the hex sha256 identifying a cache and the readable parts it covers."""
    parts = {
        "version": CACHE_VERSION,
        "teacher": teacher_fingerprint(model),
        "data": data_fingerprint(images_u8),
        "padding": int(padding),
        "flip": bool(flip),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "taps": list(_check_taps(taps)),
        "dtype": _dtype_name(dtype),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(read_text(path / MANIFEST, "json", "teacher cache manifest"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None
