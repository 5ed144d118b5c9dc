"""MobileNetV2 for CIFAR at width 0.5 (``MobileNetV2`` = CRD's ``mobile_half``).

Architecture: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR
2018, in the CIFAR form used by the CRD benchmark (Tian et al., "Contrastive Representation
Distillation", arXiv 1910.10699): stride-2 stem, expansion 6, width 0.5, a 1280-channel head.
Module names (``conv1``, ``blocks.{i}.{j}.conv.{k}``, ``conv2``, ``classifier.0``) match the
RepDistiller / mdistiller checkpoints. Unlike torchvision, the first (expansion-1) block keeps its
1x1 expansion convolution, as in those checkpoints.

Tapped stages (``feature_info``): ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6`` -- the
linear-bottleneck outputs (no ReLU) at reductions 2, 4, 8, 16, RepDistiller's ``f1``..``f4``.
``conv2`` gives the post-ReLU 1280-channel map that is average-pooled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - ReLU - 3x3 depthwise - ReLU - 1x1 project (linear), residual when shapes allow.

    The eight layers live in ``self.conv`` (indices 0..7, the checkpoint layout).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2.

    Args:
        expand_ratio: expansion factor T of all but the first stage.
        width_mult: channel multiplier (0.5 for the CRD zoo).
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(
        self,
        expand_ratio: int = 6,
        width_mult: float = 0.5,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        t = expand_ratio
        # (expansion, channels, repeats, first stride) per stage
        setting = [
            (1, 16, 1, 1),
            (t, 24, 2, 1),
            (t, 32, 3, 2),
            (t, 64, 4, 2),
            (t, 96, 3, 1),
            (t, 160, 3, 2),
            (t, 320, 1, 1),
        ]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, cin, 3, 2)
        self.blocks = nn.ModuleList()
        widths = []
        for e, c, n, s in setting:
            cout = int(c * width_mult)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(cin, cout, s if i == 0 else 1, e))
                cin = cout
            self.blocks.append(nn.Sequential(*stage))
            widths.append(cout)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        self.classifier_name = "classifier.0"
        self.feature_info = [
            FeatureInfo("blocks.1", widths[1], 2),
            FeatureInfo("blocks.2", widths[2], 4),
            FeatureInfo("blocks.4", widths[4], 8),
            FeatureInfo("blocks.6", widths[6], 16),
        ]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_model("mobile_half")
@register_model("MobileNetV2")
def mobile_half(num_classes: int = 100, **kw: Any) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6 (CRD's ``mobile_half``)."""
    return MobileNetV2(6, 0.5, num_classes=num_classes, **kw)
