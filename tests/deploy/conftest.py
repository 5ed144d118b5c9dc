"""Run folders for the deploy tests: a cnn_small -> cnn_tiny kd student and its CE twin, trained
for two steps on the tiny Fashion-MNIST set (numbers, not accuracy, are under test)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _train(root: Path, out: Path, name: str, model: str, **extra) -> Path:
    import relkd

    cfg = {
        "student": {"name": model},
        "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "progress": False,
                  "tensorboard": False, "device": "cpu"},
        "schedule": {"name": "constant"},
        "output_dir": str(out),
        "name": name,
    }  # fmt: skip
    cfg.update(extra)
    return Path(relkd.train(cfg, quiet=True)["run_dir"])


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy_runs")


@pytest.fixture(scope="session")
def kd_run(fmnist_root, tiny_teacher_ckpt, runs_root) -> Path:
    return _train(
        fmnist_root, runs_root, "kd", "cnn_tiny", method={"name": "kd"},
        teacher={"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)},
    )  # fmt: skip


@pytest.fixture(scope="session")
def ce_run(fmnist_root, runs_root) -> Path:
    return _train(fmnist_root, runs_root, "ce", "cnn_tiny")


@pytest.fixture(scope="session")
def tv_run(fmnist_root, tmp_path_factory) -> Path:
    """A torchvision student (resnet18, 1-channel stem) trained without a teacher."""
    return _train(fmnist_root, tmp_path_factory.mktemp("tv"), "tv", "torchvision:resnet18")
