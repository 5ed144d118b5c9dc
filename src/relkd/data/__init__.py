"""Data sets, transforms and loaders.

``build_datasets(name, root) -> (train, test, DataInfo)`` builds any registered data set
(:data:`DATASETS`); in-memory ones also feed :class:`InMemoryLoader`, which keeps the whole split
on the device and augments batches there. :class:`IndexedDataset` + :func:`collate_with_extras`
carry per-sample extras (the sample index for memory banks) through a ``DataLoader``;
:func:`split_train_val` holds out a stratified validation split (``data.val_split``).
"""

from relkd.data.base import (
    DATASETS,
    EXAMPLES,
    ArrayImageDataset,
    BuildOptions,
    DataInfo,
    FileImageDataset,
)
from relkd.data.datasets import build_datasets
from relkd.data.formats import load_image, read_idx
from relkd.data.kit import cache_dir, register_dataset
from relkd.data.memory import InMemoryLoader, supports_in_memory, to_tensors
from relkd.data.wrappers import (
    IndexedDataset,
    cap_subset,
    collate_with_extras,
    get_targets,
    split_train_val,
    take_subset,
)

__all__ = [
    "DATASETS",
    "EXAMPLES",
    "ArrayImageDataset",
    "BuildOptions",
    "DataInfo",
    "FileImageDataset",
    "InMemoryLoader",
    "IndexedDataset",
    "build_datasets",
    "cache_dir",
    "cap_subset",
    "collate_with_extras",
    "get_targets",
    "load_image",
    "read_idx",
    "register_dataset",
    "split_train_val",
    "supports_in_memory",
    "take_subset",
    "to_tensors",
]
