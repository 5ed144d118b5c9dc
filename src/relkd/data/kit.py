"""The builder kit: what a data set builder uses, public (the built-in builders in
:mod:`relkd.data.builders` use nothing else).

A builder is ``(root: Path | None, opts: BuildOptions) -> (train, test, DataInfo)``, registered
with :func:`register_dataset` together with a writer of tiny example files in the data set's
real on-disk format (``tests/data/test_registry.py`` builds every registered data set from
them, so a new data set is covered without a test edit)::

    from relkd.data.kit import BuildOptions, array_sets, register_dataset

    def write_example(folder: Path) -> Path:   # a few images, the real file format
        ...
        return folder                          # the root to build from

    @register_dataset("mydata", example=write_example)
    def build_mydata(root, opts):
        x, y = read_my_files(root)             # uint8 [N, H, W, C], int labels
        return array_sets("mydata", opts, (x, y), (xt, yt), classes, (mean, std), padding=4)

Put the file in ``relkd/data/builders/`` (imported automatically) or import it yourself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.base import (
    DATASETS,
    EXAMPLES,
    ArrayImageDataset,
    Builder,
    BuildOptions,
    DataInfo,
    FileImageDataset,
)
from relkd.registry import RelkdError

__all__ = [
    "DATASETS",
    "EXAMPLES",
    "IMAGENET_STATS",
    "ArrayImageDataset",
    "BuildOptions",
    "Builder",
    "DataInfo",
    "FileImageDataset",
    "array_sets",
    "cache_dir",
    "class_folder_splits",
    "download_into",
    "file_sets",
    "fixed_size",
    "locate_root",
    "normalisation",
    "register_dataset",
    "save_jpg",
]

#: ImageNet's mean / std (the file-based builders' default normalisation).
IMAGENET_STATS = (tf.IMAGENET_MEAN, tf.IMAGENET_STD)


def register_dataset(
    name: str, *, example: Callable[[Path], Path] | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder under ``name`` (case-insensitive) with its example writer:
    ``example(folder) -> root`` writes tiny files in the real on-disk format under ``folder``
    and returns the root to build from."""

    def deco(fn: Builder) -> Builder:
        DATASETS.register(name)(fn)
        if example is not None:
            EXAMPLES[name.lower()] = example
        return fn

    return deco


def cache_dir() -> Path:
    """relkd's cache folder: ``$RELKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/relkd``, else
    ``~/.cache/relkd``."""
    env = os.environ.get("RELKD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "relkd"


def normalisation(
    name: str, opts: BuildOptions, mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple, tuple]:
    """The normalisation (``opts`` overrides the data set's own), checked against the channels."""
    m = opts.mean if opts.mean is not None else tuple(mean)
    s = opts.std if opts.std is not None else tuple(std)
    if len(m) != channels:
        raise RelkdError(
            f"{name}: mean/std have {len(m)} values but the images have {channels} channels"
        )
    return m, s


def fixed_size(name: str, opts: BuildOptions, native: int) -> int:
    """``native``, the only image size a fixed-size data set supports (``opts.image_size`` must
    be unset or equal)."""
    if opts.image_size is not None and opts.image_size != native:
        raise RelkdError(
            f"{name} images are {native}x{native}; image_size={opts.image_size} is not supported "
            f"for it (leave image_size unset)"
        )
    return native


def locate_root(
    name: str, root: Path | None, default: str, marker: str, sub: str, how: str
) -> Path:
    """The data root: ``root`` (default ``cache_dir() / default``) or its ``sub`` folder when
    ``marker`` is only found there; it must exist (else ``how`` says how to get the data)."""
    root = root if root is not None else cache_dir() / default
    if not (root / marker).exists() and (root / sub / marker).exists():
        root = root / sub
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {how}")
    return root


def download_into(name: str, target: Path, fetch: Callable[[], Any]) -> None:
    """Run ``fetch`` (e.g. a torchvision download); a failure is one line naming ``target``."""
    try:
        fetch()
    except Exception as e:
        raise RelkdError(f"{name}: download into {target} failed: {e}") from e


def array_sets(
    name: str,
    opts: BuildOptions,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    base: tuple[Sequence[float], Sequence[float]],
    padding: int,
    num_classes: int | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """In-memory ``(train, test, info)`` from uint8 [N, H, W, C] arrays with the crop + flip
    train pipeline (``opts.augment``) and the normalisation ``base`` (or ``opts``')."""
    h, c = train[0].shape[1], train[0].shape[3]
    mean, std = normalisation(name, opts, *base, channels=c)
    aug = opts.augment
    train_tf, test_tf = tf.crop_flip_transforms(h, padding, mean, std, augment=aug)
    common = dict(mean=mean, std=std, classes=classes)
    sets = [
        ArrayImageDataset(
            x, y, transform=t, augment=a, padding=padding if a else 0, flip=a, **common
        )
        for (x, y), t, a in ((train, train_tf if aug else test_tf, aug), (test, test_tf, False))
    ]
    info = DataInfo(num_classes or len(classes), c, h, mean, std, classes, name, padding)
    return sets[0], sets[1], info


def file_sets(
    name: str,
    opts: BuildOptions,
    train_s: list[tuple[str, int]],
    test_s: list[tuple[str, int]],
    classes: list[str] | None,
    num_classes: int,
    base: tuple[Sequence[float], Sequence[float]],
    size: int,
    padding: int | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """File-backed ``(train, test, info)``: the ImageNet recipe (``padding=None``), else
    [Resize] + RandomCrop(size, padding) + flip (Tiny-ImageNet's native 64 is not resized)."""
    mean, std = normalisation(name, opts, *base, channels=3)
    if padding is None:
        train_tf, test_tf = tf.imagenet_transforms(size, mean, std, augment=opts.augment)
    else:
        resize = size if size != 64 else None
        train_tf, test_tf = tf.crop_flip_transforms(
            size, padding, mean, std, augment=opts.augment, resize=resize
        )
    train = FileImageDataset(train_s, transform=train_tf, classes=classes)
    test = FileImageDataset(test_s, transform=test_tf, classes=classes)
    return train, test, DataInfo(num_classes, 3, size, mean, std, classes, name, padding or 0)


def class_folder_splits(
    name: str, root: Path | None, eval_dirs: Sequence[str], how: str
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Classes and (path, label) samples of ``root/train`` and the first existing eval split
    (the first of ``eval_dirs`` when none exists, for the error message)."""
    if root is None:
        raise RelkdError(f"{name}: give the data root (config: data.root). {how}")
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {how}")
    eval_dir = next((root / d for d in eval_dirs if (root / d).is_dir()), root / eval_dirs[0])
    classes, train_s = fmt.scan_class_folders(name, root / "train", how)
    idx = {c: i for i, c in enumerate(classes)}
    _, test_s = fmt.scan_class_folders(name, eval_dir, how, class_to_idx=idx)
    return classes, train_s, test_s


def save_jpg(path: Path, arr: np.ndarray) -> None:
    """Write uint8 [H, W, 3] as a JPEG (example writers), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
