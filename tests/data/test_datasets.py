"""Data set readers against small files written here in the real on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from relkd.data import (
    DATASETS,
    DataInfo,
    IndexedDataset,
    build_datasets,
    collate_with_extras,
    read_idx,
    take_subset,
)
from relkd.data import formats as fmt
from relkd.data.builders import fashion_mnist as fm_builder
from relkd.data.builders import stl10 as stl_builder
from relkd.data.kit import cache_dir
from relkd.registry import RelkdError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every cache write (folder_jpg decode cache, downloads) out of the home folder."""
    monkeypatch.setenv("RELKD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save_jpg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


# ------------------------------------------------------------------------------- CIFAR


def _write_cifar10(root: Path, per_batch: int = 2, n_test: int = 4) -> dict[str, np.ndarray]:
    """Python-3 pickles with bytes keys (b'data', b'labels'), like re-pickled official files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = _rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"b", b"data": x, b"labels": y, b"filenames": []}, f)
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in rng.integers(0, 10, n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": xt, b"labels": yt}, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return {"x": np.concatenate(xs), "y": np.asarray(ys), "xt": xt, "yt": np.asarray(yt)}


def _write_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> dict[str, np.ndarray]:
    """str keys (as the official Python-2 pickles load with encoding='latin1')."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = _rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 100, n)]
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x, "fine_labels": y, "coarse_labels": [0] * n}, f, protocol=2)
        out[split] = (x, np.asarray(y))
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f, protocol=2)
    return out


def test_cifar10_labels_shapes_and_pixels(tmp_path: Path) -> None:
    ref = _write_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", tmp_path, augment=False)
    assert isinstance(info, DataInfo)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert info.crop_padding == 4 and info.name == "cifar10"
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)
    assert info.classes is not None and info.classes[1] == "automobile"
    assert len(train) == 10 and len(test) == 4
    assert [train[i][1] for i in range(10)] == ref["y"].tolist()
    assert [test[i][1] for i in range(4)] == ref["yt"].tolist()
    # The pickled row is 1024 R, 1024 G, 1024 B values in row-major order.
    img = ref["x"][3].reshape(3, 32, 32)
    expected = T.Normalize(info.mean, info.std)(torch.from_numpy(img).float() / 255)
    x, _ = train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected)
    images, targets = train.as_tensors()
    assert images.dtype == torch.uint8 and images.shape == (10, 3, 32, 32)
    assert torch.equal(images[3], torch.from_numpy(img)) and targets.dtype == torch.int64


def test_cifar10_augmented_pipeline_is_crd(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    train, test, _ = build_datasets("cifar10", tmp_path)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = train.transform.transforms[0]
    assert crop.size == (32, 32) and crop.padding == 4
    assert (train.augment, train.padding, train.flip) == (True, 4, True)
    assert [type(t).__name__ for t in test.transform.transforms] == ["ToTensor", "Normalize"]
    assert not test.augment


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    ref = _write_cifar100(tmp_path)
    # root may also be the unpacked folder itself
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        train, test, info = build_datasets("CIFAR100", root)
        assert info.num_classes == 100 and info.classes == [f"c{i}" for i in range(100)]
        assert info.mean == (0.5071, 0.4867, 0.4408) and info.std == (0.2675, 0.2565, 0.2761)
        assert len(train) == 6 and len(test) == 3
        assert train.targets.tolist() == ref["train"][1].tolist()
        assert [test[i][1] for i in range(3)] == ref["test"][1].tolist()


def test_cifar_missing_root_and_files(tmp_path: Path) -> None:
    with pytest.raises(RelkdError, match=r"does not exist") as e:
        build_datasets("cifar10", tmp_path / "nowhere")
    assert "download=True" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    _write_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(RelkdError, match=r"missing data_batch_3"):
        build_datasets("cifar10", tmp_path)
    with pytest.raises(RelkdError, match=r"image_size"):
        build_datasets("cifar100", tmp_path, image_size=64)


def test_cifar_corrupt_pickle(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(RelkdError, match=r"test_batch"):
        build_datasets("cifar10", tmp_path)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted data_batch_1 would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["payload", "inside_array"])
def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path, where: str) -> None:
    _write_cifar10(tmp_path)
    marker = tmp_path / "PWNED"
    evil = _RunsCode(marker)
    if where == "inside_array":  # an object array smuggling the callable
        evil = np.array([evil, 1], dtype=object)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f)
    with pytest.raises(RelkdError) as e:
        build_datasets("cifar10", tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and "refused" in msg and "system" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_real_format_pickles_still_load(tmp_path: Path, protocol: int) -> None:
    """Every protocol numpy / the official files use passes the restricted unpickler."""
    folder = tmp_path / "cifar-10-batches-py"
    data = _write_cifar10(tmp_path)
    x, y = data["x"][:2], data["y"][:2].tolist()
    with open(folder / "data_batch_1", "wb") as f:  # also a numpy scalar and an int64 array
        obj = {"data": x, "labels": y, "mean": np.float32(0.5), "ids": np.arange(2)}
        pickle.dump(obj, f, protocol=protocol)
    train, _, _ = build_datasets("cifar10", tmp_path, augment=False)
    assert np.array_equal(train.data[:2], x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(RelkdError, match=r"cifar100"):
        build_datasets("cifar1000")
    for name in ("cifar10", "cifar100", "fashion_mnist", "imagefolder", "cub200"):
        assert name in DATASETS
    for name in ("tiny_imagenet", "stl10", "folder_jpg"):
        assert name in DATASETS


# ----------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, n: int = 7, m: int = 3, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(3)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (m, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, m, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(_idx_bytes(a))
        else:
            (folder / stem).write_bytes(_idx_bytes(a))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool) -> None:
    ref = _write_fashion(tmp_path, gz=gz)
    train, test, info = build_datasets("fashion_mnist", tmp_path, augment=False)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert info.crop_padding == 2
    assert info.mean == (0.2860,) and info.std == (0.3530,)
    assert len(train) == 7 and len(test) == 3
    assert train.targets.tolist() == ref["train-labels-idx1-ubyte"].tolist()
    x, y = test[1]
    assert x.shape == (1, 28, 28) and y == int(ref["t10k-labels-idx1-ubyte"][1])
    raw = torch.from_numpy(ref["t10k-images-idx3-ubyte"][1]).float()[None] / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)
    tr_aug, _, _ = build_datasets("fashion_mnist", tmp_path)
    assert (tr_aug.padding, tr_aug.flip) == (2, True)
    assert tr_aug.transform.transforms[0].padding == 2


def test_fashion_mnist_torchvision_raw_layout(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    train, _, _ = build_datasets("fashion_mnist", tmp_path)
    assert len(train) == 7


def test_fashion_mnist_missing_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(RelkdError) as e:
        build_datasets("fashion_mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "apt-get install -y dataset-fashion-mnist" in msg
    assert "data.download=true" in msg


def test_read_idx_rejects_truncated(tmp_path: Path) -> None:
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "x-idx3-ubyte").write_bytes(_idx_bytes(a)[:-5])
    with pytest.raises(RelkdError, match=r"truncated"):
        read_idx(tmp_path / "x-idx3-ubyte")
    (tmp_path / "y").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(RelkdError, match=r"not an idx file"):
        read_idx(tmp_path / "y")


@pytest.mark.skipif(
    not (fm_builder.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST absent (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    train, test, info = build_datasets("fashion_mnist")
    assert len(train) == 60000 and len(test) == 10000
    assert info.num_classes == 10
    counts = np.bincount(train.targets, minlength=10)
    assert (counts == 6000).all()
    x, _ = train.as_tensors()
    assert x.shape == (60000, 1, 28, 28)
    # published statistics of the train split
    assert abs(x.float().mean().item() / 255 - 0.2860) < 1e-3


# ------------------------------------------------------------------------- image folders


def _write_class_folders(root: Path, split: str, per_class: int, classes: list[str], size=8):
    rng = _rng(4)
    for c in classes:
        for k in range(per_class):
            _save_jpg(
                root / split / c / f"{k:04d}.jpg",
                rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            )


def test_imagefolder(tmp_path: Path) -> None:
    classes = ["n01", "n02", "n03"]
    _write_class_folders(tmp_path, "train", 3, classes)
    _write_class_folders(tmp_path, "val", 1, classes[::-1])
    train, test, info = build_datasets("imagefolder", tmp_path, image_size=16)
    assert (info.num_classes, info.in_channels, info.image_size) == (3, 3, 16)
    assert info.classes == classes and info.mean == (0.485, 0.456, 0.406)
    assert len(train) == 9 and len(test) == 3
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.targets.tolist() == [0, 1, 2]
    x, _ = train[0]
    assert x.shape == (3, 16, 16)
    names = [type(t).__name__ for t in test.transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    # Small square images (8 px here) train at their own size by default, and the note says so;
    # images over 64 px keep the ImageNet recipe at 224.
    train8, _, info8 = build_datasets("imagefolder", tmp_path)
    assert (info8.image_size, info8.crop_padding) == (8, 1) and train8[0][0].shape == (3, 8, 8)
    assert info8.notes and "images are 8x8" in info8.notes[0]
    big = tmp_path / "big"
    _write_class_folders(big, "train", 1, classes, size=72)
    _write_class_folders(big, "val", 1, classes, size=72)
    _, _, info224 = build_datasets("imagefolder", big)
    assert info224.image_size == 224 and info224.notes == ()


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(RelkdError, match=r"data root"):
        build_datasets("imagefolder", None)
    _write_class_folders(tmp_path, "train", 1, ["a", "b"])
    with pytest.raises(RelkdError, match=r"val.*not a folder"):
        build_datasets("imagefolder", tmp_path)
    _write_class_folders(tmp_path, "val", 1, ["a", "zzz"])
    with pytest.raises(RelkdError, match=r"zzz"):
        build_datasets("imagefolder", tmp_path)


def test_empty_class_folder_is_not_a_class(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, "train", 2, ["a", "b"])
    _write_class_folders(tmp_path, "val", 1, ["a", "b"])
    (tmp_path / "train" / "c_empty").mkdir()
    (tmp_path / "train" / "c_empty" / "notes.txt").write_text("not an image")
    with pytest.raises(RelkdError, match=r"c_empty holds no image files"):
        build_datasets("imagefolder", tmp_path)
    (tmp_path / "train" / "c_empty" / "notes.txt").unlink()
    (tmp_path / "train" / "c_empty").rmdir()
    (tmp_path / "val" / "a_extra").mkdir()  # an empty folder in the eval split: no sample, no class
    with pytest.raises(RelkdError, match=r"a_extra"):
        build_datasets("imagefolder", tmp_path)


def test_corrupt_jpeg_names_the_file(tmp_path: Path) -> None:
    _write_class_folders(tmp_path, "train", 2, ["a", "b"])
    _write_class_folders(tmp_path, "val", 1, ["a", "b"])
    bad = tmp_path / "train" / "b" / "0001.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    train, _, _ = build_datasets("imagefolder", tmp_path, image_size=8)
    train[0]  # the good ones still load
    with pytest.raises(RelkdError, match=r"0001.jpg"):
        train[3]
    # ... also through DataLoader worker processes
    it = iter(DataLoader(train, batch_size=4, num_workers=1))
    with pytest.raises(RelkdError, match=r"0001.jpg"):
        next(it)
    it._shutdown_workers()  # now, not at some later garbage collection (which waits 5 s)


def _write_cub(root: Path) -> list[tuple[int, int]]:
    """5 images, classes (1-based) 1,1,2,3,3; split 1,0,1,0,1."""
    rows = [(1, 1, 1), (2, 1, 0), (3, 2, 1), (4, 3, 0), (5, 3, 1)]
    rng = _rng(5)
    lines_img, lines_split, lines_lab = [], [], []
    for i, c, tr in rows:
        rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"
        _save_jpg(root / "images" / rel, rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
        lines_img.append(f"{i} {rel}")
        lines_split.append(f"{i} {tr}")
        lines_lab.append(f"{i} {c}")
    (root / "images.txt").write_text("\n".join(lines_img) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines_split) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (root / "classes.txt").write_text("1 001.Bird_1\n2 002.Bird_2\n3 003.Bird_3\n")
    return [(c - 1, tr) for _, c, tr in rows]


def test_cub200(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    rows = _write_cub(root)
    for r in (root, tmp_path):  # the archive's parent folder is accepted too
        train, test, info = build_datasets("cub200", r, image_size=16)
        assert info.num_classes == 3 and info.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
        assert train.targets.tolist() == [c for c, tr in rows if tr == 1] == [0, 1, 2]
        assert test.targets.tolist() == [0, 2]
        assert train[0][0].shape == (3, 16, 16) and test[1][0].shape == (3, 16, 16)


def test_cub200_missing(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    _write_cub(root)
    os.remove(root / "train_test_split.txt")
    with pytest.raises(RelkdError, match=r"missing train_test_split.txt") as e:
        build_datasets("cub200", root)
    assert "CUB_200_2011.tgz" in str(e.value)
    _write_cub(root)
    next((root / "images").rglob("*.jpg")).unlink()
    with pytest.raises(RelkdError, match=r"1 image files listed in images.txt are missing"):
        build_datasets("cub200", root)


def _write_tiny(root: Path) -> None:
    wnids = ["n0300", "n0100", "n0200"]  # deliberately unsorted
    (root).mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = _rng(6)
    for w in wnids:
        for k in range(2):
            _save_jpg(
                root / "train" / w / "images" / f"{w}_{k}.JPEG",
                rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            )
    ann = []
    for k, w in enumerate(["n0200", "n0300", "n0100", "n0200"]):
        _save_jpg(
            root / "val" / "images" / f"val_{k}.JPEG",
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        )
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    _write_tiny(root)
    train, test, info = build_datasets("tiny_imagenet", tmp_path)
    assert info.num_classes == 3 and info.classes == ["n0100", "n0200", "n0300"]
    assert info.image_size == 64 and train[0][0].shape == (3, 64, 64)
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.targets.tolist() == [1, 2, 0, 1]
    train32, test32, info32 = build_datasets("tiny_imagenet", root, image_size=32)
    assert info32.image_size == 32
    assert train32[0][0].shape == (3, 32, 32) and test32[0][0].shape == (3, 32, 32)
    assert train32.transform.transforms[1].padding == 4  # RRD probe: resize 32, crop pad 4


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    _write_tiny(root)
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(RelkdError, match=r"val_2.JPEG"):
        build_datasets("tiny_imagenet", root)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(RelkdError, match=r"missing val/val_annotations.txt"):
        build_datasets("tiny_imagenet", root)
    with pytest.raises(RelkdError, match=r"tiny-imagenet-200.zip"):
        build_datasets("tiny_imagenet", tmp_path / "absent")


def _stl_pattern(n: int) -> np.ndarray:
    """Images [N, C, H, W] whose pixels encode their own coordinates (asymmetric in H vs W)."""
    c, h, w = np.meshgrid(np.arange(3), np.arange(96), np.arange(96), indexing="ij")
    base = (h + 2 * w + 50 * c) % 256
    return np.stack([(base + 7 * i) % 256 for i in range(n)]).astype(np.uint8)


def _write_stl(root: Path, n_train: int = 4, n_test: int = 2) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = _stl_pattern(n)  # [N, C, H, W]
        # the file stores each channel column-major: write the [N, C, W, H] transpose
        (folder / f"{split}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())
        y = np.arange(n, dtype=np.uint8) % 10 + 1  # 1-based
        (folder / f"{split}_y.bin").write_bytes(y.tobytes())
        out[split] = imgs
    (folder / "class_names.txt").write_text("\n".join(stl_builder.STL10_CLASSES) + "\n")
    return out


def test_stl10_orientation_and_labels(tmp_path: Path) -> None:
    ref = _write_stl(tmp_path)
    train, test, info = build_datasets("stl10", tmp_path, augment=False)
    assert (info.num_classes, info.image_size) == (10, 96)
    assert info.classes == stl_builder.STL10_CLASSES
    assert train.targets.tolist() == [0, 1, 2, 3] and test.targets.tolist() == [0, 1]
    images, _ = train.as_tensors()
    assert torch.equal(images, torch.from_numpy(ref["train"]))
    # pixel (c=0, h=1, w=0) is 1 and (h=0, w=1) is 2 in image 0: rows and columns not swapped
    assert images[0, 0, 1, 0] == 1 and images[0, 0, 0, 1] == 2
    x, _ = test[1]
    expected = T.Normalize(info.mean, info.std)(torch.from_numpy(ref["test"][1]).float() / 255)
    torch.testing.assert_close(x, expected)


def test_stl10_resized_for_probe(tmp_path: Path) -> None:
    ref = _write_stl(tmp_path)
    train, test, info = build_datasets("stl10", tmp_path, image_size=32)
    assert info.image_size == 32 and train.padding == 4 and info.crop_padding == 4
    x, _ = train[0]
    assert x.shape == (3, 32, 32)
    # the load-time resize equals transforms.Resize on the PIL image
    pil = Image.fromarray(ref["test"][0].transpose(1, 2, 0))
    expected = np.asarray(T.Resize((32, 32))(pil)).transpose(2, 0, 1)
    assert np.array_equal(test.as_tensors()[0][0].numpy(), expected)


def test_stl10_errors(tmp_path: Path) -> None:
    with pytest.raises(RelkdError, match=r"stl10_binary.tar.gz"):
        build_datasets("stl10", tmp_path / "absent")
    _write_stl(tmp_path)
    (tmp_path / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(RelkdError, match=r"missing test_y.bin"):
        build_datasets("stl10", tmp_path)
    (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(b"\x01")  # 1 label for 2 images
    with pytest.raises(RelkdError, match=r"truncated or corrupt"):
        build_datasets("stl10", tmp_path)


# --------------------------------------------------------------------------- folder_jpg


def test_folder_jpg_decodes_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cifar10-jpg"
    classes = ["airplane", "automobile", "bird"]
    _write_class_folders(root, "train", 3, classes, size=32)
    _write_class_folders(root, "test", 2, classes, size=32)
    train, test, info = build_datasets("folder_jpg", root)
    assert info.classes == classes and info.num_classes == 3 and info.image_size == 32
    assert info.mean == (0.4914, 0.4822, 0.4465)  # 32x32 -> CIFAR-10 recipe
    assert (train.padding, train.flip) == (4, True)
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    images, _ = train.as_tensors()
    decoded = np.asarray(Image.open(root / "train" / "bird" / "0001.jpg").convert("RGB"))
    assert np.array_equal(images[7].permute(1, 2, 0).numpy(), decoded)
    cache_files = list(cache_dir().glob("folder_jpg-*.npz"))
    assert len(cache_files) == 1

    # second build: served from the cache, no decoding
    def boom(*a, **k):
        raise AssertionError("decoded although the cache is fresh")

    with monkeypatch.context() as m:
        m.setattr(fmt, "decode_images", boom)
        train2, _, _ = build_datasets("folder_jpg", root)
    assert torch.equal(train2.as_tensors()[0], images)

    # a changed file makes the cache stale: it is refused and rebuilt
    _save_jpg(root / "train" / "bird" / "0001.jpg", np.zeros((32, 32, 3), np.uint8))
    train3, _, _ = build_datasets("folder_jpg", root)
    assert train3.as_tensors()[0][7].max() < 10
    new_files = list(cache_dir().glob("folder_jpg-*.npz"))
    assert len(new_files) == 1 and new_files != cache_files  # the stale one was removed


def test_folder_jpg_errors(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    with pytest.raises(RelkdError, match=r"does not exist"):
        build_datasets("folder_jpg", root)
    _write_class_folders(root, "train", 2, ["a", "b"], size=32)
    with pytest.raises(RelkdError, match=r"test.*not a folder"):
        build_datasets("folder_jpg", root)
    _write_class_folders(root, "test", 1, ["a", "b"], size=32)
    bad = root / "test" / "b" / "0000.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(RelkdError, match=r"test/b/0000.jpg"):
        build_datasets("folder_jpg", root)
    _save_jpg(bad, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(RelkdError, match=r"one image size"):
        build_datasets("folder_jpg", root)


# ----------------------------------------------------------------------------- wrappers


def test_indexed_dataset_and_collate(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    train, _, _ = build_datasets("cifar10", tmp_path, augment=False)
    ids = IndexedDataset(train)
    _, target, extras = ids[4]
    assert extras == {"index": 4} and target == train[4][1]
    assert ids.classes == train.classes  # attributes pass through
    loader = DataLoader(ids, batch_size=4, shuffle=False, collate_fn=collate_with_extras)
    x, y, ex = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert ex["index"].tolist() == [0, 1, 2, 3] and ex["index"].dtype == torch.int64
    x2, y2 = collate_with_extras([train[0], train[1]])
    assert x2.shape == (2, 3, 32, 32) and y2.tolist() == [train[0][1], train[1][1]]


def test_take_subset_stratified(tmp_path: Path) -> None:
    _write_fashion(tmp_path, n=7)
    train, _, _ = build_datasets("fashion_mnist", tmp_path)
    sub = take_subset(train, 5, seed=1)
    assert len(sub) == 5 and len(set(sub.indices)) == 5
    assert sub.indices == take_subset(train, 5, seed=1).indices
    rand = take_subset(train, 3, seed=0, stratified=False)
    assert len(rand) == 3
    with pytest.raises(RelkdError, match=r"1..7"):
        take_subset(train, 8)


def test_take_subset_keeps_class_shares() -> None:
    class Toy(torch.utils.data.Dataset):
        targets = [0] * 60 + [1] * 30 + [2] * 10

        def __len__(self) -> int:
            return 100

        def __getitem__(self, i: int):
            return i, self.targets[i]

    sub = take_subset(Toy(), 20, seed=3)
    counts = np.bincount([Toy.targets[i] for i in sub.indices])
    assert counts.tolist() == [12, 6, 2]


# ---------------------------------------------------------------- validation split (issue 17)


def _label_counts(y: np.ndarray) -> dict[int, int]:
    return {int(c): int(k) for c, k in zip(*np.unique(y, return_counts=True))}


def test_val_split_stratified_disjoint_deterministic(tmp_path: Path) -> None:
    from relkd.data import get_targets, to_tensors

    _write_cifar10(tmp_path, per_batch=40, n_test=7)  # 200 train images, uneven classes
    full, test, _ = build_datasets("cifar10", tmp_path)
    train, val, _ = build_datasets("cifar10", tmp_path, val_split=0.2, val_seed=3)
    held, keep = list(val.indices), list(train.indices)
    assert len(held) == 40 and len(keep) == 160
    assert set(held).isdisjoint(keep) and sorted(held + keep) == list(range(200))
    # stratified: every class gives its share (within one sample of the exact quota)
    counts, got = _label_counts(full.targets), _label_counts(get_targets(val))
    for c, k in counts.items():
        assert abs(got.get(c, 0) - 0.2 * k) < 1, (c, k, got.get(c))
    # fixed by val_seed alone
    again = build_datasets("cifar10", tmp_path, val_split=0.2, val_seed=3)[1]
    other = build_datasets("cifar10", tmp_path, val_split=0.2, val_seed=4)[1]
    assert list(again.indices) == held and list(other.indices) != held
    # the held-out images are the training images, as tensors too (in-memory pipeline)
    xv, yv = to_tensors(val)
    xf, yf = to_tensors(full)
    assert torch.equal(xv, xf[held]) and torch.equal(yv, yf[held])
    assert len(test) == 7  # the test set is not part of the result and not touched


def test_val_split_uses_the_test_transform(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, per_batch=8)
    full, test, _ = build_datasets("cifar10", tmp_path)
    train, val, _ = build_datasets("cifar10", tmp_path, val_split=0.25)
    view = val.dataset
    assert [type(t).__name__ for t in view.transform.transforms] == ["ToTensor", "Normalize"]
    assert not view.augment and view.padding == 0 and not view.flip
    assert train.dataset.augment and train.dataset.padding == 4  # the rest still augments
    assert full.augment  # the built train set itself is not altered
    for pos, j in enumerate(val.indices):
        img = Image.fromarray(full.data[j])
        want = test.transform(img)
        assert torch.equal(val[pos][0], want) and torch.equal(val[pos][0], val[pos][0])
    # file-based sets: the ImageNet test pipeline (Resize + CenterCrop), no RandomResizedCrop
    root = tmp_path / "imgs"
    _write_class_folders(root, "train", 4, ["a", "b"])
    _write_class_folders(root, "val", 1, ["a", "b"])
    tr, va, _ = build_datasets("imagefolder", root, image_size=8, val_split=0.5, val_seed=1)
    names = [type(t).__name__ for t in va.dataset.transform.transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert "RandomResizedCrop" in [type(t).__name__ for t in tr.dataset.transform.transforms]
    assert _label_counts(va.dataset.targets[list(va.indices)]) == {0: 2, 1: 2}


def test_val_split_and_test_subset_errors_and_caps(tmp_path: Path) -> None:
    from relkd.data import get_targets

    _write_cifar10(tmp_path, per_batch=2, n_test=40)
    for bad in (0.0, 1.0, 0.01):  # 0.01 of 10 holds out nothing
        with pytest.raises(RelkdError, match="val_split"):
            build_datasets("cifar10", tmp_path, val_split=bad)
    _, test, _ = build_datasets("cifar10", tmp_path)
    _, capped, _ = build_datasets("cifar10", tmp_path, test_subset=10)
    assert len(capped) == 10
    counts, got = _label_counts(test.targets), _label_counts(get_targets(capped))
    for c, k in counts.items():
        assert abs(got.get(c, 0) - k / 4) < 1
    assert build_datasets("cifar10", tmp_path, test_subset=10)[1].indices == capped.indices
    assert len(build_datasets("cifar10", tmp_path, test_subset=1000)[1]) == 40  # whole set
    _, both, _ = build_datasets("cifar10", tmp_path, val_split=0.5, test_subset=3)
    assert len(both) == 3  # the cap applies to the held-out evaluation set
