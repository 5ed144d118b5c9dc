"""Data sets by name: ``build_datasets("cifar100", root) -> (train, test, DataInfo)``.

Every data set yields ``(image float [C, H, W] normalised, int label)``. The on-disk formats are
read by :mod:`relkd.data.formats` (CIFAR pickles, idx files, STL-10 binaries, class folders, the
CUB and Tiny-ImageNet index files), so that missing or broken files fail with a
:class:`RelkdError` that names the path, what was expected there and how to get the data.

Data sets small enough to hold in memory (cifar10, cifar100, fashion_mnist, stl10, folder_jpg)
are :class:`ArrayImageDataset` and expose ``as_tensors() -> (uint8 [N, C, H, W], int64 [N])``
for the on-device :class:`relkd.data.memory.InMemoryLoader`.

:func:`split_train_val` holds out a stratified validation split of the training set (seen with
the test-time transform), for choosing between variants without touching the test set;
``build_datasets(..., val_split=, val_seed=, test_subset=)`` applies it (and caps the evaluation
set) at build time.

Add a data set without editing the library: write a builder with the public kit
(:mod:`relkd.data.kit`) and register it with its example writer::

    @register_dataset("mydata", example=write_example)
    def build_mydata(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
        ...

Code layout: :class:`DataInfo`, :class:`BuildOptions`, the :data:`DATASETS` registry and the two
data set classes are in :mod:`relkd.data.base`; the builder kit in :mod:`relkd.data.kit`; the
built-in builders one file each in :mod:`relkd.data.builders` (all imported, so registered,
with this module); this module holds :func:`build_datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

import relkd.data.builders  # noqa: F401  (the built-in builders register themselves)
from relkd.data.base import DATASETS, BuildOptions, DataInfo
from relkd.data.wrappers import cap_subset, split_train_val
from relkd.registry import RelkdError


def build_datasets(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    augment: bool = True,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    val_split: float | None = None,
    val_seed: int = 0,
    test_subset: int | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """Build ``(train, evaluation set, info)`` for the registered data set ``name``.

    Args:
        name: a key of :data:`DATASETS` (``relkd list datasets``); case-insensitive.
        root: where the data lives; ``None`` uses the data set's default location under
            :func:`cache_dir` (Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist).
        download: fetch the data with torchvision when it is missing (CIFAR, Fashion-MNIST).
        augment: use the train augmentation on the train split (the test split never augments).
        image_size: side of the images the model sees; resizes STL-10 / Tiny-ImageNet (the RRD
            transfer probe uses 32), sets the crop size of imagefolder / cub200 (default 224).
        mean, std: override the normalisation (e.g. the backbone's statistics in a transfer
            probe); default: the data set's own.
        val_split: hold out this fraction of the training set, stratified by class
            (:func:`split_train_val`): the train set is then the rest and the evaluation set
            is the held-out part (test-time transform); the test set is not returned.
        val_seed: the seed that alone fixes the held-out split.
        test_subset: cap the evaluation set at this many samples (stratified, fixed; smoke runs).

    Returns:
        train and evaluation data sets yielding ``(image float [C, H, W], int label)`` and the
        :class:`DataInfo` describing them.
    """
    builder = DATASETS.get(name)
    if (mean is None) != (std is None):
        raise RelkdError("give both mean and std to override the normalisation, or neither")
    if image_size is not None and image_size <= 0:
        raise RelkdError(f"image_size must be positive, got {image_size}")
    opts = BuildOptions(
        download=download,
        augment=augment,
        image_size=image_size,
        mean=tuple(float(m) for m in mean) if mean is not None else None,
        std=tuple(float(s) for s in std) if std is not None else None,
    )
    where = Path(root).expanduser() if root is not None else None
    if ":" not in name:  # a built-in or registered builder: its own errors are bugs to see
        train, test, info = builder(where, opts)
    else:  # named by import path: anything callable resolves, so check it is a builder
        try:
            train, test, info = builder(where, opts)
            if not isinstance(info, DataInfo):
                raise TypeError(f"its third value is a {type(info).__name__}, not a DataInfo")
        except (TypeError, ValueError) as e:
            raise RelkdError(
                f"data set {name!r} is not a data-set builder: calling it as "
                f"builder(root, BuildOptions) -> (train, test, DataInfo) failed: {e}"
            ) from None
    if val_split is not None:
        train, test = split_train_val(train, test, val_split, seed=val_seed)
    if test_subset is not None:
        test = cap_subset(test, test_subset)
    return train, test, info
