"""Readers of the on-disk data formats, shared by the builders of :mod:`relkd.data.datasets`.

CIFAR pickles (through an unpickler that admits only numpy arrays and builtin containers), idx
files (MNIST / Fashion-MNIST), STL-10 binaries, ``<id> <value>`` index files (CUB), class folders
and image files. Every reader fails with a :class:`RelkdError` that names the file and says what
was expected there; none can run code found in a data file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from relkd.registry import RelkdError

#: Bumped whenever the layout of the folder_jpg decode cache changes (old caches are refused).
FOLDER_CACHE_FORMAT = 2  # 2: the manifest also covers every file's ctime
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def require_dir(name: str, path: Path, what: str, how: str) -> None:
    if not path.is_dir():
        raise RelkdError(f"{name}: {what} not found: {path} is not a folder. {how}")


def require_files(name: str, folder: Path, files: Sequence[str], how: str) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise RelkdError(
            f"{name}: incomplete data in {folder}: missing {', '.join(missing)}. {how}"
        )


# ----------------------------------------------------------------------------------- pickles
class _DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: it admits only the numpy callables that rebuild arrays,
    scalars and dtypes (the CIFAR batches hold dicts, lists, str / bytes and numpy arrays), so a
    crafted file can never name ``os.system`` or any other callable and run it."""

    _ALLOWED = {
        (f"{core}.{mod}", name)
        for core in ("numpy.core", "numpy._core")
        for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                          ("numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: only numpy arrays, dtypes and builtin containers "
                "are allowed in a data file"
            )
        return super().find_class(module, name)


def unpickle_dict(path: Path) -> dict[str, Any]:
    """A data pickle's dict with str keys (Python-2 pickles, like the official CIFAR files,
    load with str keys under latin1; Python-3 ones may have bytes keys)."""
    try:
        with open(path, "rb") as f:
            d = _DataUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any unpickling failure means a broken (or hostile) file
        raise RelkdError(
            f"cannot read CIFAR file {path} (corrupt or not a CIFAR batch): {e}"
        ) from e
    if not isinstance(d, dict):
        raise RelkdError(f"CIFAR file {path} does not hold a dict")
    _check_flat(path, d)
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _check_flat(path: Path, d: dict[Any, Any]) -> None:
    """Refuse the shapes a CIFAR file never has, before anything expands them: its dict holds
    numeric arrays, scalars and flat lists of scalars (labels, file names). A pickle can share
    one object many times (``x = [x, x]`` nested 26 deep is 281 bytes and 2**26 elements once
    turned into an array), so a container inside a list, or an object array, is refused; the
    walk then costs at most one step per element written in the file."""
    for key, value in d.items():
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise RelkdError(
                f"CIFAR file {path}: entry {key!r} is an object array (the format holds "
                "numeric arrays, scalars and flat lists only)"
            )
        if isinstance(value, dict) or (
            isinstance(value, _CONTAINERS)
            and any(isinstance(v, (*_CONTAINERS, np.ndarray)) for v in value)
        ):
            raise RelkdError(
                f"CIFAR file {path}: entry {key!r} holds nested containers (the format holds "
                "numeric arrays, scalars and flat lists only)"
            )


def read_cifar_batches(
    name: str, folder: Path, files: Sequence[str], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR batches -> images uint8 [N, 32, 32, 3] and labels int64 [N]. Each pickled row is
    1024 R, 1024 G, 1024 B values in row-major order."""
    xs, ys = [], []
    for fname in files:
        d = unpickle_dict(folder / fname)
        if "data" not in d or label_key not in d:
            raise RelkdError(f"{name}: {folder / fname} lacks the 'data' / '{label_key}' entries")
        try:
            x = np.asarray(d["data"], dtype=np.uint8)
            y = np.asarray(d[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise RelkdError(
                f"{name}: {folder / fname} holds no uint8 data / int labels: {e}"
            ) from e
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
            raise RelkdError(
                f"{name}: {folder / fname} has data of shape {x.shape} and labels of shape "
                f"{y.shape} (expected [N, 3072] and [N])"
            )
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # -> [N, H, W, C]
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def names_of(values: Sequence[Any]) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


# ------------------------------------------------------------------------- binary formats
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip or plain) into a numpy array of its dtype.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions D, then D
    big-endian int32 sizes; the data follows in C order.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
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
    data = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims))
    return data.astype(dtype.newbyteorder("="))


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


def read_id_table(name: str, path: Path) -> dict[int, str]:
    """``<id> <value>`` lines (the CUB index files) -> {id: value}."""
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


def read_tiny_val(name: str, root: Path, idx: dict[str, int], how: str) -> list[tuple[str, int]]:
    """Tiny-ImageNet's ``val/val_annotations.txt`` (``<file>\\t<wnid>\\t<box>``) -> the val
    images as (path, label) by ``idx`` (wnid -> label); every listed file must exist."""
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
                    f"{name}: {path} (listed in {ann} line {lineno}) is missing. {how}"
                )
            test_s.append((str(path), idx[parts[1]]))
    return test_s


# ---------------------------------------------------------------------------- image files
def image_files(folder: Path | str) -> list[str]:
    """The image files directly in ``folder`` (by extension), sorted."""
    return sorted(
        e.path
        for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
    )


def scan_class_folders(
    name: str, split_dir: Path, how: str, class_to_idx: dict[str, int] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class sub-folders of ``split_dir`` and their image files as (path, label).

    Without ``class_to_idx`` the folders define the classes, and an empty one is refused (it
    would become a class no sample has); with it (an evaluation split) every folder must be
    one of its classes."""
    require_dir(name, split_dir, "split folder", how)
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir())
    if not classes:
        raise RelkdError(
            f"{name}: no class folders in {split_dir} (expected {split_dir}/<class>/*). {how}"
        )
    defines_classes = class_to_idx is None
    idx = class_to_idx if class_to_idx is not None else {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for c in classes:
        if c not in idx:
            raise RelkdError(
                f"{name}: class folder {split_dir / c} has no counterpart in the train split"
            )
        files = image_files(split_dir / c)
        if not files and defines_classes:
            raise RelkdError(
                f"{name}: class folder {split_dir / c} holds no image files "
                f"({', '.join(IMG_EXTENSIONS)}); remove it or add its images"
            )
        samples.extend((f, idx[c]) for f in files)
    if not samples:
        raise RelkdError(f"{name}: no image files ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return classes, samples


def load_image(path: str | os.PathLike[str], mode: str | None = "RGB") -> Image.Image:
    """Decode an image file fully into a PIL image of ``mode`` (``None``: keep L and RGB, convert
    anything else to RGB); RelkdError naming a bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            want = mode or (im.mode if im.mode in ("L", "RGB") else "RGB")
            return im.convert(want) if im.mode != want else im.copy()
    except FileNotFoundError as e:
        raise RelkdError(f"image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RelkdError(f"cannot decode image file {path} (corrupt or not an image): {e}") from e


def decode_images(paths: Sequence[str], workers: int | None = None) -> np.ndarray:
    """Decode same-size images into uint8 [N, H, W, C] (C = 1 if all grey, else 3), in threads."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:  # Pillow releases the GIL while decoding
        arrays = list(ex.map(lambda p: np.asarray(load_image(p, None)), paths))
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


def resize_all(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [N, H, W, C] images to [N, size, size, C] with PIL (== transforms.Resize)."""
    out = np.empty((len(x), size, size, x.shape[3]), dtype=np.uint8)
    for i in range(len(x)):
        img = Image.fromarray(x[i]).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(img).reshape(size, size, x.shape[3])
    return out


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixel / 255) of uint8 images [N, H, W, C], in chunks."""
    c = x.shape[3]
    s, s2 = np.zeros(c), np.zeros(c)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c).astype(np.float64) / 255.0
        s += part.sum(0)
        s2 += (part * part).sum(0)
    n = max(1, len(x) * x.shape[1] * x.shape[2])
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 1e-12))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# ------------------------------------------------------------ folder_jpg decode cache
def _manifest_hash(root: Path, samples: list[tuple[str, int]], classes: list[str]) -> str:
    """sha256 over every file's relative path, label, size, mtime and ctime (and the class
    list). Any write to a file changes its ctime, which no user call can set back, so an edit
    that keeps the size and restores the mtime still invalidates the cache."""
    h = hashlib.sha256(f"folder_jpg v{FOLDER_CACHE_FORMAT}\n{classes!r}\n".encode())
    prefix = str(root) + os.sep
    for path, label in samples:
        st = os.stat(path)
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
        h.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


_SPLIT_KEYS = ("train_x", "train_y", "test_x", "test_y")


def load_or_decode_folder(
    name: str,
    root: Path,
    train_s: list[tuple[str, int]],
    test_s: list[tuple[str, int]],
    classes: list[str],
    cdir: Path,
) -> list[np.ndarray]:
    """``[train_x, train_y, test_x, test_y]`` of same-size image files, from the decode cache in
    ``cdir`` when its manifest matches the files, else decoded (and cached)."""
    manifest = _manifest_hash(root, train_s + test_s, classes)
    root_key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    cache = cdir / f"folder_jpg-{root_key}-{manifest[:16]}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["manifest"]) == manifest:
                    return [z[k] for k in _SPLIT_KEYS]
        except Exception:
            pass  # unreadable cache: decode again and overwrite it
    xtr = decode_images([p for p, _ in train_s])
    xte = decode_images([p for p, _ in test_s])
    if xtr.shape[1:] != xte.shape[1:]:
        raise RelkdError(
            f"{name}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]} "
            "(H, W, C); both splits must share one size"
        )
    ytr, yte = (np.asarray([t for _, t in s], dtype=np.int64) for s in (train_s, test_s))
    arrays = [xtr, ytr, xte, yte]
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **dict(zip(_SPLIT_KEYS, arrays)), classes=np.asarray(classes),
                 manifest=np.asarray(manifest))  # fmt: skip
        os.replace(tmp, cache)  # atomic: concurrent ranks never see a half-written cache
        for old in cdir.glob(f"folder_jpg-{root_key}-*.npz"):
            if old != cache:  # stale caches of the same root
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache folder only costs the decode next time
    return arrays
