"""Same-size JPEGs in class folders, decoded once, cached and held in memory (e.g. CIFAR-10 as
JPEG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.kit import (
    BuildOptions,
    DataInfo,
    array_sets,
    cache_dir,
    class_folder_splits,
    fixed_size,
    register_dataset,
    save_jpg,
)
from relkd.registry import RelkdError

_FOLDER_HOW = (
    "Expected class folders <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg "
    "(e.g. CIFAR-10 as JPEG files)."
)


def write_example(folder: Path) -> Path:
    """Two classes of 32x32 JPEGs in train/ and test/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "dog"):
            for k in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                save_jpg(folder / split / c / f"{k:04d}.jpg", img)
    return folder


@register_dataset("folder_jpg", example=write_example)
def build_folder_jpg(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Same-size images in root/{train,test}/<class>/*.jpg, decoded once and held in memory.

    The decoded arrays are cached in :func:`cache_dir` under a key made of the root and a hash of
    every file's path, size, mtime and ctime, so any change to the files invalidates the cache.
    32x32 images get the CIFAR-10 recipe (crop 32 pad 4 + flip, CIFAR-10 mean/std); other sizes
    crop with padding size/8 and use the train split's own per-channel mean/std.
    """
    name = "folder_jpg"
    classes, train_s, test_s = class_folder_splits(name, root, ("test",), _FOLDER_HOW)
    xtr, ytr, xte, yte = fmt.load_or_decode_folder(
        name, root, train_s, test_s, classes, cache_dir()
    )  # type: ignore[arg-type]
    h, w, c = xtr.shape[1:]
    if h != w:
        raise RelkdError(f"{name}: images must be square, got {w}x{h}")
    fixed_size(name, opts, h)
    cifar = h == 32 and c == 3
    stats = (tf.CIFAR10_MEAN, tf.CIFAR10_STD) if cifar else fmt.channel_stats(xtr)
    return array_sets(name, opts, (xtr, ytr), (xte, yte), classes, stats, max(1, h // 8))
