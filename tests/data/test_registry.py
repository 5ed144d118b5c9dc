"""Every registered data set, automatically: built from the tiny example files its builder
ships (written in the data set's real on-disk format), with no edit here for a new one."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from relkd.data import DATASETS, EXAMPLES, build_datasets, supports_in_memory, to_tensors


def check_dataset(name: str, folder: Path) -> None:
    """Build ``name`` from its example files under ``folder`` and check what every builder
    promises: non-empty splits of ``(float image [C, S, S] normalised, int label)`` matching
    its ``DataInfo``, the same with and without augmentation, in-memory forms consistent."""
    assert name in EXAMPLES, (
        f"data set {name!r} has no example writer: register it with "
        "relkd.data.register_dataset(name, example=write_example)"
    )
    root = EXAMPLES[name](folder)
    for augment in (True, False):
        train, test, info = build_datasets(name, root, augment=augment)
        assert len(train) > 0 and len(test) > 0, name
        assert info.name == name and len(info.mean) == len(info.std) == info.in_channels
        if info.classes is not None:
            assert len(info.classes) <= info.num_classes
        for ds in (train, test):
            x, y = ds[0][:2]
            assert torch.is_tensor(x) and x.dtype == torch.float32, (name, type(x))
            assert tuple(x.shape) == (info.in_channels, info.image_size, info.image_size), name
            assert 0 <= int(y) < info.num_classes, (name, y)
            if supports_in_memory(ds):
                xs, ys = to_tensors(ds)
                assert xs.dtype == torch.uint8 and xs.shape[0] == len(ds) == ys.shape[0]
                assert xs.shape[1] == info.in_channels
                assert int(ys.max()) < info.num_classes


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_builds_from_its_example_files(name, tmp_path):
    check_dataset(name, tmp_path / name)


THROWAWAY = """
from pathlib import Path

import numpy as np

from relkd.data.kit import array_sets, register_dataset


def write_example(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.save(folder / "y.npy", np.arange(6) % 3)
    return folder


@register_dataset("throwaway_npy", example=write_example)
def build(root, opts):
    x, y = np.load(root / "x.npy"), np.load(root / "y.npy")
    return array_sets("throwaway_npy", opts, (x, y), (x[:2], y[:2]), ["a", "b", "c"],
                      ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), padding=1)
"""


def test_a_dataset_registered_elsewhere_is_covered_without_test_edits(tmp_path, monkeypatch):
    (tmp_path / "my_throwaway_data.py").write_text(THROWAWAY)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("my_throwaway_data")
        # The registry the parametrised test above iterates now holds it; its check passes.
        assert "throwaway_npy" in DATASETS.names()
        check_dataset("throwaway_npy", tmp_path / "data")
        train, _, info = build_datasets("throwaway_npy", tmp_path / "data")
        assert info.num_classes == 3 and info.image_size == 8 and len(train) == 6
        # ... and one registered without an example writer is reported, not skipped.
        DATASETS.register("throwaway_bare")(lambda root, opts: None)
        with pytest.raises(AssertionError, match="no example writer"):
            check_dataset("throwaway_bare", tmp_path / "bare")
    finally:
        for n in ("throwaway_npy", "throwaway_bare"):
            DATASETS.remove(n)
            EXAMPLES.pop(n, None)
        sys.modules.pop("my_throwaway_data", None)
