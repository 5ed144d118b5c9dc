"""CIFAR-10 and CIFAR-100 from torchvision's pickles (``cifar-10-batches-py``,
``cifar-100-python``); the CRD recipe crop(32, pad 4) + flip."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.kit import (
    BuildOptions,
    DataInfo,
    array_sets,
    cache_dir,
    download_into,
    fixed_size,
    register_dataset,
)
from relkd.registry import RelkdError

_CIFAR = {
    "cifar10": dict(
        base="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"], meta=("batches.meta", "label_names"), labels="labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", tv="CIFAR10",
        stats=(tf.CIFAR10_MEAN, tf.CIFAR10_STD),
    ),
    "cifar100": dict(
        base="cifar-100-python", train=["train"], test=["test"],
        meta=("meta", "fine_label_names"), labels="fine_labels",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", tv="CIFAR100",
        stats=(tf.CIFAR100_MEAN, tf.CIFAR100_STD),
    ),
}  # fmt: skip


def _build_cifar(
    name: str, root: Path | None, opts: BuildOptions
) -> tuple[Dataset, Dataset, DataInfo]:
    spec: dict[str, Any] = _CIFAR[name]
    fixed_size(name, opts, 32)
    base, (meta_file, meta_key) = spec["base"], spec["meta"]
    root = root if root is not None else cache_dir() / "cifar"
    # Accept the parent (torchvision's convention) or the unpacked folder itself.
    folder = root if (root / meta_file).is_file() and root.name == base else root / base
    needed = [*spec["train"], *spec["test"], meta_file]
    if opts.download and not all((folder / f).is_file() for f in needed):
        from torchvision import datasets as tvd

        cls = getattr(tvd, spec["tv"])
        download_into(name, root, lambda: cls(root=str(root), train=True, download=True))
        folder = root / base
    how = (
        "Pass download=True (config: data.download=true) to fetch it with torchvision, or "
        f"download {spec['url']} and unpack it into {root}."
    )
    if not root.exists():
        raise RelkdError(
            f"{name}: data root {root} does not exist (expected {root / base}/). {how}"
        )
    fmt.require_files(name, folder, needed, how)
    train = fmt.read_cifar_batches(name, folder, spec["train"], spec["labels"])
    test = fmt.read_cifar_batches(name, folder, spec["test"], spec["labels"])
    meta = fmt.unpickle_dict(folder / meta_file)
    if meta_key not in meta:
        raise RelkdError(f"{name}: {folder / meta_file} lacks '{meta_key}'")
    return array_sets(name, opts, train, test, fmt.names_of(meta[meta_key]), spec["stats"], 4)


def _write_example(name: str, folder: Path, classes: int) -> Path:
    """A few random images in the official pickle layout (bytes keys as re-pickled files)."""
    spec = _CIFAR[name]
    out = folder / spec["base"]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = spec["labels"].encode()
    for i, split in enumerate([*spec["train"], *spec["test"]]):
        y = [int(v) for v in (np.arange(4) + i) % classes]
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(out / split, "wb") as f:
            pickle.dump({b"data": x, labels: y}, f)
    meta_file, meta_key = spec["meta"]
    with open(out / meta_file, "wb") as f:
        pickle.dump({meta_key.encode(): [f"c{i}".encode() for i in range(classes)]}, f)
    return folder


def write_cifar10_example(folder: Path) -> Path:
    return _write_example("cifar10", folder, 10)


def write_cifar100_example(folder: Path) -> Path:
    return _write_example("cifar100", folder, 100)


@register_dataset("cifar10", example=write_cifar10_example)
def build_cifar10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` pickles; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar10", root, opts)


@register_dataset("cifar100", example=write_cifar100_example)
def build_cifar100(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-100 (fine labels) from ``cifar-100-python``; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar100", root, opts)
