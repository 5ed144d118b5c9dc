"""Model-side abstractions: feature description, model output and forward-hook feature taps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from relkd.models.info import FeatureInfo
from relkd.registry import RelkdError

#: Tap name that captures the *input* of the model's final classifier (the pooled penultimate
#: feature, [B, D]) instead of a module's output.
POOLED = "pooled"


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


def _as_info(i: object) -> FeatureInfo:
    if isinstance(i, FeatureInfo):
        return i
    if isinstance(i, dict) and "module" in i:  # timm's convention
        return FeatureInfo(str(i["module"]), int(i["num_chs"]), int(i["reduction"]))
    if isinstance(i, dict):
        return FeatureInfo(**i)
    raise RelkdError(f"feature_info entries must be FeatureInfo or dicts, got {i!r}")


#: attribute under which a derived stage list is cached on the model.
_DERIVED = "_relkd_derived_stages"
_DERIVE_ERROR = "_relkd_derive_error"


def get_feature_info(
    model: nn.Module, example: torch.Tensor | None = None, *, derive: bool = True
) -> list[FeatureInfo]:
    """The model's stages, shallow to deep.

    A declared ``model.feature_info`` (relkd's :class:`FeatureInfo` s, or dicts in relkd's or
    timm's convention) wins. Otherwise the stages are derived from one dummy forward pass of
    ``example`` ([B, C, H, W]; default: zeros of a size the model runs on), see
    :mod:`relkd.models.stages`, and cached on the model (later calls return the same list).
    ``derive=False`` never runs the model: ``[]`` unless declared or already derived. A model
    no dummy input runs on gets ``[]`` (:func:`derive_error` says why).
    """
    info = getattr(model, "feature_info", None)
    if info:
        if hasattr(info, "get_dicts"):  # a timm FeatureInfo object
            info = info.get_dicts()
        return [_as_info(i) for i in info]
    cached = model.__dict__.get(_DERIVED)
    if cached is not None or not derive:
        return list(cached or [])
    from relkd.models.stages import derive_with_fallback

    try:
        stages = derive_with_fallback(model, example)
    except RelkdError as e:  # no dummy input ran: no stages, and why (for later messages)
        model.__dict__[_DERIVE_ERROR] = str(e)
        stages = []
    model.__dict__[_DERIVED] = stages
    return list(stages)


def derive_error(model: nn.Module) -> str | None:
    """Why the stages of a model that declares none could not be derived (``None``: they were,
    or no derivation ran)."""
    return model.__dict__.get(_DERIVE_ERROR)


def to_nchw(x: torch.Tensor, info: FeatureInfo, model_name: str = "model") -> torch.Tensor:
    """A stage output as [B, C, H, W]: NHWC permuted, tokens [B, L, C] without their prefix
    tokens reshaped to the (square) patch grid."""
    if info.layout == "NCHW" or not torch.is_tensor(x):
        return x
    if info.layout == "NHWC" and x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if info.layout == "NLC" and x.dim() == 3:
        n = x.shape[1] - info.prefix_tokens
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return x[:, info.prefix_tokens :].transpose(1, 2).reshape(x.shape[0], -1, side, side)
    raise RelkdError(
        f"stage {info.name!r} of {model_name} has output {list(x.shape)} ({info.layout} with "
        f"{info.prefix_tokens} prefix tokens), which is not a square grid of patches: this "
        "method needs NCHW feature maps"
    )


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
                stages = [i.name for i in get_feature_info(model, derive=False)]
                raise RelkdError(
                    f"tap {name!r} is not a module of {type(model).__name__}. Stages: "
                    f"{stages or 'none declared'}; '{POOLED}' taps the classifier input; any "
                    "dotted name from model.named_modules() also works"
                )
        # Non-NCHW stages (Swin's NHWC, ViT tokens) are handed over as [B, C, H, W].
        try:
            declared = get_feature_info(model, derive=False)
        except (RelkdError, TypeError):  # an unusual feature_info: plain taps, as before
            declared = []
        layouts = {i.name: i for i in declared if i.layout != "NCHW"}
        for name in self.names:
            if name == POOLED:
                target = find_classifier(model)
                self._handles.append(modules[target].register_forward_pre_hook(self._pre(name)))
                continue
            self._handles.append(
                modules[name].register_forward_hook(self._post(name, layouts.get(name)))
            )

    def _pre(self, name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            self._store[name] = args[0].flatten(1)

        return hook

    def _post(self, name: str, info: FeatureInfo | None = None):
        if info is not None:
            model_name = type(self.model).__name__

            def convert(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
                self._store[name] = to_nchw(out, info, model_name)

            return convert

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
