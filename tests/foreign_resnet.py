"""A user's own CIFAR ResNet, written the way akamaster/pytorch_resnet_cifar10 writes it (option-A
shortcuts: stride-2 subsampling and zero-padded channels, no projection; ``linear`` head; trained
on CIFAR with ImageNet statistics). Tests name it by import path
(``tests.foreign_resnet:resnet8``), as a user names a model of their own package: relkd never
registers it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: The statistics akamaster's trainer normalises CIFAR with (ImageNet's), declared on the model
#: so that relkd re-normalises its inputs (relkd.models.normalization).
AKAMASTER_MEAN = (0.485, 0.456, 0.406)
AKAMASTER_STD = (0.229, 0.224, 0.225)

NOT_A_MODEL = 42  # for the "not a model" error


class LambdaLayer(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            pad = planes // 4  # option A: x[:, :, ::2, ::2] zero-padded to `planes` channels
            self.shortcut = LambdaLayer(
                lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """[B, 3, 32, 32] images normalised with :data:`AKAMASTER_MEAN` / ``_STD`` -> [B, classes]."""

    input_mean = AKAMASTER_MEAN
    input_std = AKAMASTER_STD

    def __init__(self, num_blocks: tuple[int, int, int] = (1, 1, 1), num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def resnet8(num_classes: int = 10) -> ResNet:
    return ResNet((1, 1, 1), num_classes)


def resnet20(num_classes: int = 10) -> ResNet:
    return ResNet((3, 3, 3), num_classes)


def small_cnn(num_classes: int = 10, in_chans: int = 3, width: int = 8) -> nn.Module:
    """A factory function that takes ``in_chans`` (relkd passes the data's channels)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )  # fmt: skip


def grey_net(num_classes: int = 10) -> nn.Module:
    """A factory for 1-channel images that takes no ``in_chans`` (relkd must not pass one)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, num_classes),
    )  # fmt: skip


def kwargs_net(**kwargs: int) -> nn.Module:
    """A ``**kwargs`` factory: it takes ``num_classes`` and ``in_chans`` through them (and
    fails loudly when either is missing)."""
    return nn.Sequential(
        nn.Conv2d(kwargs["in_chans"], 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, kwargs["num_classes"]),
    )  # fmt: skip


class BoomNet(nn.Module):
    """Takes 3-channel images (its first convolution says so) but its forward raises an error of
    its own code, unrelated to the input's shape."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")
