"""Building a teacher cache (:meth:`relkd.data.teacher_cache.TeacherCache.build` calls this).

:func:`_build_lock` makes concurrent builders of one cache (on this machine or on others sharing
the file system) queue instead of computing it twice;
:func:`_build_into` runs the frozen teacher on every (image, outcome) pair into a temporary
sibling folder, writes the checksums and the manifest and renames the folder into place
(:func:`_move_into_place`), so a crash never leaves a half-written cache under the final name;
:func:`_sweep_dead_builds` removes the temporary folders of killed builds and :func:`_discard` a
damaged cache. The guarantees are described in the docstring of :mod:`relkd.data.teacher_cache`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd._fs import fsync_dir as _fsync_dir
from relkd._fs import remove_dead_temp_dirs
from relkd.claims import Claim, describe
from relkd.data.memory import crop_flip
from relkd.data.store_files import (
    SMALL_FILES_ROOM,
    check_free_space,
    file_sha256,
    reserve_file,
)
from relkd.data.teacher_cache_format import (
    _DTYPES,
    CACHE_VERSION,
    FORMAT,
    MANIFEST,
    _read_manifest,
    num_outcomes,
    outcome_table,
)
from relkd.models.base import POOLED, FeatureTap, ModelOutput
from relkd.registry import RelkdError


@contextlib.contextmanager
def _build_lock(path: Path, log: Callable[[str], None] | None) -> Iterator[Claim]:
    """The claim (:mod:`relkd.claims`) for building the cache at ``path``: the file
    ``.<name>.claim`` beside the cache folder (on the same file system, so builders on other
    nodes see it). A builder waits while a live one holds it and takes over the claim of one
    that died; the build checks the claim before it moves the finished cache into place."""
    claim = Claim(path.parent / f".{path.name}.claim", what=f"teacher cache {path}")

    def waiting(rec: dict[str, Any] | None) -> None:
        if log is not None:
            log(f"teacher cache: {path} is being built by another process{describe(rec)}; waiting")

    path.parent.mkdir(parents=True, exist_ok=True)
    claim.acquire(on_wait=waiting)
    if claim.took_over and log is not None:
        log(f"teacher cache: took over the build of {path}: {claim.took_over}")
    try:
        yield claim
    finally:
        claim.release()


def _build_into(
    path: Path,
    model: nn.Module,
    images_u8: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    taps: tuple[str, ...],
    dtype: str,
    key: str,
    parts: dict[str, Any],
    batch_size: int,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None] | None,
    claim: Claim | None = None,
) -> None:
    """Compute every (image, outcome) entry into a temporary sibling folder, then rename it to
    ``path`` (replacing a stale cache there). With ``claim`` (the build claim), the commit is
    fenced: a builder whose claim was taken over stops without touching ``path``."""
    n, c = images_u8.shape[:2]
    kk = num_outcomes(padding, flip)
    offs, fls = outcome_table(padding, flip)
    offs, fls = offs.to(device), fls.to(device)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    if len(mean) != c or len(std) != c:
        raise RelkdError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
    bs = max(1, int(batch_size))
    want_pooled = POOLED in taps
    tap = FeatureTap(model, [POOLED] if want_pooled else [])
    was_training = model.training
    model.eval()

    def forward(x_u8: torch.Tensor, j: int) -> ModelOutput:
        b = x_u8.shape[0]
        x = crop_flip(
            x_u8, offs[j].expand(b, 2) if padding > 0 else None,
            fls[j].expand(b) if flip else None, padding,
        )  # fmt: skip
        # Exactly InMemoryLoader.normalize (bit-identical teacher input).
        return tap(x.float().div_(255).sub_(mean_t).div_(std_t))

    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_builds(path, log)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with torch.no_grad():
            # One timed probe (after a warm-up forward) for the up-front estimate and the shapes.
            probe = images_u8[:bs].to(device)
            out = forward(probe, 0)
            _sync(device)
            t0 = time.perf_counter()
            out = forward(probe, 0)
            _sync(device)
            per_forward = time.perf_counter() - t0
            n_fwd = math.ceil(n / bs) * kk
            num_classes = out.logits.shape[1]
            pooled_dim = out.feats[POOLED].shape[1] if want_pooled else None
            np_dtype = _DTYPES[dtype]
            esize = np.dtype(np_dtype).itemsize
            nbytes = n * kk * (num_classes + (pooled_dim or 0)) * esize
            if log is not None:
                log(
                    f"teacher cache: building {path}: {n} images x {kk} outcomes = {n * kk} "
                    f"teacher forward passes ({n_fwd} batches of <= {bs} on {device}), "
                    f"~{_fmt_s(per_forward * n_fwd)} estimated, {nbytes / 2**20:.1f} MiB on disk"
                )
            check_free_space(path.parent, nbytes + SMALL_FILES_ROOM, "teacher cache")
            widths = {"logits": num_classes, **({POOLED: pooled_dim} if want_pooled else {})}
            arrays = {}
            for t, width in widths.items():
                arrays[t] = np.lib.format.open_memmap(
                    tmp / f"{t}.npy", mode="w+", dtype=np_dtype, shape=(n, kk, width)
                )
                reserve_file(tmp / f"{t}.npy", path.parent, "teacher cache")
            bar = None
            if progress:
                from relkd.progress import progress as _progress

                bar = _progress(total=n * kk, desc="teacher cache", unit="fwd", unit_scale=True)
            t_start = time.perf_counter()
            for a in range(0, n, bs):
                x_u8 = images_u8[a : a + bs].to(device)
                b = x_u8.shape[0]
                # Filled on the device, copied to the host once per chunk (no per-forward sync).
                bufs = {
                    t: torch.empty(b, kk, arr.shape[2], device=device) for t, arr in arrays.items()
                }
                for j in range(kk):
                    out = forward(x_u8, j)
                    bufs["logits"][:, j] = out.logits.float()
                    if want_pooled:
                        bufs[POOLED][:, j] = out.feats[POOLED].float()
                    if bar is not None:
                        bar.update(b)
                for t, arr in arrays.items():
                    chunk = bufs[t].cpu().numpy().astype(np_dtype)
                    if not np.isfinite(chunk).all():
                        raise RelkdError(
                            f"teacher cache: non-finite teacher {t} for images {a}..{a + b - 1}"
                            + (
                                " in fp16 (beyond +-65504): use dtype fp32"
                                if dtype == "fp16"
                                else ""
                            )
                        )
                    arr[a : a + b] = chunk
            if bar is not None:
                bar.close()
            for arr in arrays.values():
                arr.flush()
            del arrays
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        checksums = {f.name: file_sha256(f) for f in sorted(tmp.glob("*.npy"))}
        manifest = {
            "format": FORMAT,
            "version": CACHE_VERSION,
            "key": key,
            "parts": parts,
            "num_images": n,
            "num_outcomes": kk,
            "checksums": checksums,
            "num_classes": int(num_classes),
            "pooled_dim": pooled_dim,
            "outcome_order": "(oy * (2p+1) + ox) * (2 if flip else 1) + flip",
            "image_shape": list(images_u8.shape[1:]),
            "teacher_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "build_seconds": round(time.perf_counter() - t_start, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        from relkd._fs import atomic_write_bytes

        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        if claim is not None:
            claim.check(f"committing the teacher cache {path}")
        _move_into_place(tmp, path, key)
        if log is not None:
            log(f"teacher cache: built {path} in {_fmt_s(manifest['build_seconds'])}")
    finally:
        tap.remove()
        model.train(was_training)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Remove a (damaged) cache folder: renamed away first, so readers never see it half gone."""
    old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


def _sweep_dead_builds(path: Path, log: Callable[[str], None] | None) -> None:
    """Remove the temporary folders of builds of ``path`` that were killed (called under the
    build claim: no live build of this cache owns one)."""
    for name in remove_dead_temp_dirs(path.parent, f".{path.name}.tmp-"):
        if log is not None:
            log(f"teacher cache: removed {name}, left by an interrupted build")


def _move_into_place(tmp: Path, path: Path, key: str) -> None:
    """Rename the finished ``tmp`` folder to ``path``. A cache already there with the same key
    (a concurrent builder won) is kept; a stale one is replaced."""
    for _ in range(3):
        existing = _read_manifest(path)
        if existing is not None and existing.get("key") == key:
            return  # someone else built the same cache meanwhile; ours is discarded
        if existing is not None:
            old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)  # atomic; succeeds onto a missing or an empty folder
            _fsync_dir(path.parent)
            return
        except OSError:
            continue  # a concurrent writer put something there: look again
    raise RelkdError(f"could not move the teacher cache into {str(path)!r} (concurrent writers?)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
