"""VGG with batch norm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19) of the CRD protocol.

Architecture: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, in the CIFAR form of the CRD benchmark (Tian et al., "Contrastive
Representation Distillation", arXiv 1910.10699): five conv blocks, no hidden FC layers, global
average pool and one ``classifier`` Linear. ``vgg8`` etc. here are RepDistiller's ``vgg8_bn`` etc.;
the parameter names (``block{i}.{j}``, ``classifier``) match its checkpoints.

Tapped stages (``feature_info``): ``act1`` .. ``act4`` -- parameter-free ReLU modules applied to
the outputs of ``block1`` .. ``block4`` (the blocks end with a BN, so tapping ``block{i}`` gives
the pre-activation map instead). ``act0`` (block0, 64 channels, full resolution) is tappable too.
At 32x32 the pooling after ``block3`` is skipped (as in RepDistiller; it is applied for 64x64
inputs), so ``act3`` and ``act4`` share reduction 8.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model

#: Conv widths per block, for each depth.
CONFIGS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    """conv3x3(+bias)-BN-ReLU repeated, without the final ReLU (applied by the caller)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five VGG blocks with max-pooling in between, global average pool and ``classifier``.

    Args:
        cfg: conv widths per block (five lists).
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_chans: int = 3) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG needs five blocks, got {len(cfg)}")
        cins = [in_chans] + [c[-1] for c in cfg[:-1]]
        self.block0 = _block(cfg[0], cins[0])
        self.block1 = _block(cfg[1], cins[1])
        self.block2 = _block(cfg[2], cins[2])
        self.block3 = _block(cfg[3], cins[3])
        self.block4 = _block(cfg[4], cins[4])
        self.act0, self.act1, self.act2, self.act3, self.act4 = (nn.ReLU() for _ in range(5))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        self.classifier_name = "classifier"
        self.feature_info = [
            FeatureInfo("act1", cfg[1][-1], 2),
            FeatureInfo("act2", cfg[2][-1], 4),
            FeatureInfo("act3", cfg[3][-1], 8),
            FeatureInfo("act4", cfg[4][-1], 8),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        large = x.shape[2] == 64
        x = self.pool0(self.act0(self.block0(x)))
        x = self.pool1(self.act1(self.block1(x)))
        x = self.pool2(self.act2(self.block2(x)))
        x = self.act3(self.block3(x))
        if large:
            x = self.pool3(x)
        x = self.act4(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


@register_model("vgg8")
def vgg8(num_classes: int = 100, **kw: Any) -> VGG:
    """VGG-8 with BN (one conv per block)."""
    return VGG(CONFIGS[8], num_classes=num_classes, **kw)


@register_model("vgg11")
def vgg11(num_classes: int = 100, **kw: Any) -> VGG:
    """VGG-11 with BN (configuration A)."""
    return VGG(CONFIGS[11], num_classes=num_classes, **kw)


@register_model("vgg13")
def vgg13(num_classes: int = 100, **kw: Any) -> VGG:
    """VGG-13 with BN (configuration B)."""
    return VGG(CONFIGS[13], num_classes=num_classes, **kw)


@register_model("vgg16")
def vgg16(num_classes: int = 100, **kw: Any) -> VGG:
    """VGG-16 with BN (configuration D)."""
    return VGG(CONFIGS[16], num_classes=num_classes, **kw)


@register_model("vgg19")
def vgg19(num_classes: int = 100, **kw: Any) -> VGG:
    """VGG-19 with BN (configuration E)."""
    return VGG(CONFIGS[19], num_classes=num_classes, **kw)
