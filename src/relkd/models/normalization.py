"""Per-model input normalisation: each model sees inputs normalised the way it was trained.

The data pipeline normalises every batch once, with the data set's statistics (``mean_d``,
``std_d``, one value per channel). A model trained on other statistics (an ImageNet-pretrained
torchvision or timm teacher, a user's model) gets them re-normalised on the device by a forward
pre-hook installed with :func:`attach_input_norm`::

    x_m = (x * std_d + mean_d - mean_m) / std_m      # x: [B, C, H, W], stats broadcast over C

as timm's distillation task does for its teacher. The hook is skipped altogether (no hook is
installed) when the model's statistics equal the data's, so default runs stay bit-identical.

Where a model's own statistics come from (:func:`find_input_norm`), first match wins:

1. ``mean`` / ``std`` given explicitly (config keys ``teacher.mean`` / ``teacher.std``,
   ``student.mean`` / ``student.std``);
2. attributes ``model.input_mean`` / ``model.input_std`` (sequences of floats, one per channel)
   that a user module may declare. relkd's torchvision / timm adapters set them from the
   weights they load (a torchvision weights enum's ``transforms()`` mean/std, timm's
   ``pretrained_cfg``), and set them to ``None`` for a model built without pretrained weights
   (``None`` means: trained on the data set's statistics);
3. a timm model's ``pretrained_cfg["mean"/"std"]`` (a timm module built outside relkd);
4. otherwise the data set's statistics: nothing to do.

Statistics with 3 values meet data with another channel count the way relkd adapts a first conv
(:mod:`relkd.models.adapters`): grey data takes their average, ``C > 3`` channels repeat them
cyclically (channel ``i`` uses value ``i % 3``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

from relkd.registry import RelkdError

#: attribute under which the installed hook is kept on the model (its fingerprint, for caches).
_HOOK_ATTR = "_relkd_input_norm"


def _floats(name: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise RelkdError(f"{name} must be a list of numbers, got {values!r}") from e
    if not out:
        raise RelkdError(f"{name} must not be empty")
    return out


def renormalize(
    x: torch.Tensor,
    from_mean: Sequence[float] | torch.Tensor,
    from_std: Sequence[float] | torch.Tensor,
    to_mean: Sequence[float] | torch.Tensor,
    to_std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Re-normalise ``x`` [B, C, ...] from ``(from_mean, from_std)`` to ``(to_mean, to_std)``.

    ``(x * from_std + from_mean - to_mean) / to_std`` per channel (dim 1). Returns ``x`` itself
    when both pairs are equal. Statistics are sequences of ``C`` floats (or 1, broadcast).
    """
    if not torch.is_tensor(x) or x.dim() < 2:
        raise RelkdError(f"renormalize needs a [B, C, ...] tensor, got {type(x).__name__}")
    stats = []
    for v in (from_mean, from_std, to_mean, to_std):
        t = torch.as_tensor(v, dtype=x.dtype if x.is_floating_point() else torch.float32)
        stats.append(t.to(x.device).reshape(1, -1, *([1] * (x.dim() - 2))))
    fm, fs, tm, ts = stats
    if torch.equal(fm, tm) and torch.equal(fs, ts):
        return x
    for t in stats:
        if t.shape[1] not in (1, x.shape[1]):
            raise RelkdError(
                f"renormalize: statistics of {t.shape[1]} values for an input of "
                f"{x.shape[1]} channels"
            )
    return (x * fs + fm - tm) / ts


def _fit_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels or len(values) == 1:
        return values if len(values) == channels else values * channels
    if len(values) == 3 and channels == 1:
        return (sum(values) / 3,)
    if len(values) == 3:
        return tuple(values[i % 3] for i in range(channels))
    raise RelkdError(
        f"normalisation statistics have {len(values)} values but the data has {channels} "
        "channels; give one value per channel"
    )


def find_input_norm(
    model: nn.Module,
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The statistics ``(mean, std)`` the model declares it was trained on, or ``None``.

    Order: ``model.input_mean`` / ``model.input_std`` (``None`` values: the data set's), then a
    timm ``pretrained_cfg``. See the module docstring.
    """
    if hasattr(model, "input_mean") or hasattr(model, "input_std"):
        mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
        if mean is None and std is None:
            return None
        if mean is None or std is None:
            raise RelkdError(
                f"{type(model).__name__} declares only one of input_mean / input_std; declare "
                "both (or neither)"
            )
        return _floats("input_mean", mean), _floats("input_std", std)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
        return _floats("pretrained_cfg mean", cfg["mean"]), _floats(
            "pretrained_cfg std", cfg["std"]
        )
    return None


class _InputNorm:
    """The forward pre-hook: re-normalises the model's first positional input on its device."""

    def __init__(self, data: tuple[tuple, tuple], model: tuple[tuple, tuple]) -> None:
        self.data, self.model = data, model
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.fingerprint = json.dumps(
            {"data_mean": data[0], "data_std": data[1], "mean": model[0], "std": model[1]}
        )

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (x.device, x.dtype, x.dim())
        if key not in self._cache:
            shape = (1, -1, *([1] * (x.dim() - 2)))
            self._cache[key] = tuple(
                torch.tensor(v, dtype=x.dtype, device=x.device).reshape(shape)
                for v in (*self.data, *self.model)
            )
        return self._cache[key]

    def __call__(self, _module: nn.Module, args: tuple) -> tuple | None:
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        x = args[0]
        fm, fs, tm, ts = self._stats(x)
        return ((x * fs + fm - tm) / ts, *args[1:])


def attach_input_norm(
    model: nn.Module,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> str:
    """Make ``model`` see inputs normalised with its own statistics; returns a fingerprint.

    Args:
        model: any ``nn.Module`` taking ``[B, C, H, W]`` images normalised with the data's
            statistics as its first argument.
        data_mean / data_std: the data pipeline's statistics (``C`` values each).
        mean / std: the model's statistics; ``None``: :func:`find_input_norm`, else the data's.

    Returns:
        ``""`` when nothing changes (no hook installed: bit-identical to no call), otherwise a
        string naming both pairs of statistics. Keys of stored teacher outputs (teacher cache,
        replay) must include it; :func:`input_norm_fingerprint` returns it from the model.

    The hook is a forward pre-hook on the model itself (registered first, so it runs before
    any other pre-hook), so FeatureTap's module names, the teacher cache's forward and
    ``state_dict`` are unchanged. A second call replaces the first.
    """
    if (mean is None) != (std is None):
        raise RelkdError("give both mean and std for a model's normalisation, or neither")
    d_mean, d_std = _floats("data mean", data_mean), _floats("data std", data_std)
    if len(d_mean) != len(d_std):
        raise RelkdError(f"data mean {d_mean} and std {d_std} differ in length")
    channels = len(d_mean)
    if mean is not None:
        own: tuple | None = (_floats("mean", mean), _floats("std", std))  # type: ignore[arg-type]
    else:
        own = find_input_norm(model)
    old = getattr(model, _HOOK_ATTR, None)
    if old is not None:  # replace a previous call's hook
        old[1].remove()
        delattr(model, _HOOK_ATTR)
    if own is None:
        return ""
    m_mean, m_std = _fit_channels(own[0], channels), _fit_channels(own[1], channels)
    if any(s <= 0 for s in (*m_std, *d_std)):
        raise RelkdError(f"normalisation std must be > 0, got {m_std} (data {d_std})")
    if m_mean == d_mean and m_std == d_std:
        return ""
    hook = _InputNorm((d_mean, d_std), (m_mean, m_std))
    handle = model.register_forward_pre_hook(hook, prepend=True)
    object.__setattr__(model, _HOOK_ATTR, (hook, handle))
    return hook.fingerprint


def input_norm_fingerprint(model: nn.Module) -> str:
    """The fingerprint :func:`attach_input_norm` returned for ``model`` (``""``: no hook)."""
    entry = getattr(model, _HOOK_ATTR, None)
    return entry[0].fingerprint if entry is not None else ""


def input_norm_source(
    model: nn.Module, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[tuple[float, ...], tuple[float, ...]] | None, str]:
    """The statistics :func:`attach_input_norm` gives ``model`` and where they come from:
    ``(stats or None, "given" | "declared by the model" | "timm pretrained_cfg" | "data")``
    (the order of :func:`find_input_norm`; ``"data"``: the data set's, no re-normalisation)."""
    if mean is not None and std is not None:
        return (_floats("mean", mean), _floats("std", std)), "given"
    own = find_input_norm(model)
    if own is None:
        return None, "data"
    declared = hasattr(model, "input_mean") or hasattr(model, "input_std")
    return own, "declared by the model" if declared else "timm pretrained_cfg"


def _short(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def describe_input_norm(
    model: nn.Module,
    data_mean: Sequence[float],
    data_std: Sequence[float],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    source: str | None = None,
) -> str:
    """In words, the statistics ``model`` sees (for the ``plan:`` line and
    :attr:`relkd.Distillation.input_norm`): ``"mean (0.485, 0.456, 0.406) std (...) declared by
    the model, re-normalised from the data's"`` or ``"the data's mean (...) std (...)"``."""
    own, found = input_norm_source(model, mean, std)
    # ``source``: where given statistics came from, in words (unused when none are given)
    source = source if mean is not None and source else found
    d = f"mean {_short(data_mean)} std {_short(data_std)}"
    if own is None:
        return f"the data's {d}"
    channels = len(tuple(data_mean))
    m, s = _fit_channels(own[0], channels), _fit_channels(own[1], channels)
    if m == tuple(float(v) for v in data_mean) and s == tuple(float(v) for v in data_std):
        return f"the data's {d} ({source}: the same)"
    return f"mean {_short(m)} std {_short(s)} {source}, re-normalised from the data's"
