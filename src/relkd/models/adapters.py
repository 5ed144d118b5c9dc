"""torchvision and timm models behind the same interface (``feature_info``, ``classifier_name``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.registry import RelkdError

# Stage modules per torchvision family, shallow to deep; other families fall back to probing.
_TV_STAGES: dict[str, list[str]] = {
    "resnet": ["layer1", "layer2", "layer3", "layer4"],
    "resnext": ["layer1", "layer2", "layer3", "layer4"],
    "wide_resnet": ["layer1", "layer2", "layer3", "layer4"],
}


def _probe_feature_info(model: nn.Module, names: list[str], size: int, in_chans: int) -> list:
    """Run one dummy forward (eval mode, no grad) and record each stage's channels and stride."""
    shapes: dict[str, torch.Size] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda _m, _a, o, n=n: shapes.__setitem__(n, o.shape))
        for n in names
    ]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_chans, size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return [FeatureInfo(n, int(shapes[n][1]), size // int(shapes[n][-1])) for n in names]


def torchvision_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)``; weights are never downloaded here.

    Pass ``weights_path=...`` in the config's checkpoint instead of torchvision's ``weights=``.
    """
    import torchvision

    if kwargs.get("weights") not in (None, "none"):
        raise RelkdError(
            "relkd does not download weights; save torchvision weights to a file and set "
            "the model's `checkpoint` to it"
        )
    kwargs.pop("weights", None)
    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise RelkdError(f"unknown torchvision model {name!r}. Valid choices: {', '.join(valid)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    family = next((f for f in _TV_STAGES if name.startswith(f)), None)
    if family is not None:
        model.classifier_name = "fc"
        model.feature_info = _probe_feature_info(model, _TV_STAGES[family], 64, 3)
    elif hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        # VGG / MobileNet / EfficientNet / ConvNeXt style: stages are children of `features`
        # where the spatial size drops; keep the last block of each resolution.
        names = [f"features.{i}" for i in range(len(model.features))]
        probed = _probe_feature_info(model, names, 64, 3)
        stages: list[FeatureInfo] = []
        for fi in probed:
            if stages and stages[-1].reduction == fi.reduction:
                stages[-1] = fi
            else:
                stages.append(fi)
        model.feature_info = stages
    return model


def timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A timm model (``pip install relkd[timm]``); its own ``feature_info`` is converted."""
    try:
        import timm
    except ImportError as e:
        raise RelkdError("timm models need `pip install timm` (or relkd[timm])") from e
    if kwargs.pop("pretrained", False):
        raise RelkdError("relkd does not download weights; use the model's `checkpoint` instead")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as e:
        raise RelkdError(f"timm cannot build {name!r}: {e}") from e
    info = getattr(model, "feature_info", None) or []
    model.feature_info = [
        FeatureInfo(i["module"], int(i["num_chs"]), int(i["reduction"]))
        for i in info
        if i.get("module")
    ]
    return model
