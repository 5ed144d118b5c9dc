"""FKD-style teacher replay (relkd.data.replay): replayed crops against torchvision's transform,
their distribution against torchvision's RandomResizedCrop, the store's write-through / read /
staleness rules, and runs that read a stored epoch against the run that wrote it.

Tolerances: a run that reads the store is compared with the run that wrote it *bit for bit*
(the writer hands the method the same dtype-rounded values it stores); replayed images equal
torchvision's ``resized_crop`` + flip + tail applied by hand exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import relkd
from relkd.data import build_datasets
from relkd.data.replay import ReplayCropDataset, ReplayStore, replay_key, replay_unsupported
from relkd.engine.teacher import ReplayTeacher
from relkd.models.base import ModelOutput
from relkd.registry import RelkdError

CLASSES = ["a", "b", "c"]


def _write_tree(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """An ImageFolder tree of JPEGs of varied sizes (so crops differ per image)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{k:03d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("imgfolder"))


def _train_set(tree: Path, size: int = 16):
    train, _, _ = build_datasets("imagefolder", tree, image_size=size)
    return train


def test_replayed_item_equals_the_transform_applied_by_hand(tree):
    train = _train_set(tree)
    sub = Subset(train, [5, 1, 17, 9])
    ds = ReplayCropDataset(sub, seed=3)
    ds.set_epoch(2)
    x, y, extras = ds[2]
    assert extras["index"] == 2 and y == train.samples[17][1]
    top, left, h, w, f = (int(v) for v in extras["aug_params"])
    img = Image.open(train.samples[17][0]).convert("RGB")
    assert top >= 0 and left >= 0 and top + h <= img.height and left + w <= img.width
    ref = TF.resized_crop(img, top, left, h, w, [16, 16], T.InterpolationMode.BILINEAR)
    if f:
        ref = TF.hflip(ref)
    ref = TF.normalize(TF.to_tensor(ref), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.equal(x, ref)
    # a function of (seed, epoch, index) only: same again, other epoch / seed differ
    assert torch.equal(ds[2][0], x)
    ds.set_epoch(3)
    assert not torch.equal(ds[2][2]["aug_params"], extras["aug_params"])
    other = ReplayCropDataset(sub, seed=4)
    other.set_epoch(2)
    assert not torch.equal(other[2][2]["aug_params"], extras["aug_params"])


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (written here, no scipy)."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_replayed_crops_follow_torchvision_distribution(tree):
    """Area fraction, aspect ratio, position and flips of 3000 replayed draws against 3000 of
    torchvision's RandomResizedCrop.get_params on a 30 x 37 image: two-sample KS statistics
    below the alpha = 0.001 critical value 1.95 * sqrt(2 / n) = 0.050."""
    ds = ReplayCropDataset(_train_set(tree), seed=0)
    n, (H, W) = 3000, (30, 37)
    ours = torch.stack([ds.params(i, H, W, epoch=0) for i in range(n)]).numpy()
    torch.manual_seed(0)
    crop = T.RandomResizedCrop(16)
    ref = np.array(
        [crop.get_params(torch.zeros(3, H, W), crop.scale, crop.ratio) for _ in range(n)]
    )
    crit = 1.95 * np.sqrt(2 / n)

    def stats(top, left, h, w):
        return {
            "area": h * w / (H * W),
            "ratio": np.log(w / h),
            "cy": (top + h / 2) / H,
            "cx": (left + w / 2) / W,
        }

    a = stats(*(ours[:, k].astype(float) for k in range(4)))
    b = stats(*(ref[:, k].astype(float) for k in range(4)))
    for k in a:
        assert _ks(a[k], b[k]) < crit, k
    assert abs(ours[:, 4].mean() - 0.5) < 3.3 * 0.5 / np.sqrt(n)  # flips: Bernoulli(0.5)


def test_unsupported_transforms_are_named(tmp_path):
    from relkd.data import FileImageDataset

    samples = [(str(tmp_path / "x.jpg"), 0)]
    mk = lambda tf: FileImageDataset(samples, transform=tf)  # noqa: E731
    assert "no RandomResizedCrop" in replay_unsupported(mk(T.Compose([T.ToTensor()])))
    jitter = T.Compose([T.RandomResizedCrop(8), T.ColorJitter(0.4), T.ToTensor()])
    assert "ColorJitter" in replay_unsupported(mk(jitter))
    flip = T.Compose([T.RandomResizedCrop(8), T.RandomHorizontalFlip(0.3), T.ToTensor()])
    assert "p = 0.5" in replay_unsupported(mk(flip))
    assert replay_unsupported(torch.utils.data.TensorDataset(torch.zeros(2))) is not None
    with pytest.raises(RelkdError, match="cannot wrap"):
        ReplayCropDataset(mk(jitter))


class _Counting:
    """An online teacher stand-in: a fixed linear map of the image, counting its calls."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.w = torch.randn(3 * 16 * 16, 3)
        self.calls = 0

    def __call__(self, images: torch.Tensor, **_) -> ModelOutput:
        self.calls += 1
        return ModelOutput(images.flatten(1) @ self.w / 7.0, {})


def _batches(ds: ReplayCropDataset, epoch: int, bs: int = 5):
    from relkd.data.wrappers import collate_with_extras

    ds.set_epoch(epoch)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()
    for a in range(0, len(order), bs):
        yield collate_with_extras([ds[i] for i in order[a : a + bs]])


def test_store_write_through_then_read(tree, tmp_path):
    ds = ReplayCropDataset(_train_set(tree), seed=1)
    key = replay_key("teacher-x", ds.fingerprint(), ["logits"], "fp16")
    online = _Counting()
    rt = ReplayTeacher(online, ReplayStore.open(tmp_path / "s", key, len(ds)))
    rt.set_epoch(0)
    written = {}
    for x, _, ex in _batches(ds, 0):
        out = rt(x, **ex)
        # the writer hands out exactly what it stores: the fp16-rounded online logits
        ref = online(x).logits
        online.calls -= 1
        assert torch.equal(out.logits, ref.half().float())
        for i, row in zip(ex["index"].tolist(), out.logits):
            written[i] = row
    rt.end_epoch()
    assert online.calls == 5 and ReplayStore.open(tmp_path / "s", key, len(ds)).has_epoch(0)
    assert not list((tmp_path / "s").glob(".tmp-*"))
    stored = np.load(tmp_path / "s" / "epoch_0" / "logits.npy")
    assert stored.dtype == np.float16 and stored.shape == (24, 3)
    # a second reader (another method / seed) sees the same values with no teacher call
    rt2 = ReplayTeacher(_Counting(), ReplayStore.open(tmp_path / "s", key, len(ds)))
    rt2.set_epoch(0)
    for x, _, ex in _batches(ds, 0, bs=7):
        out = rt2(x, **ex)
        for i, row in zip(ex["index"].tolist(), out.logits):
            assert torch.equal(row, written[i])
    assert rt2.teacher.calls == 0
    # an epoch that was not fully seen is not stored
    rt2.set_epoch(1)
    x, _, ex = next(_batches(ds, 1))
    rt2(x, **ex)
    rt2.end_epoch()
    assert not rt2.store.has_epoch(1) and not list((tmp_path / "s").glob(".tmp-*"))


def test_store_refuses_stale_and_changed_crops(tree, tmp_path):
    ds = ReplayCropDataset(_train_set(tree), seed=1)
    key = replay_key("teacher-x", ds.fingerprint(), ["logits"], "fp32")
    store = ReplayStore.open(tmp_path / "s", key, len(ds))
    other = replay_key("teacher-y", ds.fingerprint(), ["logits"], "fp32")
    with pytest.raises(RelkdError, match=r"stale.*teacher"):
        ReplayStore.open(tmp_path / "s", other, len(ds))
    seed2 = ReplayCropDataset(_train_set(tree), seed=2)
    with pytest.raises(RelkdError, match=r"stale.*replay_seed"):
        ReplayStore.open(
            tmp_path / "s",
            replay_key("teacher-x", seed2.fingerprint(), ["logits"], "fp32"),
            len(ds),
        )
    rt = ReplayTeacher(_Counting(), store)
    rt.set_epoch(0)
    for x, _, ex in _batches(ds, 0):
        rt(x, **ex)
    rt.end_epoch()
    # tamper with one recorded crop: the reader refuses rather than answer for another crop
    p = tmp_path / "s" / "epoch_0" / "params.npy"
    arr = np.load(p)
    arr[4, 0] += 1
    np.save(p, arr)
    with pytest.raises(RelkdError, match=r"damaged: params.npy does not match its checksum"):
        rt.set_epoch(0)
    # even with a matching checksum (a forger's), the reader refuses the other crop
    from relkd.data.teacher_cache import file_sha256

    sums_path = tmp_path / "s" / "epoch_0" / "checksums.json"
    sums = json.loads(sums_path.read_text())
    sums["params.npy"] = file_sha256(p)
    sums_path.write_text(json.dumps(sums))
    rt.set_epoch(0)
    with pytest.raises(RelkdError, match="sample 4 was recorded with another crop"):
        for x, _, ex in _batches(ds, 0, bs=24):
            rt(x, **ex)
    with pytest.raises(RelkdError, match="aug_params"):
        rt(torch.zeros(1, 3, 16, 16), index=torch.tensor([0]))


def _restamp(epoch_dir: Path) -> None:
    from relkd.data.teacher_cache import file_sha256

    sums = {f.name: file_sha256(f) for f in epoch_dir.glob("*.npy")}
    (epoch_dir / "checksums.json").write_text(json.dumps(sums))


def test_fingerprint_sees_changed_files(tmp_path):
    root = _write_tree(tmp_path / "t", per_class=2)
    fp = ReplayCropDataset(_train_set(root)).fingerprint()
    moved = tmp_path / "moved"
    root.rename(moved)
    assert ReplayCropDataset(_train_set(moved)).fingerprint() == fp  # relative paths
    f = moved / "train" / "b" / "001.jpg"
    Image.fromarray(np.zeros((50, 9, 3), np.uint8)).save(f)
    assert ReplayCropDataset(_train_set(moved)).fingerprint()["data"] != fp["data"]


# ------------------------------------------------------------------- through relkd.train
class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def _cfg(tree: Path, out: Path, name: str, method: str = "kd", **train) -> dict:
    return {
        "student": {"name": "cnn_tiny"},
        "method": {"name": method},
        "data": {"name": "imagefolder", "root": str(tree), "image_size": 16, "batch_size": 6},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 5,
                  "teacher_replay": str(out / "store"), **train},
        "output_dir": str(out),
        "name": name,
    }  # fmt: skip


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir, "student.pt"), weights_only=True)["model"]


@pytest.mark.parametrize("method", ["kd", "rkd"])  # logits only; logits + pooled features
def test_run_reading_the_store_equals_the_run_that_wrote_it(
    tree, tmp_path, method, capsys, monkeypatch
):
    from relkd.engine import trainer

    torch.manual_seed(0)
    teacher = _Teacher()
    calls, measuring = [], []
    # A teacher passed from Python is evaluated once per run (its top-1 for the report): that
    # pass over the test set is not training and is not counted.
    measure = trainer._python_teacher_top1

    def counted_apart(*a, **k):
        measuring.append(1)
        try:
            return measure(*a, **k)
        finally:
            measuring.pop()

    monkeypatch.setattr(trainer, "_python_teacher_top1", counted_apart)
    # count training forwards (not the all-zero shape probe that every run does once)
    teacher.register_forward_hook(
        lambda m, i, o: calls.append(1) if i[0].abs().sum() and not measuring else None
    )
    first = relkd.train(_cfg(tree, tmp_path, "first", method), teacher=teacher)
    assert first["teacher_top1"] >= 0.0
    err = capsys.readouterr().err
    assert "not stored yet: online teacher, writing it" in err and calls
    assert (tmp_path / "store" / "epoch_0").is_dir() and (tmp_path / "store" / "epoch_1").is_dir()
    taps = json.loads((tmp_path / "store" / "manifest.json").read_text())["parts"]["taps"]
    assert taps == (["logits", "pooled"] if method == "rkd" else ["logits"])
    n_first = len(calls)
    again = relkd.train(_cfg(tree, tmp_path, "again", method), teacher=teacher)
    err = capsys.readouterr().err
    assert "epoch 2 from the store, no teacher forward pass" in err
    assert len(calls) == n_first  # no teacher forward while training the second run
    wa, wb = _weights(first["run_dir"]), _weights(again["run_dir"])
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # another training seed shares the stored crops and outputs (the FKD design)
    relkd.train(_cfg(tree, tmp_path, "seed6", method, seed=6), teacher=teacher, quiet=True)
    assert len(calls) == n_first


def test_replay_falls_back_and_says_why(tree, tmp_path, fmnist_root, tiny_teacher_ckpt, capsys):
    torch.manual_seed(0)
    teacher = relkd.create_model("cnn_small", 3, in_chans=3)  # a zoo model: it has stages
    relkd.train(_cfg(tree, tmp_path, "at", "at", epochs=1), teacher=teacher)
    err = capsys.readouterr().err
    assert err.count("teacher replay:") == 1 and "needs teacher features" in err
    assert not (tmp_path / "store").exists()
    cfg = {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)},
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "train_subset": 64},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "teacher_replay": "auto"},
        "output_dir": str(tmp_path),
        "name": "fm",
    }
    relkd.train(cfg)
    assert "in-memory pipeline" in capsys.readouterr().err


def test_truncated_epochs_are_not_stored(tree, tmp_path, capsys):
    torch.manual_seed(0)
    relkd.train(_cfg(tree, tmp_path, "short", max_steps_per_epoch=2), teacher=_Teacher())
    assert "not every sample was seen" in capsys.readouterr().err
    assert not list((tmp_path / "store").glob("epoch_*"))
    assert not list((tmp_path / "store").glob(".tmp-*"))


# ------------------------------------------------------------------- under DDP (gloo)
DDP_B = 6  # per-rank batch; the single process runs at 2 * DDP_B


def _ddp_cfg(tree: str, ckpt: str, store: str, batch: int) -> dict:
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": ckpt},
        "method": {"name": "kd"},
        "data": {"name": "imagefolder", "root": tree, "image_size": 16, "batch_size": batch},
        "optim": {"lr": 1e-3},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 5,
                  "sync_bn": True, "teacher_replay": store},
        "output_dir": "runs",
        "name": "kd",
    }  # fmt: skip


def _ddp_worker(rank: int, port: int, tree: str, ckpt: str, store: str, dirs: list[str], errors):
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    os.chdir(dirs[rank])
    try:
        relkd.train(_ddp_cfg(tree, ckpt, store, DDP_B), quiet=True)
    except Exception as e:
        errors[rank] = repr(e)
    torch.distributed.destroy_process_group()


def test_ddp_reads_the_store_like_one_process(tree, tmp_path, monkeypatch):
    """A store written by one process at batch 2b (then altered, so that reading it is visible)
    is read by 2 ranks at batch b and by one process at 2b: the crops are a function of (replay
    seed, epoch, index), so all see the same teacher outputs, and the DDP student equals the
    single-process one (fp32 sum-order noise only: rtol 1e-4, atol 1e-6 after 4 steps at lr
    1e-3). The ranks write nothing into the store; rank 1 writes no file at all."""
    import os
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save(relkd.create_model("cnn_small", 3, in_chans=3).state_dict(), ckpt)
    store = tmp_path / "store"
    dirs = [tmp_path / "rank0", tmp_path / "rank1", tmp_path / "single"]
    for d in dirs:
        d.mkdir()
    monkeypatch.chdir(tmp_path)
    relkd.train(_ddp_cfg(str(tree), str(ckpt), str(store), 2 * DDP_B), quiet=True)
    stored = sorted(p.name for p in store.iterdir())
    assert stored == ["epoch_0", "epoch_1", "manifest.json"]
    # Scale the stored logits: a run that reads the store now trains differently from one that
    # runs the teacher, which tells the two apart below.
    for e in stored[:2]:
        f = store / e / "logits.npy"
        np.save(f, np.load(f) * 3)
        _restamp(store / e)  # a deliberate change: record its checksum, as a writer would
    monkeypatch.chdir(dirs[2])
    relkd.train(_ddp_cfg(str(tree), str(ckpt), str(store), 2 * DDP_B), quiet=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = mp.Manager().dict()
    mp.start_processes(
        _ddp_worker,
        args=(port, str(tree), str(ckpt), str(store), [str(d) for d in dirs], errors),
        nprocs=2,
        start_method="spawn",
    )
    assert not dict(errors)
    w_one = _weights(str(dirs[2] / "runs" / "kd"))
    w_ddp = _weights(str(dirs[0] / "runs" / "kd"))
    w_online = _weights(str(tmp_path / "runs" / "kd"))
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.allclose(w_one["fc.weight"], w_online["fc.weight"], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in store.iterdir()) == stored
    assert not any(Path(dirs[1]).rglob("*")) and os.listdir(dirs[1]) == []


# ------------------------------------------------------------ trust (issue 14 item 3)
def test_same_size_edit_changes_the_key_and_the_stale_store_is_refused(tmp_path):
    """BMP images: a pixel edit keeps the byte size (and the image size, hence the crops); the
    content hash still changes the key, so the old teacher outputs are never reused."""
    root = tmp_path / "bmp"
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for k in range(2):
                arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{k}.bmp")
    ds = ReplayCropDataset(_train_set(root), seed=0)
    key = replay_key("teacher-x", ds.fingerprint(), ["logits"], "fp16")
    ReplayStore.open(tmp_path / "s", key, len(ds))
    f = root / "train" / "b" / "1.bmp"
    size = f.stat().st_size
    arr = np.asarray(Image.open(f)).copy()
    arr[5, 7] = 255 - arr[5, 7]
    Image.fromarray(arr).save(f)
    assert f.stat().st_size == size
    ds2 = ReplayCropDataset(_train_set(root), seed=0)
    key2 = replay_key("teacher-x", ds2.fingerprint(), ["logits"], "fp16")
    assert key2[0] != key[0]
    with pytest.raises(RelkdError, match=r"stale.*data"):
        ReplayStore.open(tmp_path / "s", key2, len(ds2))


def _write_epoch(tree: Path, path: Path):
    ds = ReplayCropDataset(_train_set(tree), seed=1)
    key = replay_key("teacher-x", ds.fingerprint(), ["logits"], "fp16")
    rt = ReplayTeacher(_Counting(), ReplayStore.open(path, key, len(ds)))
    rt.set_epoch(0)
    for x, _, ex in _batches(ds, 0):
        rt(x, **ex)
    rt.end_epoch()
    assert rt.store.has_epoch(0)
    return ds, key, rt


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_checksums"])
def test_damaged_epochs_are_refused_not_used(tree, tmp_path, damage):
    ds, key, _ = _write_epoch(tree, tmp_path / "s")
    f = tmp_path / "s" / "epoch_0" / "logits.npy"
    if damage == "garbage":  # same shape, same dtype, other values
        arr = np.load(f, mmap_mode="r+")
        arr[:] = np.random.default_rng(0).normal(0, 30, arr.shape).astype(arr.dtype)
        arr.flush()
        del arr
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:90])
    else:
        (tmp_path / "s" / "epoch_0" / "checksums.json").write_text("{}")
    rt = ReplayTeacher(_Counting(), ReplayStore.open(tmp_path / "s", key, len(ds)))
    with pytest.raises(RelkdError) as e:
        rt.set_epoch(0)
    assert "damaged" in str(e.value) and "\n" not in str(e.value)


def test_full_disk_epoch_write_fails_with_one_line(tree, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    ds = ReplayCropDataset(_train_set(tree), seed=1)
    key = replay_key("teacher-x", ds.fingerprint(), ["logits"], "fp16")
    store = ReplayStore.open(tmp_path / "s", key, len(ds))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    rt = ReplayTeacher(_Counting(), store)
    with pytest.raises(RelkdError) as e:
        rt.set_epoch(0)  # the params array (24 x 5 int64 = 960 bytes) does not fit
    msg = str(e.value)
    assert f"needs {24 * 5 * 8} bytes" in msg and str(tmp_path / "s") in msg and "\n" not in msg
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_one_writer_per_epoch_and_its_commit_is_fenced(tmp_path, monkeypatch):
    """An epoch has one writer at a time (its claim ``.epoch_<e>.claim``, valid across nodes):
    a second writer is refused while the first holds it; a writer whose claim was taken over
    discards its epoch at the commit instead of renaming it into place."""
    from relkd.claims import Claim, ClaimLost

    n = 4
    key = replay_key("teacher-x", {"data": "d"}, ["logits"], "fp32")
    store = ReplayStore.open(tmp_path / "s", key, n)
    w = store.writer(0)
    assert w is not None and store.writer(0) is None  # claimed by w
    out = ModelOutput(torch.arange(n * 3, dtype=torch.float32).view(n, 3), {})
    w.put(torch.arange(n), torch.zeros(n, 5, dtype=torch.long), out)
    assert w.commit() and store.has_epoch(0)
    assert sorted(p.name for p in store.path.iterdir()) == ["epoch_0", "manifest.json"]

    w1 = store.writer(1)
    w1.put(torch.arange(n), torch.zeros(n, 5, dtype=torch.long), out)

    def stolen(self, action="writing"):
        raise ClaimLost(f"taken over; stopping before {action}")

    monkeypatch.setattr(Claim, "check", stolen)
    assert w1.commit() is False and not store.has_epoch(1)
    assert sorted(p.name for p in store.path.iterdir()) == ["epoch_0", "manifest.json"]
