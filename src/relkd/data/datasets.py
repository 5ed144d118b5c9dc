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

Add a data set without editing the library::

    @DATASETS.register("mydata")
    def build_mydata(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
        ...

Code layout: :class:`DataInfo`, :class:`BuildOptions`, the :data:`DATASETS` registry and the two
data set classes are defined in :mod:`relkd.data.base` (and stay importable from here); this
module holds :func:`build_datasets`, :func:`cache_dir`, the helpers the builders share and the
built-in builders, which register themselves when it is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from relkd.data import formats as fmt
from relkd.data import transforms as tf
from relkd.data.base import (  # noqa: F401  (public names kept importable from here)
    DATASETS,
    ArrayImageDataset,
    Builder,
    BuildOptions,
    DataInfo,
    FileImageDataset,
)
from relkd.data.formats import (  # noqa: F401  (public names kept importable from here)
    IMG_EXTENSIONS,
    channel_stats,
    decode_images,
    load_image,
    read_idx,
    read_stl10_split,
)
from relkd.data.wrappers import cap_subset, split_train_val
from relkd.registry import RelkdError


def cache_dir() -> Path:
    """relkd's cache folder: ``$RELKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/relkd``, else ``~/.cache/relkd``."""
    env = os.environ.get("RELKD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "relkd"


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
    train, test, info = builder(Path(root).expanduser() if root is not None else None, opts)
    if val_split is not None:
        train, test = split_train_val(train, test, val_split, seed=val_seed)
    if test_subset is not None:
        test = cap_subset(test, test_subset)
    return train, test, info


# --------------------------------------------------------------------------------- helpers


def _norm(
    name: str, opts: BuildOptions, mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple, tuple]:
    """The normalisation (``opts`` overrides the data set's own), checked against the channels."""
    m = opts.mean if opts.mean is not None else tuple(mean)
    s = opts.std if opts.std is not None else tuple(std)
    if len(m) != channels:
        raise RelkdError(
            f"{name}: mean/std have {len(m)} values but the images have {channels} channels"
        )
    return m, s


def _fixed_size(name: str, opts: BuildOptions, native: int) -> int:
    if opts.image_size is not None and opts.image_size != native:
        raise RelkdError(
            f"{name} images are {native}x{native}; image_size={opts.image_size} is not supported "
            f"for it (leave image_size unset)"
        )
    return native


def _locate(name: str, root: Path | None, default: str, marker: str, sub: str, how: str) -> Path:
    """The data root: ``root`` (default ``cache_dir() / default``) or its ``sub`` folder when
    ``marker`` is only found there; it must exist."""
    root = root if root is not None else cache_dir() / default
    if not (root / marker).exists() and (root / sub / marker).exists():
        root = root / sub
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {how}")
    return root


def _download(name: str, target: Path, fetch: Callable[[], Any]) -> None:
    try:
        fetch()
    except Exception as e:
        raise RelkdError(f"{name}: download into {target} failed: {e}") from e


def _array_sets(
    name: str,
    opts: BuildOptions,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: list[str],
    base: tuple[Sequence[float], Sequence[float]],
    padding: int,
    num_classes: int | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """In-memory ``(train, test, info)`` from uint8 [N, H, W, C] arrays with the crop + flip
    train pipeline (``opts.augment``) and the normalisation ``base`` (or ``opts``')."""
    h, c = train[0].shape[1], train[0].shape[3]
    mean, std = _norm(name, opts, *base, channels=c)
    aug = opts.augment
    train_tf, test_tf = tf.crop_flip_transforms(h, padding, mean, std, augment=aug)
    common = dict(mean=mean, std=std, classes=classes)
    sets = [
        ArrayImageDataset(
            x, y, transform=t, augment=a, padding=padding if a else 0, flip=a, **common
        )
        for (x, y), t, a in ((train, train_tf if aug else test_tf, aug), (test, test_tf, False))
    ]
    info = DataInfo(num_classes or len(classes), c, h, mean, std, classes, name, padding)
    return sets[0], sets[1], info


def _file_sets(
    name: str,
    opts: BuildOptions,
    train_s: list[tuple[str, int]],
    test_s: list[tuple[str, int]],
    classes: list[str] | None,
    num_classes: int,
    base: tuple[Sequence[float], Sequence[float]],
    size: int,
    padding: int | None = None,
) -> tuple[Dataset, Dataset, DataInfo]:
    """File-backed ``(train, test, info)``: the ImageNet recipe (``padding=None``), else
    [Resize] + RandomCrop(size, padding) + flip (Tiny-ImageNet's native 64 is not resized)."""
    mean, std = _norm(name, opts, *base, channels=3)
    if padding is None:
        train_tf, test_tf = tf.imagenet_transforms(size, mean, std, augment=opts.augment)
    else:
        resize = size if size != 64 else None
        train_tf, test_tf = tf.crop_flip_transforms(
            size, padding, mean, std, augment=opts.augment, resize=resize
        )
    train = FileImageDataset(train_s, transform=train_tf, classes=classes)
    test = FileImageDataset(test_s, transform=test_tf, classes=classes)
    return train, test, DataInfo(num_classes, 3, size, mean, std, classes, name, padding or 0)


# ------------------------------------------------------------------------------ CIFAR-10/100

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
    _fixed_size(name, opts, 32)
    base, (meta_file, meta_key) = spec["base"], spec["meta"]
    root = root if root is not None else cache_dir() / "cifar"
    # Accept the parent (torchvision's convention) or the unpacked folder itself.
    folder = root if (root / meta_file).is_file() and root.name == base else root / base
    needed = [*spec["train"], *spec["test"], meta_file]
    if opts.download and not all((folder / f).is_file() for f in needed):
        from torchvision import datasets as tvd

        cls = getattr(tvd, spec["tv"])
        _download(name, root, lambda: cls(root=str(root), train=True, download=True))
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
    return _array_sets(name, opts, train, test, fmt.names_of(meta[meta_key]), spec["stats"], 4)


@DATASETS.register("cifar10")
def build_cifar10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` pickles; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar10", root, opts)


@DATASETS.register("cifar100")
def build_cifar100(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-100 (fine labels) from ``cifar-100-python``; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar100", root, opts)


# ---------------------------------------------------------------------------- Fashion-MNIST

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


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Fashion-MNIST (28x28 grey, 10 classes) from idx files; crop(28, pad 2) + flip."""
    name = "fashion_mnist"
    _fixed_size(name, opts, 28)
    _norm(name, opts, tf.FASHION_MNIST_MEAN, tf.FASHION_MNIST_STD, channels=1)
    files = _locate_fashion(root)
    if files is None and opts.download:
        from torchvision import datasets as tvd

        target = root if root is not None else cache_dir() / "fashion-mnist"
        for split in (True, False):
            _download(name, target, lambda s=split: tvd.FashionMNIST(str(target), s, download=True))
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
    return _array_sets(name, opts, train, test, list(FASHION_MNIST_CLASSES), stats, 2)


# ------------------------------------------------------------------------ ImageNet-style folders

_IMAGENET_HOW = (
    "Expected the ImageNet layout <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG "
    "(val images sorted into class folders, e.g. with the valprep.sh script)."
)
_IMAGENET = (tf.IMAGENET_MEAN, tf.IMAGENET_STD)


def _class_folder_splits(
    name: str, root: Path | None, eval_dirs: Sequence[str], how: str
) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Classes and (path, label) samples of ``root/train`` and the first existing eval split
    (the first of ``eval_dirs`` when none exists, for the error message)."""
    if root is None:
        raise RelkdError(f"{name}: give the data root (config: data.root). {how}")
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {how}")
    eval_dir = next((root / d for d in eval_dirs if (root / d).is_dir()), root / eval_dirs[0])
    classes, train_s = fmt.scan_class_folders(name, root / "train", how)
    idx = {c: i for i, c in enumerate(classes)}
    _, test_s = fmt.scan_class_folders(name, eval_dir, how, class_to_idx=idx)
    return classes, train_s, test_s


@DATASETS.register("imagefolder")
def build_imagefolder(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Class folders root/train/<cls>/* and root/val/<cls>/* (or root/test); ImageNet transforms."""
    classes, train_s, test_s = _class_folder_splits(
        "imagefolder", root, ("val", "test"), _IMAGENET_HOW
    )
    if opts.image_size is not None:
        return _file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), _IMAGENET, opts.image_size
        )
    side, note = _small_image_default(train_s)
    if side is None:  # the ImageNet recipe: RandomResizedCrop(224) / Resize + CenterCrop(224)
        out = _file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), _IMAGENET, 224
        )
    else:  # small images at their own size: RandomCrop(side, padding side / 8) + flip
        out = _file_sets(
            "imagefolder", opts, train_s, test_s, classes, len(classes), _IMAGENET, side,
            padding=max(1, side // 8),
        )  # fmt: skip
    return out[0], out[1], replace(out[2], notes=(note,) if note else ())


#: imagefolder images this small (side, pixels) train at their own size by default.
SMALL_IMAGE_MAX = 64


def _small_image_default(samples: list[tuple[str, int]], n: int = 32) -> tuple[int | None, str]:
    """The default side for imagefolder: the images' own when the first ``n`` (spread over the
    set) are all square and the same size <= :data:`SMALL_IMAGE_MAX`, else None (224); and a
    note saying which and why."""
    from PIL import Image

    step = max(1, len(samples) // n)
    sizes = set()
    for path, _ in samples[::step][:n]:
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
            f"imagefolder: the training images are {side}x{side} ({len(samples[::step][:n])} "
            f"sampled), so relkd trains at their own size with RandomCrop({side}, padding "
            f"{max(1, side // 8)}) + flip instead of the ImageNet recipe's 224-pixel crops; "
            "data.image_size chooses another size"
        )
    return None, (
        f"imagefolder: the training images are small (up to {side} px) but not all the same "
        f"square size, so relkd keeps the ImageNet recipe's 224-pixel crops; set "
        "data.image_size (e.g. the teacher's) to train smaller"
    )


# ------------------------------------------------------------------------------- CUB-200-2011

_CUB_HOW = (
    "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and unpack it; "
    "root is the CUB_200_2011 folder (images.txt, train_test_split.txt, image_class_labels.txt, "
    "images/)."
)


@DATASETS.register("cub200")
def build_cub200(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CUB-200-2011 birds (200 classes, 5994 train / 5794 test); ImageNet transforms at 224."""
    name = "cub200"
    root = _locate(name, root, "CUB_200_2011", "images.txt", "CUB_200_2011", _CUB_HOW)
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
    return _file_sets(name, opts, train_s, test_s, classes, num_classes, _IMAGENET, size)


# ------------------------------------------------------------------------------ Tiny-ImageNet

_TINY_HOW = (
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unpack it; root is the "
    "tiny-imagenet-200 folder (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
    "val/val_annotations.txt)."
)


@DATASETS.register("tiny_imagenet")
def build_tiny_imagenet(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Tiny-ImageNet-200 (64x64, 100k train / 10k val); ``image_size`` resizes first.

    Train: [Resize] + RandomCrop(size, pad size/8) + flip. Classes are the sorted wnids.
    """
    name = "tiny_imagenet"
    root = _locate(name, root, "tiny-imagenet-200", "wnids.txt", "tiny-imagenet-200", _TINY_HOW)
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
    return _file_sets(
        name, opts, train_s, test_s, wnids, len(wnids), stats, size, max(1, size // 8)
    )


# ------------------------------------------------------------------------------------ STL-10

STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
_STL_HOW = (
    "Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and unpack it into "
    "root (giving root/stl10_binary/{train,test}_{X,y}.bin)."
)


@DATASETS.register("stl10")
def build_stl10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """STL-10 labelled splits (5000 train / 8000 test, 96x96); ``image_size`` resizes (bilinear).

    The resize is done once at load time (the same PIL bilinear resize ``transforms.Resize``
    applies), so the sets stay in memory and support ``as_tensors``. Train: RandomCrop(size,
    pad size/8) + flip (32 -> pad 4, the RRD probe recipe).
    """
    name = "stl10"
    root = _locate(name, root, "stl10", ".", ".", _STL_HOW)
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
    return _array_sets(name, opts, *splits, classes, stats, max(1, size // 8), num_classes=10)


# ---------------------------------------------------------------- folder_jpg (decoded + cached)

_FOLDER_HOW = (
    "Expected class folders <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg "
    "(e.g. CIFAR-10 as JPEG files)."
)


@DATASETS.register("folder_jpg")
def build_folder_jpg(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Same-size images in root/{train,test}/<class>/*.jpg, decoded once and held in memory.

    The decoded arrays are cached in :func:`cache_dir` under a key made of the root and a hash of
    every file's path, size, mtime and ctime, so any change to the files invalidates the cache.
    32x32 images get the CIFAR-10 recipe (crop 32 pad 4 + flip, CIFAR-10 mean/std); other sizes
    crop with padding size/8 and use the train split's own per-channel mean/std.
    """
    name = "folder_jpg"
    classes, train_s, test_s = _class_folder_splits(name, root, ("test",), _FOLDER_HOW)
    xtr, ytr, xte, yte = fmt.load_or_decode_folder(
        name, root, train_s, test_s, classes, cache_dir()
    )  # type: ignore[arg-type]
    h, w, c = xtr.shape[1:]
    if h != w:
        raise RelkdError(f"{name}: images must be square, got {w}x{h}")
    _fixed_size(name, opts, h)
    cifar = h == 32 and c == 3
    stats = (tf.CIFAR10_MEAN, tf.CIFAR10_STD) if cifar else fmt.channel_stats(xtr)
    return _array_sets(name, opts, (xtr, ytr), (xte, yte), classes, stats, max(1, h // 8))
