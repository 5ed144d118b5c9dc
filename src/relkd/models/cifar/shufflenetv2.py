"""ShuffleNet V2 (1x) for CIFAR, ``ShuffleV2`` of the CRD protocol (widths 116/232/464, 1024).

Architecture: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018, in the CIFAR form of the CRD benchmark (Tian et al., "Contrastive
Representation Distillation", arXiv 1910.10699): 1x1 stem, no max-pool, three stages each opening
with a stride-2 down-sampling unit. Module names match the RepDistiller / mdistiller checkpoints.

Tapped stages (``feature_info``): ``layer1``, ``layer2``, ``layer3`` -- each stage's output after
its last unit's concatenation and channel shuffle (reductions 2, 4, 8 at 32x32). The classifier
sees ReLU(BN(``conv2``)) average-pooled (1024-d).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.cifar.shufflenetv1 import channel_shuffle
from relkd.models.registry import register_model


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False)


def _pw(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class BasicUnit(nn.Module):
    """Stride-1 unit: keep the first half of the channels, transform the second half
    (1x1-ReLU, depthwise 3x3, 1x1-ReLU), concatenate, shuffle with 2 groups.
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.keep = int(channels * split_ratio)
        c = channels - self.keep
        if c != self.keep:
            raise ValueError(f"ShuffleNetV2 unit needs an even split, got {channels} channels")
        self.conv1 = _pw(c, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = _dw(c, 1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = _pw(c, c)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : self.keep], x[:, self.keep :]
        y = F.relu(self.bn1(self.conv1(branch)))
        y = self.bn2(self.conv2(y))
        y = F.relu(self.bn3(self.conv3(y)))
        return channel_shuffle(torch.cat([kept, y], 1), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: two branches on the full input (depthwise-1x1 and 1x1-depthwise-1x1),
    each giving half the output channels; concatenate, shuffle with 2 groups.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = _dw(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pw(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pw(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _dw(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _pw(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNet V2.

    Args:
        out_channels: the three stage widths and the head width.
        num_blocks: stride-1 units per stage (after the down-sampling unit).
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cins = (stem, *out_channels[:2])
        self.layer1 = self._make_layer(cins[0], out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(cins[1], out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(cins[2], out_channels[2], num_blocks[2])
        self.conv2 = _pw(out_channels[2], out_channels[3])
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

        self.classifier_name = "linear"
        self.feature_info = [
            FeatureInfo(f"layer{i + 1}", c, 2 ** (i + 1)) for i, c in enumerate(out_channels[:3])
        ]

    @staticmethod
    def _make_layer(cin: int, cout: int, n: int) -> nn.Sequential:
        return nn.Sequential(DownUnit(cin, cout), *[BasicUnit(cout) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ShuffleV2")
def ShuffleV2(num_classes: int = 100, **kw: Any) -> ShuffleNetV2:
    """ShuffleNet V2 1x: stage widths 116/232/464, head 1024, units 1+3 / 1+7 / 1+3."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, **kw)
