"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) of the CRD protocol.

Architecture: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the 6n+2
CIFAR variant, three stages of basic blocks). Widths and module names follow the CRD benchmark
(Tian et al., "Contrastive Representation Distillation", arXiv 1910.10699, code release
"RepDistiller") so that its released ``ckpt_epoch_240.pth`` teachers load with ``strict=True``.

Tapped stages (``feature_info``): ``layer1``, ``layer2``, ``layer3`` -- each stage's output after
the final ReLU of its last block (RepDistiller's ``f1``..``f3`` with ``preact=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut; ReLU after the sum."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


class CifarResNet(nn.Module):
    """Three-stage CIFAR ResNet: 3x3 stem, stages at strides 1/2/2, global average pool, ``fc``.

    Args:
        depth: 6n+2 for basic blocks, 9n+2 for bottlenecks.
        widths: channels of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
        block: ``"basic"`` or ``"bottleneck"``.
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        block: str = "basic",
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if block == "basic":
            if (depth - 2) % 6:
                raise ValueError(f"basic-block CIFAR ResNet depth must be 6n+2, got {depth}")
            unit: type[BasicBlock] | type[Bottleneck] = BasicBlock
            n = (depth - 2) // 6
        elif block == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"bottleneck CIFAR ResNet depth must be 9n+2, got {depth}")
            unit = Bottleneck
            n = (depth - 2) // 9
        else:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")

        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(unit, widths[1], n, stride=1)
        self.layer2 = self._make_layer(unit, widths[2], n, stride=2)
        self.layer3 = self._make_layer(unit, widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * unit.expansion, num_classes)

        self.classifier_name = "fc"
        self.feature_info = [
            FeatureInfo("layer1", widths[1] * unit.expansion, 1),
            FeatureInfo("layer2", widths[2] * unit.expansion, 2),
            FeatureInfo("layer3", widths[3] * unit.expansion, 4),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, unit: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        out = planes * unit.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        layers: list[nn.Module] = [unit(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [unit(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-8, stage widths 16/32/64."""
    return CifarResNet(8, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet14")
def resnet14(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-14, stage widths 16/32/64."""
    return CifarResNet(14, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet20")
def resnet20(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-20, stage widths 16/32/64."""
    return CifarResNet(20, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet32")
def resnet32(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-32, stage widths 16/32/64."""
    return CifarResNet(32, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet44")
def resnet44(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-44, stage widths 16/32/64."""
    return CifarResNet(44, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet56")
def resnet56(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-56, stage widths 16/32/64."""
    return CifarResNet(56, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet110")
def resnet110(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-110, stage widths 16/32/64."""
    return CifarResNet(110, _SMALL, num_classes=num_classes, **kw)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-8 at four times the width: stem 32, stages 64/128/256."""
    return CifarResNet(8, _X4, num_classes=num_classes, **kw)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100, **kw: Any) -> CifarResNet:
    """CIFAR ResNet-32 at four times the width: stem 32, stages 64/128/256."""
    return CifarResNet(32, _X4, num_classes=num_classes, **kw)
