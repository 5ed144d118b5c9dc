"""Crash-safe checkpoint files: atomic write, checksum, the previous one kept as a fallback."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from relkd.registry import RelkdError

CKPT = "checkpoint.pt"
PREV = "checkpoint.prev.pt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Serialise ``state``; the current checkpoint becomes ``checkpoint.prev.pt``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = run_dir / CKPT
    if path.exists():
        os.replace(path, run_dir / PREV)
        sha = run_dir / (CKPT + ".sha256")
        if sha.exists():
            os.replace(sha, run_dir / (PREV + ".sha256"))
    atomic_write_bytes(run_dir / (CKPT + ".sha256"), _sha256(data).encode())
    atomic_write_bytes(path, data)
    return path


def _load_verified(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    sha = path.with_name(path.name + ".sha256")
    if sha.exists() and sha.read_text().strip() != _sha256(data):
        raise RelkdError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RelkdError(f"checkpoint {str(path)!r} cannot be read: {e}") from e


def load_latest(run_dir: Path, log=print) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``run_dir`` (falls back to the previous one), or None."""
    errors = []
    for name in (CKPT, PREV):
        p = run_dir / name
        if not p.exists():
            continue
        try:
            return _load_verified(p)
        except RelkdError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
    if errors:
        raise RelkdError("no readable checkpoint: " + "; ".join(errors))
    return None
