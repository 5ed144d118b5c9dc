"""ImageNet-style class folders: root/train/<class>/* and root/val/<class>/* (or root/test);
the ImageNet transforms, or, for small square images (<= 64 px) without ``image_size``, their
own size with RandomCrop + flip (said in ``DataInfo.notes``)."""

from __future__ import annotations

from dataclasses import replace
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
    if opts.image_size is not None:
        return file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), IMAGENET_STATS,
            opts.image_size,
        )  # fmt: skip
    side, note = small_image_default(train_s)
    if side is None:  # the ImageNet recipe: RandomResizedCrop(224) / Resize + CenterCrop(224)
        out = file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), IMAGENET_STATS, 224
        )
    else:  # small images at their own size: RandomCrop(side, padding side / 8) + flip
        out = file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), IMAGENET_STATS, side,
            padding=max(1, side // 8),
        )  # fmt: skip
    return out[0], out[1], replace(out[2], notes=(note,) if note else ())


#: imagefolder images this small (side, pixels) train at their own size by default.
SMALL_IMAGE_MAX = 64


def small_image_default(samples: list[tuple[str, int]], n: int = 32) -> tuple[int | None, str]:
    """The default side for imagefolder: the images' own when the first ``n`` (spread over the
    set) are all square and the same size <= :data:`SMALL_IMAGE_MAX`, else None (224); and a
    note saying which and why."""
    from PIL import Image

    step = max(1, len(samples) // n)
    picked = samples[::step][:n]
    sizes = set()
    for path, _ in picked:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
        except OSError:
            return None, ""  # unreadable: the loader reports the file
    if not sizes:
        return None, ""
    side = max(max(wh) for wh in sizes)
    if side > SMALL_IMAGE_MAX:
        return None, ""
    if len(sizes) == 1 and (w := next(iter(sizes)))[0] == w[1]:
        return side, (
            f"imagefolder: the training images are {side}x{side} ({len(picked)} sampled), so "
            f"relkd trains at their own size with RandomCrop({side}, padding "
            f"{max(1, side // 8)}) + flip instead of the ImageNet recipe's 224-pixel crops; "
            "data.image_size chooses another size"
        )
    return None, (
        f"imagefolder: the training images are small (up to {side} px) but not all the same "
        f"square size, so relkd keeps the ImageNet recipe's 224-pixel crops; set "
        "data.image_size (e.g. the teacher's) to train smaller"
    )
