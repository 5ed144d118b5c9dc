"""Data sets, transforms and loaders.

``build_datasets(name, root) -> (train, test, DataInfo)`` builds any registered data set
(:data:`DATASETS`); in-memory ones also feed :class:`InMemoryLoader`, which keeps the whole split
on the device and augments batches there. :class:`IndexedDataset` + :func:`collate_with_extras`
carry per-sample extras (the sample index for memory banks) through a ``DataLoader``.
"""

from relkd.data.datasets import (
    DATASETS,
    ArrayImageDataset,
    BuildOptions,
    DataInfo,
    FileImageDataset,
    build_datasets,
    cache_dir,
    load_image,
    read_idx,
)
from relkd.data.memory import InMemoryLoader, supports_in_memory, to_tensors
from relkd.data.wrappers import IndexedDataset, collate_with_extras, get_targets, take_subset

__all__ = [
    "DATASETS",
    "ArrayImageDataset",
    "BuildOptions",
    "DataInfo",
    "FileImageDataset",
    "InMemoryLoader",
    "IndexedDataset",
    "build_datasets",
    "cache_dir",
    "collate_with_extras",
    "get_targets",
    "load_image",
    "read_idx",
    "supports_in_memory",
    "take_subset",
    "to_tensors",
]
