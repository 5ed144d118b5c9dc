"""Model-side abstractions: feature description, model output and forward-hook feature taps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from relkd.registry import RelkdError

#: Tap name that captures the *input* of the model's final classifier (the pooled penultimate
#: feature, [B, D]) instead of a module's output.
POOLED = "pooled"


@dataclass(frozen=True)
class FeatureInfo:
    """One tappable stage of a model (timm's convention).

    Attributes:
        name: dotted module name whose forward output is the stage feature map.
        channels: channels of that output ([B, channels, H, W]).
        reduction: input size / feature size (stride of the stage).
    """

    name: str
    channels: int
    reduction: int


@dataclass
class ModelOutput:
    """Logits [B, C] plus the tapped features by tap name (``"pooled"`` -> [B, D])."""

    logits: torch.Tensor
    feats: dict[str, torch.Tensor] = field(default_factory=dict)


def find_classifier(model: nn.Module) -> str:
    """Name of the final classifier: ``model.classifier_name`` or else the last ``nn.Linear``."""
    name = getattr(model, "classifier_name", None)
    if name:
        return str(name)
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    if last is None:
        raise RelkdError(
            f"{type(model).__name__} has no nn.Linear classifier; set `classifier_name` on the "
            "model to tap its pooled features"
        )
    return last


def get_feature_info(model: nn.Module) -> list[FeatureInfo]:
    """The model's stages, shallow to deep; ``[]`` when the model does not describe them."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    return [i if isinstance(i, FeatureInfo) else FeatureInfo(**i) for i in info]


class FeatureTap:
    """Capture intermediate outputs of any model with forward hooks, without changing ``forward``.

    ``FeatureTap(model, ["layer3", "pooled"])`` records the output of module ``layer3`` and the
    input of the model's classifier under ``"pooled"`` on every forward pass; ``tap(x)`` runs the
    model and returns a :class:`ModelOutput`. Hooks stay registered until :meth:`remove`.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] = ()) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self._store: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(model.named_modules())
        for name in self.names:  # validate every name before registering any hook
            if name != POOLED and name not in modules:
                stages = [i.name for i in get_feature_info(model)]
                raise RelkdError(
                    f"tap {name!r} is not a module of {type(model).__name__}. Stages: "
                    f"{stages or 'none declared'}; '{POOLED}' taps the classifier input; any "
                    "dotted name from model.named_modules() also works"
                )
        for name in self.names:
            if name == POOLED:
                target = find_classifier(model)
                self._handles.append(modules[target].register_forward_pre_hook(self._pre(name)))
                continue
            self._handles.append(modules[name].register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            self._store[name] = args[0].flatten(1)

        return hook

    def _post(self, name: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self._store[name] = out

        return hook

    def __call__(self, x: torch.Tensor) -> ModelOutput:
        self._store = {}
        logits = self.model(x)
        feats, self._store = self._store, {}
        return ModelOutput(logits, feats)

    def pop(self) -> dict[str, torch.Tensor]:
        """Features recorded by the last forward pass (for callers that ran the model themselves)."""
        feats, self._store = self._store, {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
