"""Training on a CUDA device: bf16, fp16 with the gradient scaler, torch.compile, channels_last,
the teacher cache preloaded onto the device, on-device data. Skipped without CUDA (run by
benchmarks/gpu/run.sh on a GPU machine); every test compares the GPU run with a reference, not
only that it runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import relkd

#: RELKD_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves).
DEVICE = os.environ.get("RELKD_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)


def _cfg(root, out, name, ckpt, method="kd", **train):
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32, "augment": False},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 3,
                  "device": DEVICE, **train},
        "output_dir": str(out),
        "name": name,
    }  # fmt: skip


def _records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _train(root, out, name, ckpt, **kw) -> tuple[dict, list[dict]]:
    res = relkd.train(_cfg(root, out, name, ckpt, **kw), quiet=True)
    return res, _records(res["run_dir"])


@pytest.fixture(scope="module")
def fp32_run(fmnist_root, tiny_teacher_ckpt, tmp_path_factory):
    return _train(fmnist_root, tmp_path_factory.mktemp("fp32"), "fp32", tiny_teacher_ckpt)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(precision, fp32_run, fmnist_root, tiny_teacher_ckpt, tmp_path):
    res, recs = _train(fmnist_root, tmp_path, precision, tiny_teacher_ckpt, precision=precision)
    _, ref = fp32_run
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in recs)
    assert recs[-1]["train/loss"] < recs[0]["train/loss"]
    # same data order and init as fp32: the first epoch's loss agrees to autocast's rounding
    assert recs[0]["train/loss"] == pytest.approx(ref[0]["train/loss"], rel=0.05)
    w = torch.load(Path(res["run_dir"]) / "student.pt", weights_only=True)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in w.values())  # fp32 master weights
    ck = torch.load(Path(res["run_dir"]) / "checkpoint.pt", weights_only=False)
    scale = (ck.get("scaler") or {}).get("scale")
    if precision == "fp16":  # the GradScaler is on and has a finite positive scale
        assert scale is not None and 0 < float(scale) < float("inf")
    else:  # bf16 needs no scaler
        assert scale is None


def test_compile_on_cuda_gives_the_eager_losses(fp32_run, fmnist_root, tiny_teacher_ckpt, tmp_path):
    _, comp = _train(fmnist_root, tmp_path, "compiled", tiny_teacher_ckpt, compile=True)
    _, eager = fp32_run
    for k in ("train/kd", "train/ce"):
        assert comp[0][k] == pytest.approx(eager[0][k], rel=1e-3)
    assert comp[-1]["top1"] == pytest.approx(eager[-1]["top1"], abs=2.0)


def test_channels_last_on_cuda_gives_the_same_losses(
    fp32_run, fmnist_root, tiny_teacher_ckpt, tmp_path
):
    _, cl = _train(fmnist_root, tmp_path, "cl", tiny_teacher_ckpt, channels_last=True)
    _, ref = fp32_run
    for k in ("train/kd", "train/ce"):
        assert cl[0][k] == pytest.approx(ref[0][k], rel=1e-3)


def test_teacher_cache_preloaded_on_cuda(fmnist_root, tiny_teacher_ckpt, tmp_path):
    """A KD run reading the exact teacher cache (fp32 storage, preloaded onto the GPU) trains like
    the online teacher; the cache's arrays live on the device."""
    from relkd.data.teacher_cache import TeacherCache

    kw = {"teacher_cache_dtype": "fp32"}
    _, online = _train(fmnist_root, tmp_path, "online", tiny_teacher_ckpt, **kw)
    cache_dir = tmp_path / "cache"
    _, cached = _train(
        fmnist_root, tmp_path, "cached", tiny_teacher_ckpt, teacher_cache=str(cache_dir), **kw
    )
    for k in ("train/kd", "train/ce"):
        assert cached[0][k] == pytest.approx(online[0][k], rel=1e-4)
    folder = next(cache_dir.rglob("manifest.json")).parent  # the run built and used a cache
    key = json.loads((folder / "manifest.json").read_text())["key"]
    pre = TeacherCache.open(folder, key=key, device=DEVICE, preload=True)
    disk = TeacherCache.open(folder, key=key)
    idx = torch.arange(4)
    off, flip = torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
    got = pre.lookup(idx.to(DEVICE), off.to(DEVICE), flip.to(DEVICE)).logits
    assert got.device.type == DEVICE
    assert torch.equal(got.cpu(), disk.lookup(idx, off, flip).logits.cpu())


@pytest.mark.skipif(DEVICE != "cuda", reason="compares CUDA with CPU batches")
def test_on_device_data_matches_the_cpu_batches():
    """The in-memory loader on CUDA yields the CPU loader's batches (augmentation included)."""
    from tests.data.test_memory import test_cuda_matches_cpu

    test_cuda_matches_cpu()
