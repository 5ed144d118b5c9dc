"""Shared fixtures: tiny data sets written in their real on-disk formats."""

from __future__ import annotations

import atexit
import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

# relkd's cache folder (decoded data sets, teacher caches, build locks) goes to a fresh temporary
# folder per test process, never the user's ~/.cache/relkd; tests that look into it set their own.
os.environ["RELKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="relkd-test-cache-")
# ... removed when the test process ends (one per run and per xdist worker would pile up in /tmp).
atexit.register(shutil.rmtree, os.environ["RELKD_CACHE_DIR"], ignore_errors=True)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` (uint8) as an idx file (big-endian dims, magic 0x08 = ubyte), gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_fmnist(root: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """A learnable 10-class 28x28 set in Fashion-MNIST's idx format: class c is a sinusoidal
    grating at orientation 18c degrees (random phase) plus noise; orientation survives global
    pooling, so small CNNs learn it in a few steps."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.normal(0, 25, size=(n, 28, 28))
        for i, c in enumerate(y):
            a = np.pi * c / 10
            phase = rng.uniform(0, 2 * np.pi)
            x[i] += 128 + 90 * np.sin(0.9 * (np.cos(a) * xx + np.sin(a) * yy) + phase)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.clip(x, 0, 255))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(fmnist_root, tmp_path_factory) -> Path:
    """A cnn_small teacher trained for 2 epochs on the tiny set (shared by engine/method tests)."""
    import relkd

    out = tmp_path_factory.mktemp("teacher")
    res = relkd.train(
        {
            "student": {"name": "cnn_small"},
            "method": {"name": "ce"},
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "train": {"epochs": 2, "progress": False, "tensorboard": False},
            "schedule": {"name": "constant"},
            "output_dir": str(out),
            "name": "t",
        },
        quiet=True,
    )
    return Path(res["run_dir"]) / "student.pt"
