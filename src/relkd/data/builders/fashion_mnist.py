"""Fashion-MNIST (28x28 grey, 10 classes) from its idx files; crop(28, pad 2) + flip."""

from __future__ import annotations

import gzip
import struct
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
    download_into,
    fixed_size,
    normalisation,
    register_dataset,
)
from relkd.registry import RelkdError

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _fashion_candidates(root: Path | None) -> list[Path]:
    bases = (
        [root] if root is not None else [FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"]
    )
    # torchvision downloads into <root>/FashionMNIST/raw
    return [p for b in bases for p in (b, b / "FashionMNIST" / "raw")]


def _locate_fashion(root: Path | None) -> dict[str, Path] | None:
    for folder in _fashion_candidates(root):
        found = {}
        for k, stem in _IDX_FILES.items():
            hits = [c for c in (folder / f"{stem}.gz", folder / stem) if c.is_file()]
            if hits:
                found[k] = hits[0]
        if len(found) == len(_IDX_FILES):
            return found
    return None


def write_example(folder: Path) -> Path:
    """Gzipped idx files (big-endian dims, magic 0x08 = ubyte) of a few random images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, stem in _IDX_FILES.items():
        n = 6 if k.startswith("train") else 3
        arr = (
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            if k.endswith("x")
            else (np.arange(n) % 10).astype(np.uint8)
        )
        header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(
            f">{arr.ndim}I", *arr.shape
        )
        with gzip.open(folder / f"{stem}.gz", "wb") as f:
            f.write(header + arr.tobytes())
    return folder


@register_dataset("fashion_mnist", example=write_example)
def build_fashion_mnist(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Fashion-MNIST (28x28 grey, 10 classes) from idx files; crop(28, pad 2) + flip."""
    name = "fashion_mnist"
    fixed_size(name, opts, 28)
    normalisation(name, opts, tf.FASHION_MNIST_MEAN, tf.FASHION_MNIST_STD, channels=1)
    files = _locate_fashion(root)
    if files is None and opts.download:
        from torchvision import datasets as tvd

        target = root if root is not None else cache_dir() / "fashion-mnist"
        for split in (True, False):
            download_into(
                name, target, lambda s=split: tvd.FashionMNIST(str(target), s, download=True)
            )
        files = _locate_fashion(target)
    if files is None:
        looked = ", ".join(str(p) for p in _fashion_candidates(root))
        raise RelkdError(
            f"{name}: the idx files ({', '.join(s + '[.gz]' for s in _IDX_FILES.values())}) "
            f"were not all found; looked in {looked}. Get them with "
            f"`apt-get install -y dataset-fashion-mnist` (installs {FASHION_MNIST_SYSTEM_DIR}), "
            "or pass download=True (config: data.download=true) to fetch them with torchvision."
        )
    arrays = {k: fmt.read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise RelkdError(
                f"{name}: {files[f'{split}_x']} / {files[f'{split}_y']} have shapes "
                f"{x.shape} / {y.shape}; expected [N, 28, 28] images and N labels"
            )
        if len(y) and int(y.max()) >= 10:
            raise RelkdError(
                f"{name}: {files[f'{split}_y']} has label {int(y.max())} (expected 0..9)"
            )
    train, test = ((arrays[f"{s}_x"][..., None], arrays[f"{s}_y"]) for s in ("train", "test"))
    stats = (tf.FASHION_MNIST_MEAN, tf.FASHION_MNIST_STD)
    return array_sets(name, opts, train, test, list(FASHION_MNIST_CLASSES), stats, 2)
