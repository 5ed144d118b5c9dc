"""Loading community checkpoints (RepDistiller / mdistiller / torchvision / DDP) safely."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from relkd.registry import RelkdError

_WRAPPER_KEYS = ("model", "state_dict", "student", "net")


def extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object.

    Accepts a bare state dict, ``{"model": sd, ...}`` (RepDistiller ``ckpt_epoch_240.pth``),
    ``{"state_dict": sd}``, relkd's run ``checkpoint.pt`` (the student's weights) and keys prefixed
    ``module.`` (saved from DDP / DataParallel).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("distiller"), Mapping):
        # relkd's own run checkpoint (checkpoint.pt): the student inside the Distiller's state.
        d = obj["distiller"]
        obj = {k[len("student.") :]: v for k, v in d.items() if k.startswith("student.")}
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise RelkdError(
            "checkpoint holds no state dict: expected a dict of tensors, optionally under one of "
            f"the keys {list(_WRAPPER_KEYS)}"
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _read_error(p: Path, e: BaseException) -> RelkdError:
    """One line saying why ``p`` cannot be read, never empty and never torch's advice to retry
    with ``weights_only=False`` (that would run whatever code the file carries)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        skip = ("weights_only", "Check the documentation", "Weights only load failed")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        lines = [ln for ln in lines if not any(s in ln for s in skip)]
        detail = lines[0].rstrip(".") if lines else "it holds objects other than tensors"
        return RelkdError(
            f"cannot read checkpoint {str(p)!r}: refused, {detail}. relkd only loads tensors "
            "and plain containers, since other objects in a pickle can run code"
        )
    if isinstance(e, EOFError) or (isinstance(e, RuntimeError) and "zip archive" in text):
        why = "truncated or not a PyTorch checkpoint"
    else:
        first = text.strip().splitlines()[0] if text.strip() else ""
        why = f"corrupt or not a checkpoint ({type(e).__name__}{': ' + first if first else ''})"
        if p.suffix == ".safetensors":
            why = f"not a valid safetensors file (truncated or junk): {first or type(e).__name__}"
    return RelkdError(f"cannot read checkpoint {str(p)!r}: {why}")


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, map_location: str = "cpu"
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (always ``weights_only=True``) and return it.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load``. Every
    failure (missing, empty, truncated or junk file, objects other than tensors, weights of
    another model) is a :class:`RelkdError` of one line naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise RelkdError(f"checkpoint {str(p)!r} does not exist")
    if p.stat().st_size == 0:
        raise RelkdError(f"cannot read checkpoint {str(p)!r}: the file is empty")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device=map_location)
        else:
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling / deserialising errors carry no file name
        raise _read_error(p, e) from e
    sd = extract_state_dict(obj)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else (lines[0] if lines else "")
        if len(detail) > 300:
            detail = detail[:300] + " ..."
        raise RelkdError(
            f"checkpoint {str(p)!r} does not match {type(model).__name__}: {detail}"
        ) from e
    return model


def save_student(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> None:
    """Export weights alone: ``.safetensors`` by suffix, else ``torch.save({"model": sd})``.

    ``metadata`` (architecture, num_classes, in_chans, mean / std, ...) goes into the
    safetensors header (values JSON-encoded strings) and under ``"meta"`` of the ``.pt`` file.
    Both are written atomically (temp file, fsync, rename) with the same mode (the umask's).
    """
    import io
    import json

    from relkd._fs import atomic_write_bytes

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(metadata or {})
    if p.suffix == ".safetensors":
        from safetensors.torch import save

        header = {"format": "pt", **{str(k): json.dumps(v) for k, v in meta.items()}}
        data = save(sd, metadata=header)
    else:
        buf = io.BytesIO()
        torch.save({"model": sd, "meta": meta} if meta else {"model": sd}, buf)
        data = buf.getvalue()
    atomic_write_bytes(p, data)
