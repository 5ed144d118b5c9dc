"""The model registry and ``create_model`` (zoo names, ``torchvision:<name>``, ``timm:<name>``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from relkd import plugins as _plugins
from relkd.registry import Registry, RelkdError

MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", check=_plugins.model_factory, other_forms="torchvision:<name>, timm:<name>"
)


def register_model(name: str | None = None):
    """Decorator: register a factory ``f(num_classes=..., **kw) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: a zoo name (``relkd.list_models()``), ``torchvision:<name>``, ``timm:<name>`` or
            an import path ``package.module:ClassOrFunction`` (:mod:`relkd.plugins`).
        num_classes: width of the classifier.
        **kwargs: passed to the factory (e.g. ``in_chans`` for the small CNNs). ``weights``
            (torchvision / timm only): pretrained weights from the local cache, see
            :mod:`relkd.models.adapters`.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise RelkdError(f"num_classes must be a positive int, got {num_classes!r}")
    _plugins.refuse_python_module(name, "model")
    adapter = name.startswith(("torchvision:", "timm:"))
    if not adapter and kwargs.get("weights") is not None:
        raise RelkdError(
            f"weights={kwargs['weights']!r} applies to torchvision:<name> / timm:<name> models; "
            f"load {name!r} weights with its `checkpoint` instead"
        )
    kwargs.pop("weights", None) if not adapter else None
    if name.startswith("torchvision:"):
        from relkd.models.adapters import torchvision_model

        return torchvision_model(name.split(":", 1)[1], num_classes, **kwargs)
    if name.startswith("timm:"):
        from relkd.models.adapters import timm_model

        return timm_model(name.split(":", 1)[1], num_classes, **kwargs)
    factory = MODELS.get(name)
    try:
        return factory(num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise RelkdError(f"bad arguments {kwargs} for model {name!r}: {e}") from e


def list_models() -> list[str]:
    """Registered zoo names (torchvision / timm names are accepted with their prefix too)."""
    return MODELS.names()
