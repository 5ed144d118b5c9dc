"""``relkd bench speed``: records, JSON lines, errors. No timing assertions (speed is measured
in benchmarks/speed.md only)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from relkd.bench.speed import NUMBER_KEYS, RECORD_KEYS, format_table, run_speed, speed_ratios
from relkd.cli import main
from relkd.registry import RelkdError

TINY = dict(
    batch=8,
    steps=3,
    warmup=1,
    device="cpu",
    image_size=28,
    in_chans=1,
    num_classes=10,
    num_train_samples=64,
)
CLI_TINY = [
    "--teacher", "cnn_small", "--student", "cnn_tiny", "--batch", "8", "--steps", "2",
    "--warmup", "1", "--device", "cpu", "--image-size", "28", "--in-chans", "1",
    "--num-classes", "10", "--num-train-samples", "64",
]  # fmt: skip


def check_ok(rec: dict) -> None:
    assert rec["status"] == "ok", rec
    for k in NUMBER_KEYS:
        v = rec[k]
        assert isinstance(v, float) and math.isfinite(v), (k, v)
        if k in ("peak_mem_mb", "step_mem_mb", "warmup_s"):
            assert v >= 0, (k, v)  # RSS growth on CPU may be 0 for a step that allocates nothing
        else:
            assert v > 0, (k, v)
    assert rec["images_per_s"] == pytest.approx(rec["batch"] / (rec["step_ms_median"] / 1e3))
    assert rec["mem_source"] in ("rss_vmhwm", "rss_vmhwm_since_start")
    assert rec["nonfinite_steps"] == 0


def test_run_speed_records(tmp_path):
    import os
    import subprocess
    import sys

    # What killed runs leave: a folder of a pid that is gone is removed, a live pid's kept.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"relkd_speed_cache_{dead.pid}_abc" / "logits").mkdir(parents=True)
    live = tmp_path / f"relkd_speed_cache_{os.getppid()}_def"
    live.mkdir()
    threads = torch.get_num_threads()
    recs = run_speed(
        "cnn_small", "cnn_tiny", ["ce", "kd,crd"], threads=1, data_workers=(0,),
        cache_root=str(tmp_path), **TINY,
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # restored
    # the temporary teacher caches are removed, and so is the dead run's
    assert [p.name for p in tmp_path.iterdir()] == [live.name]
    got = [(r["config"], r["method"], r["workers"]) for r in recs]
    assert got == [
        ("teacher_forward", None, None),
        ("student_ce_step", "ce", None),
        ("online_step", "kd", None),
        ("cached_step", "kd", None),
        ("cached_step_preloaded", "kd", None),
        ("online_step", "crd", None),  # memory bank: per-step sample indices
        ("cached_step", "crd", None),
        ("cached_step_preloaded", "crd", None),
        ("data_inmemory", None, None),
        ("data_dataloader", None, 0),
    ]
    for r in recs:
        assert set(r) == set(RECORD_KEYS)
        assert r["threads"] == 1 and r["batch"] == 8 and r["steps"] == 3 and r["warmup"] == 1
        check_ok(r)
    for r in recs[:8]:
        assert (r["precision"], r["channels_last"], r["compile"]) == ("fp32", False, False)
        assert r["rounds"] == 3  # interleaved in min(rounds=5, steps=3) blocks
    assert "memory-mapped" in recs[3]["cache"] and "preloaded" in recs[4]["cache"]
    assert "pooled" not in recs[3]["cache"] and "pooled" in recs[6]["cache"]  # crd reads pooled
    assert all(r["cache"] is None for r in recs if not r["config"].startswith("cached"))
    kinds = {q["ratio"] for q in speed_ratios(recs)}
    assert kinds == {
        "online / (ce + teacher)",
        "cached / ce",
        "cached (preloaded) / ce",
        "inmemory / dataloader(workers=0)",
    }
    for q in speed_ratios(recs):
        assert q["value"] > 0 and math.isfinite(q["value"])
        assert (q["meets"] is None) == (q["target"] is None)


def test_the_timed_step_is_the_engines(monkeypatch):
    """Every timed (and warm-up) training step is a call of the engine's TrainStep, the step
    fit runs: no copy of the step lives in the benchmark."""
    from relkd.config import TrainConfig
    from relkd.engine.step import TrainStep

    calls: list[tuple[str, bool, tuple[str, ...]]] = []
    reads: list[int] = []
    real, real_read = TrainStep.__call__, TrainStep.read

    def spy(self, x, y, extras=None):
        calls.append((self.method_name, self.teacher is not None, tuple(sorted(extras or {}))))
        return real(self, x, y, extras)

    def spy_read(self):
        reads.append(self.calls)  # steps since start_epoch at the read
        return real_read(self)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    monkeypatch.setattr(TrainStep, "read", spy_read)
    monkeypatch.setattr(TrainConfig, "log_every", 3)
    recs = run_speed("cnn_small", "cnn_tiny", "kd", data=False, cache_variants="engine", **TINY)
    assert [r["config"] for r in recs] == [
        "teacher_forward", "student_ce_step", "online_step", "cached_step",
    ]  # fmt: skip
    ce, online = ("ce", False, ()), ("kd", True, ())
    cached = ("kd", True, ("aug_flips", "aug_offsets", "index"))
    # 2 priming steps, then one warm-up step each, then 3 interleaved rounds of 1 step each.
    assert calls == [ce] * 2 + [ce, online, cached] * (TINY["warmup"] + TINY["steps"])
    assert all(r["nonfinite_steps"] == 0 for r in recs if r["config"] != "teacher_forward")
    # fit's read point every train.log_every (here 3) steps, then one untimed read at the end:
    # the priming step (2 calls) is read never; each configuration at its 3rd step and after 4.
    assert sorted(reads) == [3, 3, 3, 4, 4, 4]


def test_options_and_skipped_cache():
    """One record per (precision, channels_last) x configuration; a cache over the budget is a
    skipped record with a reason, not a silent omission."""
    opts = {**TINY, "steps": 1, "warmup": 0}
    recs = run_speed(
        "cnn_small", "cnn_tiny", "kd", precisions="fp32,bf16", channels_last=(False, True),
        data=False, cache_budget_mb=0, cache_variants="engine", **opts,
    )  # fmt: skip
    assert len(recs) == 2 * 2 * 4
    combos = {(r["precision"], r["channels_last"]) for r in recs}
    assert combos == {("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    for r in recs:
        if r["config"] == "cached_step":
            assert r["status"] == "skipped" and "cache_budget_mb" in r["reason"]
            assert all(r[k] is None for k in NUMBER_KEYS)
        else:
            check_ok(r)


def test_wrapped_dataset_and_feature_methods():
    """A method with its own training-set structure (corsd: triplets -> 3B images) runs; a
    method reading teacher feature maps (at) has no cached step in the engine: skipped, why."""
    recs = run_speed("cnn_small", "cnn_tiny", ["corsd", "at"], data=False, **{**TINY, "steps": 1})
    got = [(r["config"], r["method"]) for r in recs]
    assert got == [
        ("teacher_forward", None),
        ("student_ce_step", "ce"),
        ("online_step", "corsd"),
        ("online_step", "at"),
        ("cached_step", "at"),
        ("cached_step_preloaded", "at"),
    ]
    for r in recs[:-2]:
        check_ok(r)
    for r in recs[-2:]:
        assert r["status"] == "skipped" and "teacher features" in r["reason"]
    table = format_table(recs).splitlines()
    assert len(table) == 2 + len(recs) and all(len(row.split("|")) == 15 for row in table)
    assert table[2].startswith("| teacher_forward |  | fp32 | False | False |  | ")
    assert f"| corsd | fp32 | False | False |  | {recs[2]['step_ms_median']:.2f} |" in table[4]
    assert "| at | fp32 | False | False |  | skipped: teacher cache: method 'at' needs" in table[-1]


def test_cli_json_lines(capsys):
    assert main(["bench", "speed", *CLI_TINY, "--method", "kd", "--json", "--no-data"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["config"] for r in recs] == [
        "teacher_forward",
        "student_ce_step",
        "online_step",
        "cached_step",
        "cached_step_preloaded",
    ]
    for r in recs:
        check_ok(r)


@pytest.mark.parametrize(
    ("teacher", "student", "method", "bad"),
    [
        ("cnn_small", "cnn_tiny", ["kd", "no_such_method"], "no_such_method"),
        ("cnn_small", "cnn_tiny", ["kd+nope_part"], "nope_part"),
        ("cnn_small", "no_such_student", ["kd"], "no_such_student"),
        ("no_such_teacher", "cnn_tiny", ["kd"], "no_such_teacher"),
    ],
)
def test_unknown_names(teacher, student, method, bad):
    with pytest.raises(RelkdError, match=bad):
        run_speed(teacher, student, method, **TINY)


def test_bad_values():
    with pytest.raises(RelkdError, match="precision"):
        run_speed("cnn_small", "cnn_tiny", ["kd"], precisions=["fp8"], **TINY)
    with pytest.raises(RelkdError, match="batch"):
        run_speed("cnn_small", "cnn_tiny", ["kd"], **{**TINY, "batch": 0})
    with pytest.raises(RelkdError, match=r"'warm'.*engine, preloaded, cold"):
        run_speed("cnn_small", "cnn_tiny", ["kd"], cache_variants="warm", **TINY)


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) over a fresh read-only mapping (a
    mapping of its own, so the count does not depend on what else maps the file)."""
    import ctypes
    import mmap
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer(n)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def _fs_type(path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fs, *_ = line.split()
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fs
    return kind


def test_cli_unknown_method(capsys):
    assert main(["bench", "speed", *CLI_TINY, "--method", "nope_method"]) == 2
    assert "nope_method" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="needs posix_fadvise")
def test_cold_cache_variant_evicts_pages(tmp_path):
    """The ``cold`` variant is a measured record, and its eviction really empties the page cache
    of a cache file the step has been reading (mincore), so its lookups read from storage."""
    import numpy as np

    from relkd.bench.speed import _evict_pages
    from relkd.data.teacher_cache import _advise_random

    recs = run_speed(
        "cnn_small", "cnn_tiny", ["kd"], data=False, cache_variants="engine,cold",
        cache_root=str(tmp_path), **TINY,
    )  # fmt: skip
    cold = recs[-1]
    assert cold["config"] == "cached_step_cold" and cold["method"] == "kd"
    check_ok(cold)
    assert "evicted before every step" in cold["cache"]
    assert any(q["ratio"] == "cached (cold page cache) / ce" for q in speed_ratios(recs))

    # The eviction itself, on a file shaped like a cache's, mapped as TeacherCache maps it.
    class _Cache:  # the two attributes _evict_pages reads
        path = tmp_path

    f = tmp_path / "logits.npy"
    np.save(f, np.ones((256, 18, 10), np.float16))
    arr = np.load(f, mmap_mode="r")
    _advise_random(arr)
    _Cache._arrays = {"logits": arr}
    before = float(arr[::7, 3].astype(np.float32).sum())  # touched: mapped, in the page cache
    assert before == 37 * 10
    assert _resident_pages(f) > 0
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{_fs_type(tmp_path)} pages cannot be dropped from memory")
    _evict_pages(_Cache)
    assert _resident_pages(f) == 0
    assert float(arr[::7, 3].astype(np.float32).sum()) == before  # read again from storage
    if cold["disk_read_mb"] is not None:  # /proc/self/io exists: the cold steps read from disk
        assert cold["disk_read_mb"] > 0
