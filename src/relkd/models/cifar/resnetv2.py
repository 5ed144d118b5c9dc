"""ResNet18/34/50 with a CIFAR stem (3x3 stride-1 convolution, no max-pool), four stages.

Architecture: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, with the
ImageNet stem replaced for 32x32 inputs. This is the "resnetv2" family of the CRD benchmark
(Tian et al., "Contrastive Representation Distillation", arXiv 1910.10699); parameter names match
its code release (RepDistiller) and mdistiller, so their ``ResNet50`` teacher loads with
``strict=True``.

Tapped stages (``feature_info``): ``layer1`` .. ``layer4`` -- each stage's output after the final
ReLU of its last block (reductions 1, 2, 4, 8 at 32x32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Empty ``Sequential`` (identity) or a strided 1x1 projection with BN."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, plus shortcut; ReLU after the sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_planes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ResNetV2(nn.Module):
    """Four-stage ResNet (widths 64/128/256/512) with a CIFAR stem and a ``linear`` classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage.
        num_classes: classifier width.
        in_chans: input channels.
        zero_init_residual: start each residual branch's last BN at zero (Goyal et al. 2017).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 100,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = (64, 128, 256, 512)
        strides = (1, 2, 2, 2)
        self.layer1 = self._make_layer(block, widths[0], num_blocks[0], strides[0])
        self.layer2 = self._make_layer(block, widths[1], num_blocks[1], strides[1])
        self.layer3 = self._make_layer(block, widths[2], num_blocks[2], strides[2])
        self.layer4 = self._make_layer(block, widths[3], num_blocks[3], strides[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        self.classifier_name = "linear"
        self.feature_info = [
            FeatureInfo(f"layer{i + 1}", w * block.expansion, r)
            for i, (w, r) in enumerate(zip(widths, (1, 2, 4, 8)))
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("ResNet18")
def ResNet18(num_classes: int = 100, **kw: Any) -> ResNetV2:
    """ResNet-18 (basic blocks 2-2-2-2) with a CIFAR stem."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **kw)


@register_model("ResNet34")
def ResNet34(num_classes: int = 100, **kw: Any) -> ResNetV2:
    """ResNet-34 (basic blocks 3-4-6-3) with a CIFAR stem."""
    return ResNetV2(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, **kw)


@register_model("ResNet50")
def ResNet50(num_classes: int = 100, **kw: Any) -> ResNetV2:
    """ResNet-50 (bottlenecks 3-4-6-3) with a CIFAR stem; CRD's ``ResNet50`` teacher."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, **kw)
