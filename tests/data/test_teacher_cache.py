"""Exact teacher-output cache: every entry against an independent crop + flip, staleness, and a
cached KD run against the online one step for step.

Tolerances (stated, measured on CPU fp32):

* entries, fp32 storage: the cache's teacher input is bit-identical to the loader's, so the only
  difference is the batch the teacher saw (conv / matmul blocking): ``atol = rtol = 1e-5``.
* entries, fp16 storage: the fp32 value rounded to nearest fp16, relative error <= 2^-11.
* cached vs online KD run, fp32 storage: per-epoch losses and final weights within ``1e-5``
  relative (observed: bit-identical on CPU).
* cached vs online KD run, fp16 storage: the teacher logits carry relative errors <= 2^-11, so
  the KD term (T = 4) moves by ~1e-4 relative and the weights drift slowly; we assert ``2e-3``
  relative on the losses and ``1e-3`` absolute on the weights after 6 steps (observed: 4e-5
  and 2.5e-4).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.transforms import functional as TF

import relkd
from relkd.data import InMemoryLoader
from relkd.data.teacher_cache import (
    TeacherCache,
    apply_resized_crop,
    cache_key,
    draw_resized_crop_params,
    load_aug_record,
    num_outcomes,
    outcome_table,
    save_aug_record,
)
from relkd.engine.teacher import CachedTeacher, Teacher
from relkd.registry import RelkdError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class _Net(nn.Module):
    def __init__(self, c: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        # position-sensitive pooling: crops and flips give different outputs
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _images(n: int = 6, h: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, h), generator=g, dtype=torch.uint8)


def _build(model, images, path, padding=2, flip=True, **kw) -> TeacherCache:
    kw.setdefault("dtype", "fp32")
    return TeacherCache.build(
        model, images, padding=padding, flip=flip, mean=MEAN, std=STD, path=path,
        batch_size=4, progress=False, log=None, **kw,
    )  # fmt: skip


def _reference(model: nn.Module, img_u8: torch.Tensor, p: int, oy: int, ox: int, f: bool):
    """torchvision-style RandomCrop(padding=p, fill=0) + flip + ToTensor + Normalize, by hand."""
    x = TF.pad(img_u8, [p, p, p, p], fill=0)
    x = TF.crop(x, oy, ox, img_u8.shape[1], img_u8.shape[2])
    if f:
        x = TF.hflip(x)
    x = TF.normalize(x.float() / 255, MEAN, STD)
    with torch.no_grad():
        logits = model(x[None])[0]
        pooled = nn.functional.adaptive_avg_pool2d(
            torch.relu(model.bn(model.conv(x[None]))), 2
        ).flatten(1)[0]
    return logits, pooled


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_entry_is_the_teacher_on_that_outcome(tmp_path, dtype):
    model, images, p = _teacher(), _images(), 2
    cache = _build(model, images, tmp_path / "c", padding=p, taps=("logits", "pooled"), dtype=dtype)
    assert cache.num_outcomes == num_outcomes(p, True) == 50
    offsets, flips = outcome_table(p, True)
    assert len({(int(o[0]), int(o[1]), bool(f)) for o, f in zip(offsets, flips)}) == 50
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "fp32" else dict(atol=1e-5, rtol=2**-11)
    for i in range(len(images)):
        out = cache.lookup(torch.full((50,), i), offsets, flips)
        assert out.logits.dtype == torch.float32 and out.logits.shape == (50, 5)
        for k in range(50):
            oy, ox, f = int(offsets[k, 0]), int(offsets[k, 1]), bool(flips[k])
            logits, pooled = _reference(model, images[i], p, oy, ox, f)
            torch.testing.assert_close(out.logits[k], logits, **tol)
            torch.testing.assert_close(out.feats["pooled"][k], pooled, **tol)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["parts"]["dtype"] == dtype and manifest["num_outcomes"] == 50


def test_lookup_matches_teacher_on_loader_batches(tmp_path):
    """The loader's drawn augmentation (return_aug) indexes the entry of exactly its image."""
    model, images = _teacher(), _images(10)
    cache = _build(model, images, tmp_path / "c")
    loader = InMemoryLoader(
        images, torch.arange(10), batch_size=4, shuffle=True, augment=True, padding=2,
        flip=True, mean=MEAN, std=STD, return_aug=True, seed=5,
    )  # fmt: skip
    cached, online = CachedTeacher(cache), Teacher(model)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, _, extras in loader:
            assert set(extras) == {"index", "aug_offsets", "aug_flips"}
            torch.testing.assert_close(
                cached(x, **extras).logits, online(x).logits, atol=1e-5, rtol=1e-5
            )
    # augmentation off: zeros / False, the identity of a padding-0, no-flip cache
    plain = InMemoryLoader(
        images, torch.arange(10), batch_size=10, shuffle=False, augment=False, padding=2,
        flip=True, mean=MEAN, std=STD, return_aug=True,
    )  # fmt: skip
    x, _, extras = next(iter(plain))
    assert plain.aug_padding == 0 and not plain.aug_flip
    assert not extras["aug_offsets"].any() and not extras["aug_flips"].any()
    c0 = _build(model, images, tmp_path / "c0", padding=0, flip=False)
    assert c0.num_outcomes == 1
    torch.testing.assert_close(
        CachedTeacher(c0)(x, **extras).logits, online(x).logits, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(RelkdError, match="return_aug"):
        cached(x)
    # preloaded onto the device: same entries
    pre = TeacherCache.open(tmp_path / "c", key=cache.key, preload=True)
    idx, off, fl = (
        torch.tensor([0, 9, 3]),
        torch.tensor([[0, 4], [2, 2], [4, 1]]),
        torch.tensor([True, False, True]),
    )
    assert torch.equal(pre.lookup(idx, off, fl).logits, cache.lookup(idx, off, fl).logits)


def test_stale_cache_is_refused_or_rebuilt(tmp_path):
    model, images = _teacher(), _images()
    path = tmp_path / "c"
    key0 = _build(model, images, path).key
    assert _build(model, images, path, rebuild="never").key == key0  # opens, no rebuild

    other = _teacher()
    with torch.no_grad():
        other.fc.weight[0, 0] += 1e-3
    images2 = images.clone()
    images2[3, 1, 4, 4] ^= 1
    changes = [
        dict(model=other, images=images, padding=2),
        dict(model=model, images=images2, padding=2),
        dict(model=model, images=images, padding=1),
    ]
    for ch in changes:
        key = cache_key(
            ch["model"], ch["images"], padding=ch["padding"], flip=True, mean=MEAN, std=STD,
            dtype="fp32",
        )[0]  # fmt: skip
        assert key != key0
        for policy in ("never", "missing"):
            with pytest.raises(RelkdError, match="stale"):
                _build(ch["model"], ch["images"], path, padding=ch["padding"], rebuild=policy)
        with pytest.raises(RelkdError, match="stale"):
            TeacherCache.open(path, key=key)
        rebuilt = _build(ch["model"], ch["images"], path, padding=ch["padding"], rebuild="auto")
        assert rebuilt.key == key and TeacherCache.open(path, key=key).key == key
        _build(model, images, path)  # back to the original
    # storage dtype is part of the key; a missing cache with rebuild=never is an error
    with pytest.raises(RelkdError, match="stale"):
        _build(model, images, path, dtype="fp16", rebuild="never")
    with pytest.raises(RelkdError, match="no teacher cache"):
        _build(model, images, tmp_path / "absent", rebuild="never")
    # never overwrite a folder that is not a cache; no temporary folders left behind
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(RelkdError, match="not a relkd teacher cache"):
        _build(model, images, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "user"]


def test_resized_crop_records_replay():
    """FKD-style recording: one epoch's RandomResizedCrop + flip parameters, reproducible from
    (seed, epoch), valid crops, saved and replayed."""
    hs, ws = [40, 64, 30, 500] * 50, [50, 48, 30, 20] * 50
    a = draw_resized_crop_params(hs, ws, seed=1, epoch=2)
    assert torch.equal(a, draw_resized_crop_params(hs, ws, seed=1, epoch=2))
    assert not torch.equal(a, draw_resized_crop_params(hs, ws, seed=1, epoch=3))
    top, left, h, w, f = a.unbind(1)
    H, W = torch.tensor(hs), torch.tensor(ws)
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all() and set(f.tolist()) == {0, 1}
    fb = a[3]  # 500 x 20: no attempt fits the ratio -> torchvision's central crop
    assert fb[:4].tolist() == [(500 - 27) // 2, 0, 27, 20]


def test_aug_record_roundtrip(tmp_path):
    params = draw_resized_crop_params([16, 16], [16, 16], seed=0, epoch=0)
    save_aug_record(tmp_path, 0, params)
    assert torch.equal(load_aug_record(tmp_path, 0), params)
    img = _images(1, h=16)[0]
    out = apply_resized_crop(img, params[0], 8)
    assert out.shape == (3, 8, 8)
    with pytest.raises(RelkdError):
        load_aug_record(tmp_path, 1)


# ---------------------------------------------------------------- end to end (relkd.train)
def _cfg(root: Path, ckpt: Path, out: Path, name: str, method: str = "kd", **train) -> dict:
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32, "train_subset": 96},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 3, **train},
        "output_dir": str(out),
        "name": name,
    }


def _records(run_dir: str) -> list[dict]:
    recs = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("epoch_time_s")
    return recs


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir, "student.pt"), weights_only=True)["model"]


def _assert_runs_close(a: str, b: str, rel: float, w_atol: float) -> None:
    ra, rb = _records(a), _records(b)
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in ("train/kd", "train/ce", "train/loss", "test_loss"):
            assert x[k] == pytest.approx(y[k], rel=rel), k
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=w_atol, rtol=rel, msg=k)


def test_cached_kd_run_equals_online_run(fmnist_root, tiny_teacher_ckpt, tmp_path, capsys):
    online = relkd.train(_cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "online"), quiet=True)
    path = tmp_path / "cache32"
    cached = relkd.train(
        _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "cached32", teacher_cache=str(path),
             teacher_cache_dtype="fp32"),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "teacher cache: building" in err and "96 images x 50 outcomes" in err
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["num_images"] == 96 and manifest["parts"]["taps"] == ["logits"]
    _assert_runs_close(online["run_dir"], cached["run_dir"], rel=1e-5, w_atol=1e-6)

    # fp16 storage; a second run reuses the cache (no rebuild)
    p16 = tmp_path / "cache16"
    for name in ("cached16", "cached16b"):
        r16 = relkd.train(
            _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, name, teacher_cache=str(p16)),
        )  # fmt: skip
        err = capsys.readouterr().err
        assert ("teacher cache: building" in err) == (name == "cached16")
        assert "no teacher forward pass" in err
        _assert_runs_close(online["run_dir"], r16["run_dir"], rel=2e-3, w_atol=1e-3)
    # a stale cache at an explicit path is refused
    with pytest.raises(RelkdError, match="stale"):
        relkd.train(
            _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "stale", teacher_cache=str(path)),
            quiet=True,
        )


@pytest.mark.parametrize("method", ["rkd", "rrd"])
def test_pooled_method_uses_the_cache(
    fmnist_root, tiny_teacher_ckpt, tmp_path, monkeypatch, method
):
    """RKD and RRD read the teacher's pooled features: cached (auto folder) == online. For RRD
    (v5 preset: the batch's teacher rows are enqueued before scoring) this also checks that the
    queue fills from cached rows exactly as from online ones."""
    monkeypatch.setenv("RELKD_CACHE_DIR", str(tmp_path / "home"))
    kw = dict(epochs=1)
    online = relkd.train(
        _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "on", method, **kw), quiet=True
    )
    cached = relkd.train(
        _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "ca", method, teacher_cache="auto",
             teacher_cache_dtype="fp32", **kw),
        quiet=True,
    )  # fmt: skip
    (folder,) = (tmp_path / "home" / "teacher").iterdir()
    assert json.loads((folder / "manifest.json").read_text())["parts"]["taps"] == [
        "logits",
        "pooled",
    ]
    ra, rb = _records(online["run_dir"]), _records(cached["run_dir"])
    for k in ra[0]:
        if k.startswith("train/"):
            assert ra[0][k] == pytest.approx(rb[0][k], rel=1e-5), k
    wa, wb = _weights(online["run_dir"]), _weights(cached["run_dir"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_feature_map_method_falls_back_once(fmnist_root, tiny_teacher_ckpt, tmp_path, capsys):
    path = tmp_path / "cache"
    relkd.train(
        _cfg(fmnist_root, tiny_teacher_ckpt, tmp_path, "at", "at", epochs=2, teacher_cache=str(path)),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("teacher cache:") == 1
    assert "teacher cache: method 'at' needs teacher features" in err
    assert "using the online teacher" in err
    assert not path.exists()


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    """Two builders of the same cache (e.g. two benchmark workers): one builds, the other waits
    on the build lock and then opens the finished cache; both read the same entries."""
    import threading

    monkeypatch.setenv("RELKD_CACHE_DIR", str(tmp_path / "home"))
    model, images = _teacher(), _images(12)
    logs: list[str] = []
    out: list[TeacherCache] = []

    def build() -> None:
        out.append(
            TeacherCache.build(
                model,
                images,
                padding=2,
                flip=True,
                mean=MEAN,
                std=STD,
                path=tmp_path / "c",
                batch_size=4,
                progress=False,
                log=logs.append,
                dtype="fp32",
            )
        )

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and sum("building" in m for m in logs) == 1
    a, b = out
    idx, offs, fl = torch.arange(12), torch.zeros(12, 2, dtype=torch.long), torch.zeros(12).bool()
    assert torch.equal(a.lookup(idx, offs, fl).logits, b.lookup(idx, offs, fl).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # the released claim is gone


# ------------------------------------------------------------ trust (issue 14 item 3 / 5)
def _garble(path: Path) -> None:
    """Same-shape garbage in logits.npy: header kept, every value replaced."""
    import numpy as np

    arr = np.load(path / "logits.npy", mmap_mode="r+")
    arr[:] = np.random.default_rng(0).normal(0, 30, arr.shape).astype(arr.dtype)
    arr.flush()
    del arr


def test_same_shape_garbage_is_refused_then_rebuilt(tmp_path):
    model, images = _teacher(), _images()
    path = tmp_path / "c"
    good = _build(model, images, path)
    idx, offs, fl = torch.arange(6), torch.zeros(6, 2, dtype=torch.long), torch.zeros(6).bool()
    want = good.lookup(idx, offs, fl).logits
    _garble(path)
    with pytest.raises(RelkdError, match=r"damaged: logits.npy does not match its checksum"):
        TeacherCache.open(path, key=good.key)
    with pytest.raises(RelkdError, match="damaged"):
        _build(model, images, path, rebuild="missing")  # an explicit folder is never rebuilt
    rebuilt = _build(model, images, path, rebuild="auto")  # auto: rebuilt, same entries
    assert torch.equal(rebuilt.lookup(idx, offs, fl).logits, want)


def test_spot_check_catches_files_replaced_with_their_checksums(tmp_path):
    from relkd.data.teacher_cache import file_sha256

    model, images = _teacher(), _images()
    path = tmp_path / "c"
    _build(model, images, path, dtype="fp16")  # the tolerance also covers fp16 storage
    _build(model, images, path, dtype="fp16", rebuild="never")  # a good cache passes
    _garble(path)
    m = json.loads((path / "manifest.json").read_text())
    m["checksums"]["logits.npy"] = file_sha256(path / "logits.npy")  # a forger's manifest
    (path / "manifest.json").write_text(json.dumps(m))
    TeacherCache.open(path, key=m["key"])  # the checksum alone is fooled ...
    with pytest.raises(RelkdError, match="spot check"):  # ... the live teacher is not
        _build(model, images, path, dtype="fp16", rebuild="never")


@pytest.mark.parametrize("damage", ["missing", "truncated", "no_checksums"])
def test_missing_or_truncated_files_one_line(tmp_path, damage):
    model, images = _teacher(), _images()
    path = tmp_path / "c"
    key = _build(model, images, path).key
    f = path / "logits.npy"
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    else:
        m = json.loads((path / "manifest.json").read_text())
        del m["checksums"]
        (path / "manifest.json").write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(RelkdError) as e:
            TeacherCache.open(path, key=key, verify=verify)
        assert "damaged" in str(e.value) and "\n" not in str(e.value)


def test_full_disk_fails_with_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    model, images = _teacher(), _images()
    with pytest.raises(RelkdError) as e:
        _build(model, images, tmp_path / "c")
    need = 6 * num_outcomes(2, True) * 5 * 4  # N x K x classes x fp32
    msg = str(e.value)
    assert f"needs {need} bytes" in msg and str(tmp_path) in msg and "1000 bytes free" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_build_claim_is_beside_the_cache_and_fences_the_commit(tmp_path, monkeypatch):
    """The build claim is a relkd.claims claim beside the cache (same file system, so builders
    on other nodes see it): a second claimant is refused while it is held, and a builder whose
    claim was taken over before the commit leaves the cache folder untouched."""
    from relkd.claims import Claim, ClaimLost
    from relkd.data import teacher_cache as tc

    path = tmp_path / "c"
    with tc._build_lock(path, None) as claim:
        assert claim.path == tmp_path / ".c.claim" and claim.holds()
        assert not Claim(claim.path).try_acquire()
    assert not claim.path.exists()  # released

    def stolen(self, action="writing"):
        raise ClaimLost(f"taken over; stopping before {action}")

    monkeypatch.setattr(Claim, "check", stolen)
    with pytest.raises(ClaimLost, match="before committing the teacher cache"):
        _build(_teacher(), _images(), path)
    assert not path.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_builds_temporary_folder_is_swept(tmp_path):
    """SIGKILL leaves `.NAME.tmp-PID-XXXX` beside the cache; the next build of that cache
    removes it when PID is gone and leaves a live process's folder alone."""
    import subprocess
    import sys

    path = tmp_path / "c"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    left = tmp_path / f".c.tmp-{dead.pid}-deadbeef"
    (left / "sub").mkdir(parents=True)
    (left / "logits.npy").write_bytes(b"\0" * 1000)
    live = tmp_path / f".c.tmp-{os.getpid()}-0badf00d"
    live.mkdir()
    _build(_teacher(), _images(), path)
    assert not left.exists() and live.exists()
    assert (path / "logits.npy").is_file()
