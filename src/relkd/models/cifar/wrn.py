"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) of the CRD protocol.

Architecture: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (pre-activation basic
blocks, depth 6n+4, widths 16k/32k/64k). Module names follow the CRD code release (Tian et al.,
"Contrastive Representation Distillation", arXiv 1910.10699, "RepDistiller") so its released
teachers load with ``strict=True``.

Tapped stages (``feature_info``): ``block1``, ``block2``, ``block3`` -- the raw stage outputs
(residual sums, *before* the next BN-ReLU, as in RepDistiller's ``f1``..``f3``). The module
``relu`` gives the last stage after the final BN-ReLU, i.e. the map that is average-pooled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


class WideBasic(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

    When the width changes, the shortcut is a 1x1 convolution (``convShortcut``) applied to the
    pre-activated input; otherwise it is the raw input.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        skip = x if self.convShortcut is None else self.convShortcut(act)
        y = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return skip + self.conv2(y)


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks, held under ``.layer`` (the checkpoint layout)."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasic(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem (16), three stages at strides 1/2/2, BN-ReLU, pool, ``fc``.

    Args:
        depth: 6n+4.
        widen_factor: k.
        num_classes: classifier width.
        drop_rate: dropout between the two convolutions of a block.
        in_chans: input channels.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int = 1,
        num_classes: int = 100,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)

        self.classifier_name = "fc"
        self.feature_info = [
            FeatureInfo("block1", ch[1], 1),
            FeatureInfo("block2", ch[2], 2),
            FeatureInfo("block3", ch[3], 4),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, **kw: Any) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes=num_classes, **kw)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, **kw: Any) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes=num_classes, **kw)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, **kw: Any) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes=num_classes, **kw)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, **kw: Any) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes=num_classes, **kw)
