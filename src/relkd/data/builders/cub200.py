"""CUB-200-2011 birds (200 classes, 5994 train / 5794 test) from its index files; ImageNet
transforms at 224."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data.kit import (
    IMAGENET_STATS,
    BuildOptions,
    DataInfo,
    file_sets,
    locate_root,
    register_dataset,
    save_jpg,
)
from relkd.registry import RelkdError

_CUB_HOW = (
    "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and unpack it; "
    "root is the CUB_200_2011 folder (images.txt, train_test_split.txt, image_class_labels.txt, "
    "images/)."
)


def write_example(folder: Path) -> Path:
    """CUB_200_2011/ with 5 images of 3 classes (1-based ids, as the official files)."""
    root = folder / "CUB_200_2011"
    rows = [(1, 1, 1), (2, 1, 0), (3, 2, 1), (4, 3, 0), (5, 3, 1)]  # id, class, is_train
    rng = np.random.default_rng(0)
    img, split, lab = [], [], []
    for i, c, tr in rows:
        rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"
        save_jpg(root / "images" / rel, rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
        img.append(f"{i} {rel}")
        split.append(f"{i} {tr}")
        lab.append(f"{i} {c}")
    (root / "images.txt").write_text("\n".join(img) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lab) + "\n")
    (root / "classes.txt").write_text("1 001.Bird_1\n2 002.Bird_2\n3 003.Bird_3\n")
    return folder


@register_dataset("cub200", example=write_example)
def build_cub200(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CUB-200-2011 birds (200 classes, 5994 train / 5794 test); ImageNet transforms at 224."""
    name = "cub200"
    root = locate_root(name, root, "CUB_200_2011", "images.txt", "CUB_200_2011", _CUB_HOW)
    tables = ["images.txt", "train_test_split.txt", "image_class_labels.txt"]
    fmt.require_files(name, root, tables, _CUB_HOW)
    fmt.require_dir(name, root / "images", "image folder", _CUB_HOW)
    images, split, labels = (fmt.read_id_table(name, root / t) for t in tables)
    train_s: list[tuple[str, int]] = []
    test_s: list[tuple[str, int]] = []
    missing: list[str] = []
    for img_id, rel in sorted(images.items()):
        for table, t in ((split, tables[1]), (labels, tables[2])):
            if img_id not in table:
                raise RelkdError(f"{name}: image id {img_id} ({rel}) has no entry in {t}")
        path = root / "images" / rel
        if not path.is_file():
            missing.append(str(path))
        label = int(labels[img_id]) - 1  # the files count classes from 1
        (train_s if split[img_id].strip() == "1" else test_s).append((str(path), label))
    if missing:
        raise RelkdError(
            f"{name}: {len(missing)} image files listed in images.txt are missing, e.g. "
            f"{', '.join(missing[:3])}. {_CUB_HOW}"
        )
    num_classes = max(t for _, t in train_s + test_s) + 1
    classes: list[str] | None = None
    if (root / "classes.txt").is_file():
        table = fmt.read_id_table(name, root / "classes.txt")
        classes = [table[i] for i in sorted(table)]
        num_classes = max(num_classes, len(classes))
    size = opts.image_size or 224
    return file_sets(name, opts, train_s, test_s, classes, num_classes, IMAGENET_STATS, size)
