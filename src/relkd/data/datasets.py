"""Data sets by name: ``build_datasets("cifar100", root) -> (train, test, DataInfo)``.

Every data set yields ``(image float [C, H, W] normalised, int label)``. Readers for the on-disk
formats are written here (CIFAR pickles, idx files, STL-10 binaries, class folders, the CUB and
Tiny-ImageNet index files) so that missing or broken files fail with a :class:`RelkdError` that
names the path, what was expected there and how to get the data.

Data sets small enough to hold in memory (cifar10, cifar100, fashion_mnist, stl10, folder_jpg)
are :class:`ArrayImageDataset` and expose ``as_tensors() -> (uint8 [N, C, H, W], int64 [N])``
for the on-device :class:`relkd.data.memory.InMemoryLoader`.

Add a data set without editing the library::

    @DATASETS.register("mydata")
    def build_mydata(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
        ...
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from relkd.data import transforms as tf
from relkd.registry import Registry, RelkdError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Bumped whenever the layout of the folder_jpg decode cache changes (old caches are refused).
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class DataInfo:
    """What a model and a loader need to know about a data set.

    Attributes:
        num_classes: number of labels (targets are ``0 .. num_classes - 1``).
        in_channels: image channels C (1 for Fashion-MNIST, 3 otherwise).
        image_size: side of the square images the model sees (after crop / resize).
        mean, std: per-channel normalisation used by the transforms (length C).
        classes: class names in label order, when known.
        name: the registry name of the data set.
        crop_padding: zero padding of the train RandomCrop (4 for CIFAR, 2 for Fashion-MNIST,
            size / 8 for STL-10, Tiny-ImageNet and folder_jpg; 0 for the RandomResizedCrop
            recipes), for loaders that redo the augmentation themselves.
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None
    name: str = ""
    crop_padding: int = 0


@dataclass(frozen=True)
class BuildOptions:
    """Options every builder receives (see :func:`build_datasets`)."""

    download: bool = False
    augment: bool = True
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


Builder = Callable[[Path | None, BuildOptions], "tuple[Dataset, Dataset, DataInfo]"]
DATASETS: Registry[Builder] = Registry("dataset")


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
) -> tuple[Dataset, Dataset, DataInfo]:
    """Build ``(train, test, info)`` for the registered data set ``name``.

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

    Returns:
        train and test data sets yielding ``(image float [C, H, W], int label)`` and the
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
    return builder(Path(root).expanduser() if root is not None else None, opts)


# --------------------------------------------------------------------------- data set classes


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 [N, H, W, C] with int64 targets [N].

    ``__getitem__`` gives ``(transform(PIL image), int label)`` like torchvision's CIFAR10.
    ``padding`` / ``flip`` / ``augment`` describe the train augmentation (RandomCrop with zero
    padding + RandomHorizontalFlip) so that :class:`~relkd.data.memory.InMemoryLoader` can redo
    it on the device.
    """

    def __init__(
        self,
        data: np.ndarray,
        targets: np.ndarray,
        *,
        transform: Callable[[Image.Image], Any],
        mean: Sequence[float],
        std: Sequence[float],
        classes: list[str] | None = None,
        augment: bool = False,
        padding: int = 0,
        flip: bool = False,
    ) -> None:
        if data.dtype != np.uint8 or data.ndim != 4:
            raise ValueError(f"data must be uint8 [N, H, W, C], got {data.dtype} {data.shape}")
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} targets")
        self.data = np.ascontiguousarray(data)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.classes = classes
        self.augment = augment
        self.padding = padding
        self.flip = flip

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        arr = self.data[i]
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        return self.transform(img), int(self.targets[i])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set: images uint8 [N, C, H, W] (not normalised) and targets int64 [N]."""
        images = torch.from_numpy(self.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.from_numpy(self.targets.copy())

    def __repr__(self) -> str:
        n, h, w, c = self.data.shape
        return f"{type(self).__name__}(n={n}, shape=[{c}, {h}, {w}], augment={self.augment})"


class FileImageDataset(Dataset):
    """Images decoded from files on every access: ``samples`` is a list of (path, label)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        transform: Callable[[Image.Image], Any],
        classes: list[str] | None = None,
    ) -> None:
        self.samples = samples
        self.targets = np.asarray([t for _, t in samples], dtype=np.int64)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        return self.transform(load_image(path)), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={len(self.classes or [])})"


def load_image(path: str | os.PathLike[str], mode: str = "RGB") -> Image.Image:
    """Decode an image file fully into a PIL image of ``mode``; RelkdError naming a bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode and im.mode != mode else im.copy()
    except FileNotFoundError as e:
        raise RelkdError(f"image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RelkdError(f"cannot decode image file {path} (corrupt or not an image): {e}") from e


# --------------------------------------------------------------------------------- helpers


def _norm(opts: BuildOptions, mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    m = opts.mean if opts.mean is not None else tuple(mean)
    s = opts.std if opts.std is not None else tuple(std)
    return m, s


def _check_channels(name: str, mean: Sequence[float], channels: int) -> None:
    if len(mean) != channels:
        raise RelkdError(
            f"{name}: mean/std have {len(mean)} values but the images have {channels} channels"
        )


def _fixed_size(name: str, opts: BuildOptions, native: int) -> int:
    if opts.image_size is not None and opts.image_size != native:
        raise RelkdError(
            f"{name} images are {native}x{native}; image_size={opts.image_size} is not supported "
            f"for it (leave image_size unset)"
        )
    return native


def _require_dir(name: str, path: Path, what: str, how: str) -> None:
    if not path.is_dir():
        raise RelkdError(f"{name}: {what} not found: {path} is not a folder. {how}")


def _require_files(name: str, folder: Path, files: Sequence[str], how: str) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise RelkdError(
            f"{name}: incomplete data in {folder}: missing {', '.join(missing)}. {how}"
        )


def _array_dataset(
    data: np.ndarray,
    targets: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    classes: list[str] | None,
    train: bool,
    augment: bool,
    padding: int,
    flip: bool = True,
) -> ArrayImageDataset:
    """An ArrayImageDataset with the crop+flip train pipeline (``train and augment``)."""
    aug = train and augment
    train_tf, test_tf = tf.crop_flip_transforms(
        data.shape[1], padding, mean, std, augment=aug, flip=flip
    )
    return ArrayImageDataset(
        data,
        targets,
        transform=train_tf if aug else test_tf,
        mean=mean,
        std=std,
        classes=classes,
        augment=aug,
        padding=padding if aug else 0,
        flip=flip and aug,
    )


def _scan_class_folders(
    name: str, split_dir: Path, how: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class sub-folders of ``split_dir`` and their image files as (path, label)."""
    _require_dir(name, split_dir, "split folder", how)
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    if not classes:
        raise RelkdError(
            f"{name}: no class folders in {split_dir} (expected {split_dir}/<class>/*). {how}"
        )
    defines_classes = class_to_idx is None
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for c in classes:
        if c not in class_to_idx:
            raise RelkdError(
                f"{name}: class folder {split_dir / c} has no counterpart in the train split"
            )
        files = sorted(
            e.path
            for e in os.scandir(split_dir / c)
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not files and defines_classes:  # it would become a class no sample ever has
            raise RelkdError(
                f"{name}: class folder {split_dir / c} holds no image files "
                f"({', '.join(IMG_EXTENSIONS)}); remove it or add its images"
            )
        samples.extend((f, class_to_idx[c]) for f in files)
    if not samples:
        raise RelkdError(f"{name}: no image files ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return classes, samples


# ------------------------------------------------------------------------------ CIFAR-10/100

_CIFAR_HOW = (
    "Pass download=True (config: data.download=true) to fetch it with torchvision, or download "
    "{url} and unpack it into {root}."
)


class _DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: it admits only the numpy callables that rebuild arrays and
    dtypes (the CIFAR batches hold dicts, lists, str / bytes and numpy arrays), so a crafted
    file can never name ``os.system`` or any other callable and run it."""

    _ALLOWED = {
        (mod, name)
        for core in ("numpy.core", "numpy._core")
        for mod, name in (
            (f"{core}.multiarray", "_reconstruct"),
            (f"{core}.multiarray", "scalar"),
            (f"{core}.numeric", "_frombuffer"),
        )
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: only numpy arrays, dtypes and builtin containers "
                "are allowed in a data file"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any unpickling failure means a broken (or hostile) file
        raise RelkdError(
            f"cannot read CIFAR file {path} (corrupt or not a CIFAR batch): {e}"
        ) from e
    if not isinstance(d, dict):
        raise RelkdError(f"CIFAR file {path} does not hold a dict")
    # Python-2 pickles (the official files) load with str keys; Python-3 ones may have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _names(values: Sequence[Any]) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _read_cifar(
    name: str, root: Path | None, download: bool, cifar100: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    base = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    train_files = ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test"] if cifar100 else ["test_batch"]
    meta_file, meta_key = (
        ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    )
    label_key = "fine_labels" if cifar100 else "labels"
    url = (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
        if cifar100
        else "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    root = root if root is not None else cache_dir() / "cifar"
    # Accept the parent (torchvision's convention) or the unpacked folder itself.
    folder = root if (root / meta_file).is_file() and root.name == base else root / base
    needed = [*train_files, *test_files, meta_file]
    have_all = all((folder / f).is_file() for f in needed)
    if not have_all and download:
        from torchvision import datasets as tvd

        cls = tvd.CIFAR100 if cifar100 else tvd.CIFAR10
        try:
            cls(root=str(root), train=True, download=True)
        except Exception as e:
            raise RelkdError(f"{name}: download into {root} failed: {e}") from e
        folder = root / base
    how = _CIFAR_HOW.format(url=url, root=root)
    if not root.exists():
        raise RelkdError(
            f"{name}: data root {root} does not exist (expected {root / base}/). {how}"
        )
    _require_files(name, folder, needed, how)

    def load(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname in files:
            d = _unpickle(folder / fname)
            if "data" not in d or label_key not in d:
                raise RelkdError(
                    f"{name}: {folder / fname} lacks the 'data' / '{label_key}' entries"
                )
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(d[label_key]):
                raise RelkdError(f"{name}: {folder / fname} has data of shape {x.shape}")
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # -> [N, H, W, C]
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = load(train_files)
    xte, yte = load(test_files)
    meta = _unpickle(folder / meta_file)
    if meta_key not in meta:
        raise RelkdError(f"{name}: {folder / meta_file} lacks '{meta_key}'")
    return xtr, ytr, xte, yte, _names(meta[meta_key])


def _build_cifar(
    name: str, root: Path | None, opts: BuildOptions, cifar100: bool
) -> tuple[Dataset, Dataset, DataInfo]:
    size = _fixed_size(name, opts, 32)
    mean, std = _norm(
        opts,
        tf.CIFAR100_MEAN if cifar100 else tf.CIFAR10_MEAN,
        tf.CIFAR100_STD if cifar100 else tf.CIFAR10_STD,
    )
    _check_channels(name, mean, 3)
    xtr, ytr, xte, yte, classes = _read_cifar(name, root, opts.download, cifar100)
    common = dict(mean=mean, std=std, classes=classes, augment=opts.augment, padding=4)
    train = _array_dataset(xtr, ytr, train=True, **common)
    test = _array_dataset(xte, yte, train=False, **common)
    info = DataInfo(len(classes), 3, size, mean, std, classes, name, crop_padding=4)
    return train, test, info


@DATASETS.register("cifar10")
def build_cifar10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` pickles; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar10", root, opts, cifar100=False)


@DATASETS.register("cifar100")
def build_cifar100(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CIFAR-100 (fine labels) from ``cifar-100-python``; CRD crop(32, pad 4) + flip."""
    return _build_cifar("cifar100", root, opts, cifar100=True)


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


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip or plain) into a numpy array of its dtype.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions D, then D
    big-endian int32 sizes; the data follows in C order.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise RelkdError(f"cannot read idx file {path}: {e}") from e
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in types:
        raise RelkdError(f"{path} is not an idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(types[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise RelkdError(
            f"{path}: idx header says shape {tuple(dims)} ({expected} bytes) but the file "
            f"holds {len(raw) - offset} data bytes (truncated or corrupt)"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=offset)
        .reshape(tuple(dims))
        .astype(dtype.newbyteorder("="))
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / f"{stem}.gz", folder / stem):
        if cand.is_file():
            return cand
    return None


def _fashion_candidates(root: Path | None) -> list[Path]:
    bases = (
        [root] if root is not None else [FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"]
    )
    out: list[Path] = []
    for b in bases:
        out += [b, b / "FashionMNIST" / "raw"]  # torchvision downloads into <root>/FashionMNIST/raw
    return out


def _locate_fashion(root: Path | None) -> dict[str, Path] | None:
    for folder in _fashion_candidates(root):
        found = {k: _find_idx(folder, stem) for k, stem in _IDX_FILES.items()}
        if all(v is not None for v in found.values()):
            return found  # type: ignore[return-value]
    return None


@DATASETS.register("fashion_mnist")
def build_fashion_mnist(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Fashion-MNIST (28x28 grey, 10 classes) from idx files; crop(28, pad 2) + flip."""
    name = "fashion_mnist"
    size = _fixed_size(name, opts, 28)
    mean, std = _norm(opts, tf.FASHION_MNIST_MEAN, tf.FASHION_MNIST_STD)
    _check_channels(name, mean, 1)
    files = _locate_fashion(root)
    if files is None and opts.download:
        from torchvision import datasets as tvd

        target = root if root is not None else cache_dir() / "fashion-mnist"
        try:
            for train in (True, False):
                tvd.FashionMNIST(root=str(target), train=train, download=True)
        except Exception as e:
            raise RelkdError(f"{name}: download into {target} failed: {e}") from e
        files = _locate_fashion(target)
    if files is None:
        looked = ", ".join(str(p) for p in _fashion_candidates(root))
        raise RelkdError(
            f"{name}: the idx files ({', '.join(s + '[.gz]' for s in _IDX_FILES.values())}) "
            f"were not all found; looked in {looked}. Get them with "
            f"`apt-get install -y dataset-fashion-mnist` (installs {FASHION_MNIST_SYSTEM_DIR}), "
            "or pass download=True (config: data.download=true) to fetch them with torchvision."
        )
    arrays = {k: read_idx(p) for k, p in files.items()}
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
    common = dict(
        mean=mean, std=std, classes=list(FASHION_MNIST_CLASSES), augment=opts.augment, padding=2
    )
    train = _array_dataset(arrays["train_x"][..., None], arrays["train_y"], train=True, **common)
    test = _array_dataset(arrays["test_x"][..., None], arrays["test_y"], train=False, **common)
    return (
        train,
        test,
        DataInfo(10, 1, size, mean, std, list(FASHION_MNIST_CLASSES), name, crop_padding=2),
    )


# ------------------------------------------------------------------------ ImageNet-style folders

_IMAGENET_HOW = (
    "Expected the ImageNet layout <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG "
    "(val images sorted into class folders, e.g. with the valprep.sh script)."
)


@DATASETS.register("imagefolder")
def build_imagefolder(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Class folders root/train/<cls>/* and root/val/<cls>/* (or root/test); ImageNet transforms."""
    name = "imagefolder"
    if root is None:
        raise RelkdError(f"{name}: give the data root (config: data.root). {_IMAGENET_HOW}")
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {_IMAGENET_HOW}")
    val_dir = (
        root / "val" if (root / "val").is_dir() or not (root / "test").is_dir() else root / "test"
    )
    classes, train_samples = _scan_class_folders(name, root / "train", _IMAGENET_HOW)
    idx = {c: i for i, c in enumerate(classes)}
    _, val_samples = _scan_class_folders(name, val_dir, _IMAGENET_HOW, class_to_idx=idx)
    size = opts.image_size or 224
    mean, std = _norm(opts, tf.IMAGENET_MEAN, tf.IMAGENET_STD)
    _check_channels(name, mean, 3)
    train_tf, test_tf = tf.imagenet_transforms(size, mean, std, augment=opts.augment)
    train = FileImageDataset(train_samples, transform=train_tf, classes=classes)
    test = FileImageDataset(val_samples, transform=test_tf, classes=classes)
    return train, test, DataInfo(len(classes), 3, size, mean, std, classes, name)


# ------------------------------------------------------------------------------- CUB-200-2011

_CUB_HOW = (
    "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158 and unpack it; "
    "root is the CUB_200_2011 folder (images.txt, train_test_split.txt, image_class_labels.txt, "
    "images/)."
)


def _read_id_table(name: str, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise RelkdError(f"{name}: {path} line {lineno} is not '<id> <value>': {line!r}")
            out[int(parts[0])] = parts[1].strip()
    return out


@DATASETS.register("cub200")
def build_cub200(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """CUB-200-2011 birds (200 classes, 5994 train / 5794 test); ImageNet transforms at 224."""
    name = "cub200"
    root = root if root is not None else cache_dir() / "CUB_200_2011"
    if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {_CUB_HOW}")
    _require_files(
        name, root, ["images.txt", "train_test_split.txt", "image_class_labels.txt"], _CUB_HOW
    )
    _require_dir(name, root / "images", "image folder", _CUB_HOW)
    images = _read_id_table(name, root / "images.txt")
    split = _read_id_table(name, root / "train_test_split.txt")
    labels = _read_id_table(name, root / "image_class_labels.txt")
    train_s: list[tuple[str, int]] = []
    test_s: list[tuple[str, int]] = []
    missing: list[str] = []
    for img_id, rel in sorted(images.items()):
        if img_id not in split or img_id not in labels:
            raise RelkdError(
                f"{name}: image id {img_id} ({rel}) has no entry in "
                f"{'train_test_split.txt' if img_id not in split else 'image_class_labels.txt'}"
            )
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
        table = _read_id_table(name, root / "classes.txt")
        classes = [table[i] for i in sorted(table)]
        num_classes = max(num_classes, len(classes))
    size = opts.image_size or 224
    mean, std = _norm(opts, tf.IMAGENET_MEAN, tf.IMAGENET_STD)
    _check_channels(name, mean, 3)
    train_tf, test_tf = tf.imagenet_transforms(size, mean, std, augment=opts.augment)
    train = FileImageDataset(train_s, transform=train_tf, classes=classes)
    test = FileImageDataset(test_s, transform=test_tf, classes=classes)
    return train, test, DataInfo(num_classes, 3, size, mean, std, classes, name)


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
    root = root if root is not None else cache_dir() / "tiny-imagenet-200"
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {_TINY_HOW}")
    _require_files(name, root, ["wnids.txt", "val/val_annotations.txt"], _TINY_HOW)
    _require_dir(name, root / "train", "train folder", _TINY_HOW)
    _require_dir(name, root / "val" / "images", "val image folder", _TINY_HOW)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    idx = {w: i for i, w in enumerate(wnids)}
    train_s: list[tuple[str, int]] = []
    for w in wnids:
        d = root / "train" / w / "images"
        _require_dir(name, d, f"train images of class {w}", _TINY_HOW)
        files = sorted(e.path for e in os.scandir(d) if e.name.lower().endswith(IMG_EXTENSIONS))
        train_s.extend((f, idx[w]) for f in files)
    test_s: list[tuple[str, int]] = []
    ann = root / "val" / "val_annotations.txt"
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or parts[1] not in idx:
                raise RelkdError(
                    f"{name}: {ann} line {lineno} is not '<file>\\t<wnid from wnids.txt>\\t...': {line!r}"
                )
            path = root / "val" / "images" / parts[0]
            if not path.is_file():
                raise RelkdError(
                    f"{name}: {path} (listed in {ann} line {lineno}) is missing. {_TINY_HOW}"
                )
            test_s.append((str(path), idx[parts[1]]))
    if not train_s:
        raise RelkdError(f"{name}: no train images under {root / 'train'}. {_TINY_HOW}")
    size = opts.image_size or 64
    mean, std = _norm(opts, tf.TINY_IMAGENET_MEAN, tf.TINY_IMAGENET_STD)
    _check_channels(name, mean, 3)
    resize = size if size != 64 else None
    train_tf, test_tf = tf.crop_flip_transforms(
        size, max(1, size // 8), mean, std, augment=opts.augment, resize=resize
    )
    train = FileImageDataset(train_s, transform=train_tf, classes=wnids)
    test = FileImageDataset(test_s, transform=test_tf, classes=wnids)
    return (
        train,
        test,
        DataInfo(len(wnids), 3, size, mean, std, wnids, name, crop_padding=max(1, size // 8)),
    )


# ------------------------------------------------------------------------------------ STL-10

STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
_STL_HOW = (
    "Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and unpack it into "
    "root (giving root/stl10_binary/{train,test}_{X,y}.bin)."
)


def read_stl10_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binaries -> images uint8 [N, 96, 96, 3] (H, W, C) and 0-based labels [N].

    Each image is stored channel by channel in column-major order, so a reshape to
    [N, 3, 96, 96] gives [N, C, W, H]; the transpose puts rows first.
    """
    xp, yp = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    x = np.fromfile(xp, dtype=np.uint8)
    y = np.fromfile(yp, dtype=np.uint8).astype(np.int64) - 1  # labels are 1..10 in the file
    per = 3 * 96 * 96
    if x.size % per or x.size // per != y.size:
        raise RelkdError(
            f"stl10: {xp} holds {x.size} bytes ({x.size / per:.2f} images of 3x96x96) but {yp} "
            f"holds {y.size} labels (truncated or corrupt)"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise RelkdError(f"stl10: {yp} has labels outside 1..10")
    return x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), y  # [N, C, W, H] -> [N, H, W, C]


def _resize_all(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N, H, W, C] images to [N, size, size, C] with PIL (== transforms.Resize)."""
    out = np.empty((len(x), size, size, x.shape[3]), dtype=np.uint8)
    for i in range(len(x)):
        img = Image.fromarray(x[i]).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img).reshape(size, size, x.shape[3])
    return out


@DATASETS.register("stl10")
def build_stl10(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """STL-10 labelled splits (5000 train / 8000 test, 96x96); ``image_size`` resizes (bilinear).

    The resize is done once at load time (the same PIL bilinear resize ``transforms.Resize``
    applies), so the sets stay in memory and support ``as_tensors``. Train: RandomCrop(size,
    pad size/8) + flip (32 -> pad 4, the RRD probe recipe).
    """
    name = "stl10"
    root = root if root is not None else cache_dir() / "stl10"
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {_STL_HOW}")
    folder = root if root.name == "stl10_binary" else root / "stl10_binary"
    _require_dir(name, folder, "folder stl10_binary", _STL_HOW)
    _require_files(
        name, folder, ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"], _STL_HOW
    )
    xtr, ytr = read_stl10_split(folder, "train")
    xte, yte = read_stl10_split(folder, "test")
    classes = list(STL10_CLASSES)
    if (folder / "class_names.txt").is_file():
        classes = [
            ln.strip() for ln in (folder / "class_names.txt").read_text().splitlines() if ln.strip()
        ]
    size = opts.image_size or 96
    if size != 96:
        xtr, xte = _resize_all(xtr, size), _resize_all(xte, size)
    mean, std = _norm(opts, tf.STL10_MEAN, tf.STL10_STD)
    _check_channels(name, mean, 3)
    common = dict(
        mean=mean, std=std, classes=classes, augment=opts.augment, padding=max(1, size // 8)
    )
    train = _array_dataset(xtr, ytr, train=True, **common)
    test = _array_dataset(xte, yte, train=False, **common)
    return (
        train,
        test,
        DataInfo(10, 3, size, mean, std, classes, name, crop_padding=max(1, size // 8)),
    )


# ---------------------------------------------------------------- folder_jpg (decoded + cached)

_FOLDER_HOW = (
    "Expected class folders <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg "
    "(e.g. CIFAR-10 as JPEG files)."
)


def _manifest_hash(root: Path, samples: list[tuple[str, int]], classes: list[str]) -> str:
    """sha256 over every file's relative path, size and mtime (and the class list)."""
    h = hashlib.sha256(f"folder_jpg v{_CACHE_FORMAT}\n{classes!r}\n".encode())
    prefix = str(root) + os.sep
    for path, label in samples:
        st = os.stat(path)
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_one(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im)
    except FileNotFoundError as e:
        raise RelkdError(f"image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RelkdError(f"cannot decode image file {path} (corrupt or not an image): {e}") from e


def decode_images(paths: Sequence[str], workers: int | None = None) -> np.ndarray:
    """Decode same-size images into uint8 [N, H, W, C] (C = 1 if all grey, else 3), in threads."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:  # Pillow releases the GIL while decoding
        arrays = list(ex.map(_decode_one, paths))
    if not arrays:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    grey = all(a.ndim == 2 for a in arrays)
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), h, w, 1 if grey else 3), dtype=np.uint8)
    for i, (p, a) in enumerate(zip(paths, arrays)):
        if a.shape[:2] != (h, w):
            raise RelkdError(
                f"folder_jpg holds every image in memory and needs one image size: {p} is "
                f"{a.shape[1]}x{a.shape[0]} but {paths[0]} is {w}x{h}. Use the 'imagefolder' "
                "data set for images of varying size."
            )
        out[i] = a[..., None] if a.ndim == 2 else a
    return out


def _load_or_decode_folder(
    root: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    name = "folder_jpg"
    classes, train_s = _scan_class_folders(name, root / "train", _FOLDER_HOW)
    idx = {c: i for i, c in enumerate(classes)}
    _, test_s = _scan_class_folders(name, root / "test", _FOLDER_HOW, class_to_idx=idx)
    manifest = _manifest_hash(root, train_s + test_s, classes)
    root_key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    cdir = cache_dir()
    cache = cdir / f"folder_jpg-{root_key}-{manifest[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["manifest"]) == manifest:
                    return (
                        z["train_x"],
                        z["train_y"],
                        z["test_x"],
                        z["test_y"],
                        [str(c) for c in z["classes"]],
                    )
        except Exception:
            pass  # unreadable cache: decode again and overwrite it
    xtr = decode_images([p for p, _ in train_s])
    xte = decode_images([p for p, _ in test_s])
    if xtr.shape[1:3] != xte.shape[1:3] or xtr.shape[3] != xte.shape[3]:
        raise RelkdError(
            f"{name}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]} "
            "(H, W, C); both splits must share one size"
        )
    ytr = np.asarray([t for _, t in train_s], dtype=np.int64)
    yte = np.asarray([t for _, t in test_s], dtype=np.int64)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, train_x=xtr, train_y=ytr, test_x=xte, test_y=yte,
                 classes=np.asarray(classes), manifest=np.asarray(manifest))  # fmt: skip
        os.replace(tmp, cache)  # atomic: concurrent ranks never see a half-written cache
        for old in cdir.glob(f"folder_jpg-{root_key}-*.npz"):
            if old != cache:  # stale caches of the same root
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache folder only costs the decode next time
    return xtr, ytr, xte, yte, classes


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixel / 255) of uint8 images [N, H, W, C], in chunks."""
    c = x.shape[3]
    s = np.zeros(c)
    s2 = np.zeros(c)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += part.sum(0)
        s2 += (part * part).sum(0)
    n = max(1, len(x) * x.shape[1] * x.shape[2])
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@DATASETS.register("folder_jpg")
def build_folder_jpg(root: Path | None, opts: BuildOptions) -> tuple[Dataset, Dataset, DataInfo]:
    """Same-size images in root/{train,test}/<class>/*.jpg, decoded once and held in memory.

    The decoded arrays are cached in :func:`cache_dir` under a key made of the root and a hash of
    every file's path, size and mtime, so any change to the files invalidates the cache.
    32x32 images get the CIFAR-10 recipe (crop 32 pad 4 + flip, CIFAR-10 mean/std); other sizes
    crop with padding size/8 and use the train split's own per-channel mean/std.
    """
    name = "folder_jpg"
    if root is None:
        raise RelkdError(f"{name}: give the data root (config: data.root). {_FOLDER_HOW}")
    if not root.is_dir():
        raise RelkdError(f"{name}: data root {root} does not exist. {_FOLDER_HOW}")
    xtr, ytr, xte, yte, classes = _load_or_decode_folder(root)
    h, w, c = xtr.shape[1:]
    if h != w:
        raise RelkdError(f"{name}: images must be square, got {w}x{h}")
    _fixed_size(name, opts, h)
    if h == 32 and c == 3:
        base_mean, base_std = tf.CIFAR10_MEAN, tf.CIFAR10_STD
    else:
        base_mean, base_std = channel_stats(xtr)
    mean, std = _norm(opts, base_mean, base_std)
    _check_channels(name, mean, c)
    common = dict(mean=mean, std=std, classes=classes, augment=opts.augment, padding=max(1, h // 8))
    train = _array_dataset(xtr, ytr, train=True, **common)
    test = _array_dataset(xte, yte, train=False, **common)
    return (
        train,
        test,
        DataInfo(len(classes), c, h, mean, std, classes, name, crop_padding=max(1, h // 8)),
    )
