"""Small plain CNNs for 28x28 grey images (Fashion-MNIST / MNIST), fast enough for CPU demos.

Plain VGG-style stacks (Simonyan & Zisserman, ICLR 2015): conv3x3-BN-ReLU stages with 2x2
max-pooling, global average pooling and one Linear classifier ``fc``. They work at any input
size >= 8x8 and take ``in_chans`` (default 1, grey). Used as the teacher / student pair of the
CPU demo (the CIFAR zoo of the CRD protocol, Tian et al., arXiv 1910.10699, is in
:mod:`relkd.models.cifar`).

- ``cnn_small`` (teacher, ~0.39M parameters at 10 classes): stages 32/64/128/256; the first three
  end with a max-pool, so at 28x28 the maps are 14, 7, 3, 3 pixels wide.
- ``cnn_tiny`` (student, ~24k parameters at 10 classes): stages 16/32/64, each ending with a
  max-pool (14, 7, 3 pixels at 28x28), so its last stage matches the teacher's last two in size.

Tapped stages (``feature_info``): ``stage1`` ... -- each stage's output after ReLU (and after its
max-pool where it has one). Reductions are given for a 32x32 input, like the rest of the zoo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureInfo
from relkd.models.registry import register_model


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU(-maxpool) stages ``stage1`` .. ``stageN``, global average pool, ``fc``.

    Args:
        widths: output channels of each stage.
        pool: whether each stage ends with a 2x2 max-pool (same length as ``widths``).
        num_classes: classifier width.
        in_chans: input channels.
    """

    def __init__(
        self,
        widths: Sequence[int],
        pool: Sequence[bool],
        num_classes: int = 100,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != len(pool) or not widths:
            raise ValueError(f"widths {widths} and pool {pool} must be non-empty, same length")
        self.feature_info: list[FeatureInfo] = []
        cin, reduction = in_chans, 1
        for i, (w, p) in enumerate(zip(widths, pool)):
            layers: list[nn.Module] = [
                nn.Conv2d(cin, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(),
            ]
            if p:
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
            self.add_module(f"stage{i + 1}", nn.Sequential(*layers))
            self.feature_info.append(FeatureInfo(f"stage{i + 1}", w, reduction))
            cin = w
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.classifier_name = "fc"

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("cnn_small")
def cnn_small(num_classes: int = 100, in_chans: int = 1, **kw: Any) -> SmallCNN:
    """Teacher-size CNN: stages 32/64/128/256 (pool after the first three), ~0.39M parameters."""
    return SmallCNN(
        (32, 64, 128, 256), (True, True, True, False), num_classes, in_chans=in_chans, **kw
    )


@register_model("cnn_tiny")
def cnn_tiny(num_classes: int = 100, in_chans: int = 1, **kw: Any) -> SmallCNN:
    """Student-size CNN: stages 16/32/64, each followed by a max-pool, ~24k parameters."""
    return SmallCNN((16, 32, 64), (True, True, True), num_classes, in_chans=in_chans, **kw)
