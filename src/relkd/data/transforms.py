"""Normalisation constants and the standard train / test transform pipelines.

Every pipeline maps a PIL image to a normalised float tensor [C, H, W]. The train pipelines are
the ones the reference papers use (CRD / RepDistiller for CIFAR, the torchvision ImageNet recipe
for 224x224 data), so numbers stay comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torchvision import transforms as T

Transform = Callable[..., object]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of the training splits, as commonly quoted.
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)
STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)


def normalize_tail(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    """``[ToTensor(), Normalize(mean, std)]``: PIL uint8 [H, W, C] -> float [C, H, W]."""
    return [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]


def crop_flip_transforms(
    size: int,
    padding: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool = True,
    flip: bool = True,
    resize: int | None = None,
) -> tuple[Transform, Transform]:
    """(train, test) for small images: [Resize] + RandomCrop(size, padding) + HFlip + Normalize.

    This is the CRD CIFAR recipe (size 32, padding 4). ``resize`` first resizes the image to a
    ``resize`` x ``resize`` square (the RRD transfer probe feeds STL-10 / Tiny-ImageNet at 32x32).
    The test pipeline is [Resize] + ToTensor + Normalize. With ``augment=False`` train == test.
    """
    head: list[Transform] = [T.Resize((resize, resize))] if resize is not None else []
    test = T.Compose([*head, *normalize_tail(mean, std)])
    if not augment:
        return test, test
    aug: list[Transform] = []
    if padding > 0:
        aug.append(T.RandomCrop(size, padding=padding))
    if flip:
        aug.append(T.RandomHorizontalFlip())
    train = T.Compose([*head, *aug, *normalize_tail(mean, std)])
    return train, test


def imagenet_transforms(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    augment: bool = True,
) -> tuple[Transform, Transform]:
    """(train, test) of the torchvision ImageNet recipe.

    train: RandomResizedCrop(size) + RandomHorizontalFlip; test: Resize(size / 0.875) +
    CenterCrop(size) (256 / 224 at the default size). With ``augment=False`` train == test.
    """
    test = T.Compose(
        [T.Resize(round(size / 0.875)), T.CenterCrop(size), *normalize_tail(mean, std)]
    )
    if not augment:
        return test, test
    train = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize_tail(mean, std)]
    )
    return train, test
