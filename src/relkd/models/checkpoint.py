"""Loading community checkpoints (RepDistiller / mdistiller / torchvision / DDP) safely."""

from __future__ import annotations

import os
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


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, map_location: str = "cpu"
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (always ``weights_only=True``) and return it.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load``.
    """
    p = Path(path)
    if not p.is_file():
        raise RelkdError(f"checkpoint {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(p), device=map_location)
    else:
        try:
            obj = torch.load(p, map_location=map_location, weights_only=True)
        except Exception as e:  # unpickling errors carry no file name
            raise RelkdError(f"cannot read checkpoint {str(p)!r}: {e}") from e
    sd = extract_state_dict(obj)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise RelkdError(f"checkpoint {str(p)!r} does not match {type(model).__name__}: {e}") from e
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

    from relkd.engine.checkpoint import atomic_write_bytes

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
