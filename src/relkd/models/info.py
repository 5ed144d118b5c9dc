"""The description of one tappable stage of a model (a leaf module: :mod:`relkd.models.base`
and :mod:`relkd.models.stages` both use it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureInfo:
    """One tappable stage of a model (timm's convention).

    Attributes:
        name: dotted module name whose forward output is the stage feature map.
        channels: channels of that output ([B, channels, H, W]).
        reduction: input size / feature size (stride of the stage).
        layout: the module's output layout: ``"NCHW"``, ``"NHWC"`` (Swin) or ``"NLC"`` (tokens
            [B, L, C], ViT). :class:`FeatureTap` hands every stage over as [B, C, H, W].
        prefix_tokens: ``"NLC"`` only: leading non-patch tokens (class / register tokens).
    """

    name: str
    channels: int
    reduction: int
    layout: str = "NCHW"
    prefix_tokens: int = 0
