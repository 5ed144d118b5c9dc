"""Distributed training on CPU (gloo), parametrized over the method registry.

Two processes at batch b must end with the same student weights as one process at batch 2b
(``train.sync_bn`` makes batch norm use the global batch; augmentation is off because the
on-device augmentation draws are per rank). Rank 1 runs in its own working directory with a
relative ``output_dir``: that directory must stay empty, which shows only rank 0 writes files.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from relkd.methods import list_methods

METHODS = list_methods()
B = 8  # per-rank batch; the single process runs at 2 * B
# fp32 sums in a different order (all-reduce vs one batch) after a few SGD steps.
ATOL = 2e-5


def _cfg(root: str, ckpt: str, method: str, batch: int) -> dict:
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": ckpt},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": root, "batch_size": batch, "augment": False},
        "optim": {"lr": 0.01},  # at 0.05 this tiny task is chaotic: float-order noise grows
        "schedule": {"name": "constant"},
        "train": {
            "epochs": 2,
            "max_steps_per_epoch": 3,
            "progress": False,
            "tensorboard": False,
            "sync_bn": True,
            "seed": 5,
        },
        "output_dir": "runs",
        "name": method,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str, ckpt: str, dirs: list[str], errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    os.chdir(dirs[rank])
    import relkd

    for m in METHODS:
        try:
            relkd.train(_cfg(root, ckpt, m, B), quiet=True)
        except Exception as e:  # report, keep the other methods going
            errors[f"{m}/{rank}"] = repr(e)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(fmnist_root, tiny_teacher_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    dirs = [base / "rank0", base / "rank1", base / "single"]
    for d in dirs:
        d.mkdir()
    errors = mp.Manager().dict()
    mp.start_processes(
        _worker,
        args=(
            _free_port(),
            str(fmnist_root),
            str(tiny_teacher_ckpt),
            [str(d) for d in dirs],
            errors,
        ),
        nprocs=2,
        start_method="spawn",
    )
    import relkd

    cwd = os.getcwd()
    try:
        os.chdir(dirs[2])
        for m in METHODS:
            relkd.train(_cfg(str(fmnist_root), str(tiny_teacher_ckpt), m, 2 * B), quiet=True)
    finally:
        os.chdir(cwd)
    return dirs, dict(errors)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_equals_single_process(method, ddp_runs):
    (rank0, rank1, single), errors = ddp_runs
    assert not {k: v for k, v in errors.items() if k.startswith(f"{method}/")}
    w_ddp = torch.load(rank0 / "runs" / method / "student.pt", weights_only=True)["model"]
    w_one = torch.load(single / "runs" / method / "student.pt", weights_only=True)["model"]
    assert w_ddp.keys() == w_one.keys()
    for k in w_ddp:
        torch.testing.assert_close(w_ddp[k], w_one[k], atol=ATOL, rtol=1e-4, msg=k)
    # only rank 0 wrote anything
    assert not any(Path(rank1).rglob("*")), sorted(Path(rank1).rglob("*"))[:5]
