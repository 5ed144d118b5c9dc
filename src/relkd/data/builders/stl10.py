"""STL-10 labelled splits from ``stl10_binary`` (5000 train / 8000 test, 96x96)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.kit import BuildOptions, DataInfo, array_sets, locate_root, register_dataset

STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
_STL_HOW = (
    "Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and unpack it into "
    "root (giving root/stl10_binary/{train,test}_{X,y}.bin)."
)


def write_example(folder: Path) -> Path:
    """stl10_binary/{train,test}_{X,y}.bin: column-major channels, 1-based labels."""
    out = folder / "stl10_binary"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        imgs = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [N, C, H, W]
        (out / f"{split}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())
        (out / f"{split}_y.bin").write_bytes((np.arange(n, dtype=np.uint8) % 10 + 1).tobytes())
    return folder


@register_dataset("stl10", example=write_example)
def build_stl10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """STL-10 labelled splits (5000 train / 8000 test, 96x96); ``image_size`` resizes (bilinear).

    The resize is done once at load time (the same PIL bilinear resize ``transforms.Resize``
    applies), so the sets stay in memory and support ``as_tensors``. Train: RandomCrop(size,
    pad size/8) + flip (32 -> pad 4, the RRD probe recipe).
    """
    name = "stl10"
    root = locate_root(name, root, "stl10", ".", ".", _STL_HOW)
    folder = root if root.name == "stl10_binary" else root / "stl10_binary"
    fmt.require_dir(name, folder, "folder stl10_binary", _STL_HOW)
    bins = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    fmt.require_files(name, folder, bins, _STL_HOW)
    size = opts.image_size or 96
    splits = []
    for split in ("train", "test"):
        x, y = fmt.read_stl10_split(folder, split)
        splits.append((fmt.resize_all(x, size) if size != 96 else x, y))
    classes = list(STL10_CLASSES)
    if (folder / "class_names.txt").is_file():
        lines = (folder / "class_names.txt").read_text().splitlines()
        classes = [ln.strip() for ln in lines if ln.strip()]
    stats = (tf.STL10_MEAN, tf.STL10_STD)
    return array_sets(name, opts, *splits, classes, stats, max(1, size // 8), num_classes=10)
