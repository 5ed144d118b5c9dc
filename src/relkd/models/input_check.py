"""What a model expects as input against what the data pipeline feeds it, said before training.

A teacher carries its input contract in two places: what its **checkpoint records** (relkd's
``student.pt`` / ``.safetensors`` hold the image size, channels and normalisation statistics of
the run that trained it: ``model_mean`` / ``model_std`` where the model saw other statistics than
its data's, else the data's ``mean`` / ``std``)
and what its **module declares** (``input_mean`` / ``input_std``, a torchvision weights enum's or
timm's ``pretrained_cfg`` statistics and ``input_size``, or an ``input_size`` attribute of a
user's module: an int side or ``(C, H, W)``). :func:`teacher_input` compares both with the data
pipeline and returns the statistics to apply plus one note per mismatch, each saying what relkd
does about it:

* statistics: given (``teacher.mean`` / ``teacher.std``) > declared by the module > recorded by
  the checkpoint > the data's. A recorded normalisation unlike the data's is applied (the
  teacher's inputs are re-normalised on the device, :mod:`relkd.models.normalization`), and a
  declared or given one that contradicts the record is used and named;
* image size and channels: relkd feeds what the config says; the note names the key to change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn


def recorded_input(checkpoint: str | Path | None) -> dict[str, Any]:
    """``{"image_size", "in_chans", "mean", "std", "dataset", "source"}`` as far as the
    checkpoint (relkd's metadata) and its run folder record them; ``{}`` for files that record
    nothing (RepDistiller, akamaster, bare state dicts)."""
    if not checkpoint:
        return {}
    path = Path(checkpoint).expanduser()
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
            meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        else:
            import torch

            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # an old (non-zip) file cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            meta = dict(obj.get("meta") or {}) if isinstance(obj, dict) else {}
    except Exception:  # unreadable here: the loader reports it where the weights are loaded
        return {}
    out = {k: meta[k] for k in ("image_size", "in_chans", "mean", "std", "dataset") if k in meta}
    if not out:
        return {}
    # model_mean / model_std: the statistics the model itself saw when they differed from its
    # data's (a pretrained model's, or its run's student.mean / std); mean / std: the data's.
    if meta.get("model_mean") is not None and meta.get("model_std") is not None:
        out["mean"], out["std"] = meta["model_mean"], meta["model_std"]
    out["source"] = f"recorded in {path.name}"
    return out


def declared_size(model: nn.Module) -> tuple[int | None, int | None]:
    """``(channels, side)`` the module declares: ``input_size`` (int or (C, H, W)) or timm's
    ``pretrained_cfg["input_size"]``; None where it declares nothing."""
    size = getattr(model, "input_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, int):
        return None, size
    if isinstance(size, Sequence) and len(size) == 3:
        return int(size[0]), int(size[-1])
    return None, None


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))


def teacher_input(
    model: nn.Module,
    name: str,
    checkpoint: str | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    info: Any,
    role: str = "teacher",
) -> tuple[tuple[Sequence[float], Sequence[float]] | tuple[None, None], list[str]]:
    """The statistics to give :func:`relkd.models.normalization.attach_input_norm` for the
    teacher ``name`` and the notes to say before training (see the module docstring);
    ``role``: how the notes call the model (``relkd eval`` checks its model the same way)."""
    from relkd.models.normalization import find_input_norm

    notes: list[str] = []
    rec = recorded_input(checkpoint)
    declared = find_input_norm(model)
    given = (mean, std) if mean is not None and std is not None else None
    use: tuple[Any, Any] = (None, None)
    if rec.get("mean") is not None and rec.get("std") is not None:
        r_mean, r_std = rec["mean"], rec["std"]
        chosen = given or declared
        if chosen is None:
            if not (_same(r_mean, info.mean) and _same(r_std, info.std)):
                use = (r_mean, r_std)
                notes.append(
                    f"{role} {name} was trained on inputs normalised with mean {_fmt(r_mean)} "
                    f"std {_fmt(r_std)} ({rec['source']}); the data uses mean {_fmt(info.mean)} "
                    f"std {_fmt(info.std)}: relkd re-normalises the {role}'s inputs to its own "
                    f"({role}.mean / {role}.std override)"
                )
        elif not (_same(r_mean, chosen[0]) and _same(r_std, chosen[1])):
            how = f"{role}.mean / {role}.std" if given else "the module's declared statistics"
            notes.append(
                f"{role} {name}: {rec['source']} says mean {_fmt(r_mean)} std {_fmt(r_std)}, "
                f"but {how} say mean {_fmt(chosen[0])} std {_fmt(chosen[1])}: relkd uses {how}"
            )
    if given is not None:
        use = given
    # Size and channels: the checkpoint's record wins over a declaration (a pretrained model
    # fine-tuned at 32 px declares 224 px); a timm model without pretrained weights (declared
    # statistics None) declares nothing it was trained on.
    d_chans, d_side = declared_size(model) if declared is not None or hasattr(
        model, "input_size"
    ) else (None, None)  # fmt: skip
    src = rec.get("source") if rec else "declared by the model"
    side = rec.get("image_size") if rec else d_side
    chans = rec.get("in_chans") if rec else d_chans
    if side is not None and int(side) != int(info.image_size):
        notes.append(
            f"{role} {name} expects {side}x{side} images ({src}) but the data pipeline feeds "
            f"{info.image_size}x{info.image_size}: relkd feeds them as configured; set "
            f"data.image_size={side} to match"
        )
    if chans is not None and int(chans) != int(info.in_channels):
        notes.append(
            f"{role} {name} expects {chans}-channel images ({src}) but the data has "
            f"{info.in_channels}: relkd feeds the data's channels"
        )
    return use, notes


def attach_trained_input_norm(
    model: nn.Module,
    name: str,
    checkpoint: str | Path | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    info: Any,
    role: str = "model",
) -> tuple[str, list[str]]:
    """Make a trained ``model`` see inputs normalised as it was trained, the rule ``relkd eval``
    and ``relkd probe`` share: ``mean`` / ``std`` when given (a run's ``student.mean`` /
    ``student.std``), else the statistics the module declares, else those recorded with
    ``checkpoint``, else the data's (no hook; :func:`teacher_input` decides,
    :func:`relkd.models.normalization.attach_input_norm` installs). ``info``: the data set's
    info (``mean``, ``std``, ``image_size``, ``in_channels``) the model is fed with.

    Returns:
        ``(what the model sees, in words; the notes to print)``.
    """
    from relkd.models.normalization import attach_input_norm, describe_input_norm

    (m_mean, m_std), notes = teacher_input(model, name, checkpoint, mean, std, info, role=role)
    attach_input_norm(model, info.mean, info.std, m_mean, m_std)
    given = mean is not None and std is not None
    how = f"{role}.mean / {role}.std" if given else "recorded with its checkpoint"
    seen = describe_input_norm(model, info.mean, info.std, m_mean, m_std, how)
    return seen, notes


def expected_channels(model: nn.Module) -> tuple[str, int] | None:
    """``(module name, in_channels)`` of the model's first convolution (in registration
    order, which is the forward order of every zoo / torchvision / timm network), or None."""
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return mod_name, int(m.in_channels)
    return None


def channel_mismatch(model: nn.Module, channels: int) -> str | None:
    """``"its first convolution (module 'conv1') takes 1 channel(s), not 3"`` when the model's
    first convolution takes other than ``channels`` input channels, else None: the one test by
    which a forward that failed is said to be a channel mismatch (``relkd profile`` and the
    engine's first forward on the data's shape), never guessed from the error's text."""
    want = expected_channels(model)
    if want is None or want[1] == channels:
        return None
    where = f" (module {want[0]!r})" if want[0] else ""
    return f"its first convolution{where} takes {want[1]} channel(s), not {channels}"
