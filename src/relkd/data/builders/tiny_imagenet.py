"""Tiny-ImageNet-200 (64x64, 100k train / 10k val) from its folders and val annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.kit import (
    BuildOptions,
    DataInfo,
    file_sets,
    locate_root,
    register_dataset,
    save_jpg,
)
from relkd.registry import RelkdError

_TINY_HOW = (
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unpack it; root is the "
    "tiny-imagenet-200 folder (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
    "val/val_annotations.txt)."
)


def write_example(folder: Path) -> Path:
    """tiny-imagenet-200/ with 3 wnids, 2 train images each and 3 annotated val images."""
    root = folder / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]  # unsorted, as a real wnids.txt may be
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    for w in wnids:
        for k in range(2):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            save_jpg(root / "train" / w / "images" / f"{w}_{k}.JPEG", img)
    ann = []
    for k, w in enumerate(wnids):
        save_jpg(root / "val" / "images" / f"val_{k}.JPEG",
                 rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # fmt: skip
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return folder


@register_dataset("tiny_imagenet", example=write_example)
def build_tiny_imagenet(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Tiny-ImageNet-200 (64x64, 100k train / 10k val); ``image_size`` resizes first.

    Train: [Resize] + RandomCrop(size, pad size/8) + flip. Classes are the sorted wnids.
    """
    name = "tiny_imagenet"
    root = locate_root(name, root, "tiny-imagenet-200", "wnids.txt", "tiny-imagenet-200", _TINY_HOW)
    fmt.require_files(name, root, ["wnids.txt", "val/val_annotations.txt"], _TINY_HOW)
    fmt.require_dir(name, root / "train", "train folder", _TINY_HOW)
    fmt.require_dir(name, root / "val" / "images", "val image folder", _TINY_HOW)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    idx = {w: i for i, w in enumerate(wnids)}
    train_s: list[tuple[str, int]] = []
    for w in wnids:
        d = root / "train" / w / "images"
        fmt.require_dir(name, d, f"train images of class {w}", _TINY_HOW)
        train_s.extend((f, idx[w]) for f in fmt.image_files(d))
    test_s = fmt.read_tiny_val(name, root, idx, _TINY_HOW)
    if not train_s:
        raise RelkdError(f"{name}: no train images under {root / 'train'}. {_TINY_HOW}")
    size = opts.image_size or 64
    stats = (tf.TINY_IMAGENET_MEAN, tf.TINY_IMAGENET_STD)
    return file_sets(name, opts, train_s, test_s, wnids, len(wnids), stats, size, max(1, size // 8))
