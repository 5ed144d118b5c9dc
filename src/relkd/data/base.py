"""The data-set interface: what a builder returns and receives, the registry, the two data sets.

:class:`DataInfo` describes a data set to models and loaders, :class:`BuildOptions` are the
options every builder receives, :data:`DATASETS` is the registry of builders (``Builder``:
``(root, opts) -> (train, test, DataInfo)``); :class:`ArrayImageDataset` (uint8 arrays in
memory, ``as_tensors()`` for the on-device loader) and :class:`FileImageDataset` (image files
decoded on every access) are what the built-in builders (:mod:`relkd.data.builders`) make.
Builders are written with the public kit :mod:`relkd.data.kit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from relkd import plugins as _plugins
from relkd.data.formats import load_image
from relkd.registry import Registry


@dataclass(frozen=True)
class DataInfo:
    """What a model and a loader need to know about a data set.

    Attributes:
        num_classes: number of labels (targets are ``0 .. num_classes - 1``).
        in_channels: image channels C (1 for Fashion-MNIST, 3 otherwise).
        image_size: side of the square images the model sees (after crop / resize).
        mean, std: per-channel normalisation used by the transforms (length C).
        classes: class names in label order, when known.
        name: the registry name of the data set.
        crop_padding: zero padding of the train RandomCrop (4 for CIFAR, 2 for Fashion-MNIST,
            size / 8 for STL-10, Tiny-ImageNet and folder_jpg; 0 for the RandomResizedCrop
            recipes), for loaders that redo the augmentation themselves.
        notes: what the builder chose that the user should hear (said once before training),
            e.g. imagefolder training small images at their own size.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None
    name: str = ""
    crop_padding: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildOptions:
    """Options every builder receives (see :func:`relkd.data.datasets.build_datasets`)."""

    download: bool = False
    augment: bool = True
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


Builder = Callable[[Path | None, BuildOptions], "tuple[Dataset, Dataset, DataInfo]"]
DATASETS: Registry[Builder] = Registry("dataset", check=_plugins.check_dataset)
#: name -> writer of tiny example files in the data set's real on-disk format,
#: ``example(folder) -> root to build from`` (set by ``relkd.data.kit.register_dataset``).
EXAMPLES: dict[str, Callable[[Path], Path]] = {}


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 [N, H, W, C] with int64 targets [N].

    ``__getitem__`` gives ``(transform(PIL image), int label)`` like torchvision's CIFAR10.
    ``padding`` / ``flip`` / ``augment`` describe the train augmentation (RandomCrop with zero
    padding + RandomHorizontalFlip) so that :class:`~relkd.data.memory.InMemoryLoader` can redo
    it on the device.
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: np.ndarray,
        *,
        transform: Callable[[Image.Image], Any],
        mean: Sequence[float],
        std: Sequence[float],
        classes: list[str] | None = None,
        augment: bool = False,
        padding: int = 0,
        flip: bool = False,
    ) -> None:
        if data.dtype != np.uint8 or data.ndim != 4:
            raise ValueError(f"data must be uint8 [N, H, W, C], got {data.dtype} {data.shape}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} targets")
        self.data = np.ascontiguousarray(data)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.classes = classes
        self.augment = augment
        self.padding = padding
        self.flip = flip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        arr = self.data[i]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        return self.transform(img), int(self.targets[i])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set: images uint8 [N, C, H, W] (not normalised) and targets int64 [N]."""
        images = torch.from_numpy(self.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(self.targets.copy())

    def __repr__(self) -> str:
        n, h, w, c = self.data.shape
        return f"{type(self).__name__}(n={n}, shape=[{c}, {h}, {w}], augment={self.augment})"


class FileImageDataset(Dataset):
    """Images decoded from files on every access: ``samples`` is a list of (path, label)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        transform: Callable[[Image.Image], Any],
        classes: list[str] | None = None,
    ) -> None:
        self.samples = samples
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        return self.transform(load_image(path)), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={len(self.classes or [])})"
