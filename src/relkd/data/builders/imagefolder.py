"""ImageNet-style class folders: root/train/<class>/* and root/val/<class>/* (or root/test);
the ImageNet transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from relkd.data.kit import (
    IMAGENET_STATS,
    BuildOptions,
    DataInfo,
    class_folder_splits,
    file_sets,
    register_dataset,
    save_jpg,
)

IMAGENET_HOW = (
    "Expected the ImageNet layout <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG "
    "(val images sorted into class folders, e.g. with the valprep.sh script)."
)


def write_example(folder: Path) -> Path:
    """Two classes of small JPEGs of varied sizes in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("a", "b"):
            for k in range(n):
                h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                save_jpg(folder / split / c / f"{k:03d}.JPEG", img)
    return folder


@register_dataset("imagefolder", example=write_example)
def build_imagefolder(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Class folders root/train/<cls>/* and root/val/<cls>/* (or root/test); ImageNet transforms."""
    classes, train_s, test_s = class_folder_splits(
        "imagefolder", root, ("val", "test"), IMAGENET_HOW
    )
    size = opts.image_size or 224
    return file_sets(
        "imagefolder", opts, train_s, test_s, classes, len(classes), IMAGENET_STATS, size
    )
