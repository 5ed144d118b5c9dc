"""ShuffleNet (v1) for CIFAR, ``ShuffleV1`` of the CRD protocol (groups 3, widths 240/480/960).

Architecture: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices", CVPR 2018, in the CIFAR form of the CRD benchmark (Tian et al., "Contrastive
Representation Distillation", arXiv 1910.10699): 1x1 stem, no max-pool, three stages that each
start with a stride-2 unit. Module names match the RepDistiller / mdistiller checkpoints.

Tapped stages (``feature_info``): ``layer1``, ``layer2``, ``layer3`` -- each stage's output after
the ReLU of its last unit (reductions 2, 4, 8 at 32x32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: [N, g*c, H, W] viewed as [g, c] -> [c, g]."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1, then add (stride 1) or concatenate an
    average-pooled input (stride 2); ReLU at the end.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int
    ) -> None:
        super().__init__()
        mid = out_planes // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.stride == 2:
            return F.relu(torch.cat([y, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(y + x)


class ShuffleNetV1(nn.Module):
    """CIFAR ShuffleNet v1.

    Args:
        out_planes: output channels of the three stages.
        num_blocks: units per stage.
        groups: groups of the 1x1 convolutions.
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.in_planes = stem
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, stem)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups, stem)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups, stem)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

        self.classifier_name = "linear"
        self.feature_info = [
            FeatureInfo(f"layer{i + 1}", c, 2 ** (i + 1)) for i, c in enumerate(out_planes)
        ]

    def _make_layer(self, out_planes: int, n: int, groups: int, stem: int) -> nn.Sequential:
        units: list[nn.Module] = []
        for i in range(n):
            # the stride-2 unit concatenates its pooled input, so its branch is narrower
            branch = out_planes - self.in_planes if i == 0 else out_planes
            first_groups = 1 if self.in_planes == stem else groups
            units.append(
                ShuffleUnit(self.in_planes, branch, 2 if i == 0 else 1, groups, first_groups)
            )
            self.in_planes = out_planes
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ShuffleV1")
def ShuffleV1(num_classes: int = 100, **kw: Any) -> ShuffleNetV1:
    """ShuffleNet v1, groups 3, stage widths 240/480/960, units 4/8/4."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes, **kw)
