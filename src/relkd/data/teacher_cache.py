"""Exact teacher-output cache: the teacher's outputs for every outcome of a discrete augmentation.

Random crop with zero padding ``p`` plus a horizontal flip has ``(2p + 1)^2 * 2`` outcomes per
image (162 for CIFAR's p = 4, 50 for Fashion-MNIST's p = 2). :meth:`TeacherCache.build` runs the
frozen teacher (eval mode, no grad, fp32) once on every outcome of every image and stores the
logits, and the pooled features where a method reads them, as memory-mapped ``.npy`` arrays::

    <folder>/manifest.json   format, version, key, the key's parts, shapes, dtype
    <folder>/logits.npy      [N, K, num_classes]   K = outcomes per image
    <folder>/pooled.npy      [N, K, D]             only with taps ("logits", "pooled")

Training then looks the entries up by the augmentation the loader actually drew
(:class:`~relkd.data.memory.InMemoryLoader` with ``return_aug=True``): KD-family methods need no
teacher forward pass at all, and one cache serves every method and seed of a table (the key does
not depend on the student, the method or the seed).

Exactness. The teacher input of outcome ``(oy, ox, flip)`` is produced by the same
:func:`~relkd.data.memory.crop_flip` gather and the same ``float / 255, - mean, / std`` ops as the
loader, so it is bit-identical to the online teacher's input; the teacher in eval mode treats every
sample independently. What remains is floating-point: (a) the online teacher sees the sample in a
different batch (a different conv / matmul blocking may change the last bits; a cached fp32 KD
run on CPU was observed bit-identical to the online one), and (b) the storage dtype. ``dtype="fp32"`` stores the fp32 outputs
unchanged; ``dtype="fp16"`` (the default, half the disk) rounds each value to the nearest fp16:
relative error <= 2^-11 (4.9e-4) for |v| >= 6.1e-5, absolute error <= 2^-25 below. For KD with
temperature T, the teacher probabilities softmax(z / T) then change by at most a factor
exp(+-2 * 2^-11 * max|z| / T) -- e.g. <= 0.4% for |z| <= 40, T = 4.

Staleness. The key is the sha256 of the teacher (class name + every state-dict tensor's name,
dtype, shape and bytes, so BN running statistics count), the images (shape + bytes, in order:
entry i is image i), the transform (padding, flip, mean, std), the taps, the storage dtype and
:data:`CACHE_VERSION`. Opening a folder whose manifest holds another key is refused with a
:class:`~relkd.registry.RelkdError`; ``rebuild="auto"`` rebuilds instead. Writes are atomic: the
cache is built in a temporary sibling folder that is renamed into place when complete, so a
crash never leaves a half-written cache under the final name.

Trust. The builder records the sha256 of every ``.npy`` file in the manifest; opening a cache
checks them (cost: reading the files once, ~1 s per GB on one core -- 1.6 GB for CIFAR-100 logits
in fp16, 0.3 GB for CIFAR-10) and refuses a missing, truncated or altered file. :meth:`TeacherCache.build`,
which has the teacher at hand, also runs a spot check: the live teacher on 4 entries against the
stored ones (cost: one forward pass of 4 images), which catches files replaced together with their
checksums. Before allocating, the builder checks the free space of the target file system
(``shutil.disk_usage``) and reserves the files' blocks (``posix_fallocate``), so a full disk ends
in one line naming the folder and the bytes needed instead of a SIGBUS from the memory map.

Continuous transforms (RandomResizedCrop on ImageNet) have no finite outcome set: for them the
FKD-style record-and-replay of :mod:`relkd.data.replay` (``train.teacher_replay``) stores the
teacher's outputs per (epoch, sample) for crops drawn reproducibly from a replay seed.
:func:`draw_resized_crop_params` draws RandomResizedCrop + flip parameters (it is what the replay
data set uses per sample), :func:`save_aug_record` / :func:`load_aug_record` keep a whole epoch
of them in a file, and :func:`apply_resized_crop` replays one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd._fs import fsync_dir as _fsync_dir
from relkd._fs import remove_dead_temp_dirs
from relkd.data.memory import _mix_seed, crop_flip
from relkd.models.base import POOLED, FeatureTap, ModelOutput
from relkd.registry import RelkdError

#: Bumped whenever the layout or the meaning of the stored entries changes (part of every key).
CACHE_VERSION = 2  # 2: per-file sha256 checksums in the manifest
FORMAT = "relkd-teacher-cache"
MANIFEST = "manifest.json"
_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_REBUILD = ("auto", "missing", "never")


def num_outcomes(padding: int, flip: bool) -> int:
    """K, the number of augmentation outcomes: ``(2p + 1)^2 * (2 if flip else 1)``."""
    return (2 * padding + 1) ** 2 * (2 if flip else 1)


def outcome_index(
    offsets: torch.Tensor, flips: torch.Tensor, padding: int, flip: bool
) -> torch.Tensor:
    """Row of outcome ``(oy, ox, f)`` in a cache: ``(oy * (2p + 1) + ox) * nf + f``, nf = 2 with
    flips, else 1. ``offsets`` int [B, 2] in [0, 2p], ``flips`` bool [B] -> int64 [B]."""
    n_off = 2 * padding + 1
    k = offsets[:, 0].long() * n_off + offsets[:, 1].long()
    if flip:
        k = k * 2 + flips.long()
    return k


def outcome_table(padding: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All K outcomes in row order: offsets int64 [K, 2], flips bool [K]."""
    n_off = 2 * padding + 1
    nf = 2 if flip else 1
    k = torch.arange(num_outcomes(padding, flip))
    f, o = k % nf, k // nf
    return torch.stack([o // n_off, o % n_off], 1), f.bool()


def _dtype_name(dtype: str | torch.dtype) -> str:
    if dtype in (torch.float16, "float16", "fp16"):
        return "fp16"
    if dtype in (torch.float32, "float32", "fp32"):
        return "fp32"
    raise RelkdError(f"teacher cache dtype must be fp16 or fp32, got {dtype!r}")


def _check_taps(taps: Sequence[str]) -> tuple[str, ...]:
    taps = tuple(dict.fromkeys(["logits", *taps]))
    bad = [t for t in taps if t not in ("logits", POOLED)]
    if bad:
        raise RelkdError(
            f"the teacher cache stores logits and {POOLED!r} features only, not {bad}: methods "
            "that read feature maps need the online teacher"
        )
    return taps


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and every state-dict entry (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    # The model's own input normalisation (relkd.models.normalization): "" when there is none,
    # so keys of models fed the data's statistics are unchanged.
    from relkd.models.normalization import input_norm_fingerprint

    h.update(input_norm_fingerprint(model).encode())
    return h.hexdigest()


def data_fingerprint(images_u8: torch.Tensor) -> str:
    """sha256 of the images' dtype, shape and bytes (order matters: entry i is image i)."""
    h = hashlib.sha256(f"{images_u8.dtype}|{tuple(images_u8.shape)}|".encode())
    h.update(_tensor_bytes(images_u8))
    return h.hexdigest()


def cache_key(
    model: nn.Module,
    images_u8: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
    taps: Sequence[str] = ("logits",),
    dtype: str | torch.dtype = "fp16",
) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: the hex sha256 identifying a cache and the readable parts it covers."""
    parts = {
        "version": CACHE_VERSION,
        "teacher": teacher_fingerprint(model),
        "data": data_fingerprint(images_u8),
        "padding": int(padding),
        "flip": bool(flip),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "taps": list(_check_taps(taps)),
        "dtype": _dtype_name(dtype),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return key, parts


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


@contextlib.contextmanager
def _build_lock(path: Path, log: Callable[[str], None] | None):
    """An exclusive lock (``filelock``: an OS lock the kernel releases when the holder exits,
    even if it crashes) for building the cache at ``path``. The lock file lives under
    ``cache_dir()/locks``, named by a hash of the cache's absolute path, so no file appears
    beside a user's cache folder."""
    from filelock import FileLock, Timeout

    from relkd.data.datasets import cache_dir

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    lock = FileLock(locks / f"{name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if log is not None:
            log(f"teacher cache: {path} is being built by another process; waiting")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 16 MiB blocks; ~1 s per GB on one core)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def check_free_space(folder: Path, nbytes: int, what: str) -> None:
    """RelkdError (one line naming ``folder`` and the bytes needed) when the file system holding
    ``folder`` has less than ``nbytes`` free: a memory map on a full disk ends in SIGBUS, not in
    a message."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise RelkdError(
            f"{what}: not enough disk space in {folder}: needs {nbytes} bytes "
            f"({nbytes / 2**20:.1f} MiB), {free} bytes free. Free space or point the cache "
            "elsewhere (RELKD_CACHE_DIR or a folder path)"
        )


def reserve_file(path: Path, folder: Path, what: str) -> None:
    """Allocate the blocks of the (sparse) file ``path`` now, so that writing through a memory
    map cannot hit a full disk later (SIGBUS). No-op where ``posix_fallocate`` is missing."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not POSIX
        return
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise RelkdError(
            f"{what}: not enough disk space in {folder}: needs {size} bytes for {path.name} "
            f"({e.strerror})"
        ) from e
    finally:
        os.close(fd)


def verify_files(folder: Path, checksums: dict[str, str], what: str) -> None:
    """Check every ``name -> sha256`` of ``checksums`` against the file in ``folder``; a
    missing, truncated or altered file is a RelkdError naming it."""
    for name, digest in sorted(checksums.items()):
        f = folder / name
        if not f.is_file():
            raise RelkdError(f"{what} {str(folder)!r} is damaged: {name} is missing")
        if file_sha256(f) != digest:
            raise RelkdError(
                f"{what} {str(folder)!r} is damaged: {name} does not match its checksum "
                "(altered or truncated). Delete the folder to rebuild it"
            )


def _advise_random(arr: np.ndarray) -> None:
    """Tell the kernel that rows of the memory map are read in random order: no read-ahead.

    A batch reads B scattered rows; with the default read-ahead each cold row pulls in ~128 KiB
    of neighbours nobody asked for. Measured on the dev VM with the page cache dropped: 74 ms ->
    8.7 ms per cold batch lookup. A no-op where madvise is missing."""
    import mmap

    m = getattr(arr, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    advice = getattr(mmap, "MADV_RANDOM", None)
    if m is not None and advice is not None and hasattr(m, "madvise"):
        with contextlib.suppress(OSError, ValueError):
            m.madvise(advice)


class TeacherCache:
    """A built cache, opened read-only; :meth:`lookup` returns the teacher's outputs for a batch.

    Use :meth:`build` (build or open) or :meth:`open` (open only, refusing a stale cache).
    ``preload=True`` copies the arrays to ``device`` (lookups are then pure device indexing with
    no host round trip; worth it on a GPU when the cache fits); else entries are gathered from
    the memory-mapped files on the host and copied per batch.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        device: torch.device,
        preload: bool,
        verify: bool = True,
    ):
        self.path = path
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.padding = int(manifest["parts"]["padding"])
        self.flip = bool(manifest["parts"]["flip"])
        self.taps = tuple(manifest["parts"]["taps"])
        self.dtype = manifest["parts"]["dtype"]
        self.device = torch.device(device)
        self._arrays: dict[str, np.ndarray] = {}
        self._on_device: dict[str, torch.Tensor] = {}
        checksums = manifest.get("checksums")
        if not isinstance(checksums, dict) or set(checksums) != {f"{t}.npy" for t in self.taps}:
            raise RelkdError(
                f"teacher cache {str(path)!r} is damaged: its manifest has no checksum for "
                "every file. Delete the folder to rebuild it"
            )
        if verify:
            verify_files(path, checksums, "teacher cache")
        for tap in self.taps:
            try:
                arr = np.load(path / f"{tap}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise RelkdError(
                    f"teacher cache {str(path)!r} is damaged: {tap}.npy cannot be read "
                    f"(missing or truncated: {e}). Delete the folder to rebuild it"
                ) from e
            want = (manifest["num_images"], manifest["num_outcomes"])
            if arr.shape[:2] != want or arr.dtype != _DTYPES[self.dtype]:
                raise RelkdError(
                    f"teacher cache {str(path)!r} is damaged: {tap}.npy is {arr.dtype} "
                    f"{arr.shape}, the manifest says {self.dtype} {want} + features"
                )
            self._arrays[tap] = arr
            if not preload:
                _advise_random(arr)
            if preload:
                out = torch.empty(arr.shape, dtype=getattr(torch, str(arr.dtype)), device=device)
                step = max(1, (64 << 20) // max(1, arr[0].nbytes))  # ~64 MiB per copy
                for a in range(0, arr.shape[0], step):
                    out[a : a + step] = torch.from_numpy(np.array(arr[a : a + step]))
                self._on_device[tap] = out

    # ------------------------------------------------------------------ properties
    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def num_outcomes(self) -> int:
        return int(self.manifest["num_outcomes"])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self._arrays.values())

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, n={self.num_images}, outcomes={self.num_outcomes}, "
            f"taps={list(self.taps)}, dtype={self.dtype}, key={self.key[:12]})"
        )

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        key: str | None = None,
        device: str | torch.device = "cpu",
        preload: bool = False,
        verify: bool = True,
    ) -> TeacherCache:
        """Open the cache in folder ``path``; with ``key``, refuse one built for anything else.

        ``verify`` checks every file against the sha256 the builder recorded in the manifest
        (cost: reading the files once, ~1 s per GB; a CIFAR-100 fp16 cache of logits is 1.6 GB);
        without it only the shapes and dtypes are checked."""
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise RelkdError(f"{str(path)!r} holds no relkd teacher cache ({MANIFEST} missing)")
        if key is not None and manifest.get("key") != key:
            theirs = manifest.get("parts", {})
            ours_note = ""
            if isinstance(theirs, dict):
                ours_note = (
                    " (it was built for: "
                    + ", ".join(f"{k}={str(v)[:16]}" for k, v in sorted(theirs.items()))
                    + ")"
                )
            raise RelkdError(
                f"teacher cache {str(path)!r} is stale: key {str(manifest.get('key'))[:16]} but "
                f"this teacher / data / transform need {key[:16]}{ours_note}. Delete the folder, "
                "point to another one, or allow a rebuild (rebuild='auto')"
            )
        return cls(path, manifest, torch.device(device), preload, verify)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        images_u8: torch.Tensor,
        *,
        padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        taps: Sequence[str] = ("logits",),
        dtype: str | torch.dtype = "fp16",
        path: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        rebuild: str = "auto",
        batch_size: int = 256,
        device: str | torch.device | None = None,
        preload: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = print,
        key: tuple[str, dict[str, Any]] | None = None,
    ) -> TeacherCache:
        """Open the cache for (teacher, images, transform), building it first if needed.

        Args:
            model: the teacher (any ``nn.Module``; run in eval mode, no grad, fp32, on the device
                its parameters are on unless ``device`` is given).
            images_u8: the whole split, uint8 [N, C, H, W], in loader index order.
            padding, flip, mean, std: the loader's augmentation (its ``aug_padding`` /
                ``aug_flip``) and normalisation.
            taps: ``("logits",)`` or ``("logits", "pooled")``.
            dtype: storage ``"fp16"`` (default) or ``"fp32"`` (see the module docstring).
            path: the cache folder itself; else ``root / <key[:32]>`` with ``root`` defaulting
                to ``relkd.data.cache_dir() / "teacher"``.
            rebuild: ``"auto"`` builds when the folder is missing or stale; ``"missing"`` only
                when missing (a stale cache is refused); ``"never"`` only opens.
            batch_size: images per teacher forward (one outcome of ``batch_size`` images).
            key: a precomputed :func:`cache_key` result (hashing is ~1 s per GB).
        """
        if rebuild not in _REBUILD:
            raise RelkdError(f"rebuild={rebuild!r} is not one of {', '.join(_REBUILD)}")
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or len(images_u8) == 0:
            raise RelkdError(
                f"images must be uint8 [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
            )
        taps = _check_taps(taps)
        dname = _dtype_name(dtype)
        if key is None:
            key = cache_key(
                model, images_u8, padding=padding, flip=flip, mean=mean, std=std, taps=taps,
                dtype=dname,
            )  # fmt: skip
        k, parts = key
        if path is None:
            if root is None:
                from relkd.data.datasets import cache_dir

                root = cache_dir() / "teacher"
            path = Path(root) / k[:32]
        path = Path(path)
        if device is None:
            p0 = next(iter(model.parameters()), None)
            device = p0.device if p0 is not None else torch.device("cpu")
        device = torch.device(device)
        check = dict(model=model, images_u8=images_u8, mean=mean, std=std)

        def open_checked() -> TeacherCache:
            cache = cls.open(path, key=k, device=device, preload=preload)
            cache.spot_check(**check)
            return cache

        manifest = _read_manifest(path)
        if manifest is not None and (manifest.get("key") == k or rebuild != "auto"):
            try:
                return open_checked()
            except RelkdError as e:
                if rebuild != "auto" or "damaged" not in str(e):
                    raise
        if rebuild != "never":
            # Concurrent builders of one cache (workers of a benchmark grid) queue on a lock
            # file instead of computing it twice; the first builds, the others then open it.
            with _build_lock(path, log):
                manifest = _read_manifest(path)
                if manifest is not None and manifest.get("key") == k:
                    try:
                        return open_checked()
                    except RelkdError as e:
                        if "damaged" not in str(e):
                            raise
                        if log is not None:
                            log(f"teacher cache: {e}; rebuilding")
                        _discard(path)
                        manifest = None
                return cls._build_locked(
                    model, images_u8, path, manifest, padding=padding, flip=flip, mean=mean,
                    std=std, taps=taps, dname=dname, k=k, parts=parts, rebuild=rebuild,
                    batch_size=batch_size, device=device, preload=preload, progress=progress,
                    log=log,
                )  # fmt: skip
        raise RelkdError(f"no teacher cache at {str(path)!r} and rebuild='never'; build it first")

    @classmethod
    def _build_locked(
        cls, model, images_u8, path, manifest, *, padding, flip, mean, std, taps, dname, k, parts,
        rebuild, batch_size, device, preload, progress, log,
    ) -> TeacherCache:  # fmt: skip
        if manifest is None and path.exists() and any(path.iterdir()):
            raise RelkdError(
                f"{str(path)!r} is a non-empty folder that is not a relkd teacher cache; "
                "refusing to write the cache there"
            )
        if manifest is not None and log is not None:
            log(f"teacher cache: {path} is stale (key {str(manifest.get('key'))[:12]}); rebuilding")
        _build_into(
            path, model, images_u8, padding=padding, flip=flip, mean=mean, std=std, taps=taps,
            dtype=dname, key=k, parts=parts, batch_size=batch_size, device=device,
            progress=progress, log=log,
        )  # fmt: skip
        return cls.open(path, key=k, device=device, preload=preload)

    def spot_check(
        self,
        model: nn.Module,
        images_u8: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        rows: int = 4,
    ) -> None:
        """Run the live teacher on ``rows`` entries (spread over the images, one outcome each)
        and compare them with the stored logits: catches a cache whose files were replaced
        together with their checksums. Cost: one teacher forward of ``rows`` images.

        The tolerance is coarse on purpose, ``|stored - live| <= 2e-2 * |live| + 1e-2 * (1 +
        max|live|)``: it must cover the fp16 storage (relative 2^-11) and batch-dependent rounding
        (TF32 convolutions on a GPU differ in the third digit between batch sizes), while
        garbage or another teacher's outputs miss it by orders of magnitude; bit-level damage is
        the checksums' job."""
        n, kk = self.num_images, self.num_outcomes
        idx = torch.linspace(0, n - 1, min(rows, n)).round().long()
        k = (idx * 7919 + 13) % kk  # deterministic, varied outcomes
        offs, fls = outcome_table(self.padding, self.flip)
        dev = next((q.device for q in model.parameters()), torch.device("cpu"))
        x = crop_flip(
            images_u8[idx].to(dev), offs[k].to(dev) if self.padding > 0 else None,
            fls[k].to(dev) if self.flip else None, self.padding,
        )  # fmt: skip
        m = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        sd = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        tap, was_training = FeatureTap(model, []), model.training
        model.eval()
        try:
            with torch.no_grad():
                live = tap(x.float().div_(255).sub_(m).div_(sd)).logits.float().cpu()
        finally:
            tap.remove()
            model.train(was_training)
        stored = self.lookup(idx, offs[k], fls[k]).logits.cpu()
        tol = 2e-2 * live.abs() + 1e-2 * (1 + live.abs().max())
        if stored.shape != live.shape or not bool(((stored - live).abs() <= tol).all()):
            gap = (stored - live).abs().max().item() if stored.shape == live.shape else None
            raise RelkdError(
                f"teacher cache {str(self.path)!r} is damaged: its stored logits differ from "
                f"the teacher's (max gap {gap}) on a spot check of images {idx.tolist()}. "
                "Delete the folder to rebuild it"
            )

    # ------------------------------------------------------------------ lookup
    def lookup(
        self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor
    ) -> ModelOutput:
        """The teacher's outputs for images ``index`` [B] augmented by ``offsets`` [B, 2] and
        ``flips`` [B] (as drawn by the loader): logits fp32 [B, C] (+ ``feats["pooled"]`` fp32
        [B, D]) on :attr:`device`."""
        k = outcome_index(offsets, flips, self.padding, self.flip)
        out: dict[str, torch.Tensor] = {}
        if self._on_device:
            i, kk = index.to(self.device), k.to(self.device)
            for tap, t in self._on_device.items():
                out[tap] = t[i, kk].float()
        else:
            i_np, k_np = index.cpu().numpy(), k.cpu().numpy()
            nb = self.device.type == "cuda"
            for tap, arr in self._arrays.items():
                rows = torch.from_numpy(arr[i_np, k_np])
                if nb:
                    rows = rows.pin_memory()
                out[tap] = rows.to(self.device, non_blocking=nb).float()
        logits = out.pop("logits")
        return ModelOutput(logits, out)


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
) -> None:
    """Compute every (image, outcome) entry into a temporary sibling folder, then rename it to
    ``path`` (replacing a stale cache there)."""
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
            check_free_space(path.parent, nbytes, "teacher cache")
            widths = {"logits": num_classes, **({POOLED: pooled_dim} if want_pooled else {})}
            arrays = {}
            for t, width in widths.items():
                arrays[t] = np.lib.format.open_memmap(
                    tmp / f"{t}.npy", mode="w+", dtype=np_dtype, shape=(n, kk, width)
                )
                reserve_file(tmp / f"{t}.npy", path.parent, "teacher cache")
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n * kk, desc="teacher cache", unit="fwd", unit_scale=True)
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
        from relkd.engine.checkpoint import atomic_write_bytes

        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
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
    build lock: no live build of this cache on this machine owns one)."""
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


# ---------------------------------------------------------------------- FKD-style records
def draw_resized_crop_params(
    heights: torch.Tensor | Sequence[int],
    widths: torch.Tensor | Sequence[int],
    *,
    seed: int,
    epoch: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    attempts: int = 10,
) -> torch.Tensor:
    """One epoch of RandomResizedCrop (+ flip) parameters, int64 [N, 5] = (top, left, h, w, flip),
    for images of sizes ``heights[i] x widths[i]``, reproducible from ``(seed, epoch)`` alone.

    The distribution is torchvision's ``RandomResizedCrop.get_params`` (area uniform in
    ``scale``, log-ratio uniform in ``ratio``, the first of ``attempts`` draws that fits, else
    the central crop of the clamped ratio) -- the draw stream is not torchvision's. Record the
    result with :func:`save_aug_record` and replay it with :func:`apply_resized_crop`, so the
    teacher's outputs for an epoch can be computed once (FKD-style) and matched by sample.
    """
    hs = torch.as_tensor(heights, dtype=torch.float64)
    ws = torch.as_tensor(widths, dtype=torch.float64)
    n = hs.numel()
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, "resized_crop"))
    area = hs * ws
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = torch.rand(n, attempts, 4, generator=g, dtype=torch.float64)
    target = area[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ar = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
    cw = torch.round(torch.sqrt(target * ar))
    ch = torch.round(torch.sqrt(target / ar))
    ok = (cw > 0) & (ch > 0) & (cw <= ws[:, None]) & (ch <= hs[:, None])
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    h_sel, w_sel = ch[rows, pick], cw[rows, pick]
    top = torch.floor(u[rows, pick, 2] * (hs - h_sel + 1))
    left = torch.floor(u[rows, pick, 3] * (ws - w_sel + 1))
    # Fallback (no attempt fitted): torchvision's central crop.
    in_ratio = ws / hs
    fb_w = torch.where(
        in_ratio < ratio[0], ws, torch.where(in_ratio > ratio[1], torch.round(hs * ratio[1]), ws)
    )
    fb_h = torch.where(
        in_ratio < ratio[0], torch.round(ws / ratio[0]), torch.where(in_ratio > ratio[1], hs, hs)
    )
    fb = first < 0
    h_sel = torch.where(fb, fb_h, h_sel)
    w_sel = torch.where(fb, fb_w, w_sel)
    top = torch.where(fb, torch.div(hs - fb_h, 2, rounding_mode="floor"), top)
    left = torch.where(fb, torch.div(ws - fb_w, 2, rounding_mode="floor"), left)
    flips = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.long)
    return torch.stack([top.long(), left.long(), h_sel.long(), w_sel.long(), flips], 1)


def save_aug_record(folder: str | os.PathLike, epoch: int, params: torch.Tensor) -> Path:
    """Write one epoch's drawn parameters [N, P] atomically to ``folder/aug_epoch{epoch}.npy``."""
    from relkd.engine.checkpoint import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, params.detach().cpu().numpy())
    path = folder / f"aug_epoch{int(epoch)}.npy"
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_aug_record(folder: str | os.PathLike, epoch: int) -> torch.Tensor:
    """The parameters :func:`save_aug_record` wrote for ``epoch``."""
    path = Path(folder) / f"aug_epoch{int(epoch)}.npy"
    if not path.is_file():
        raise RelkdError(f"no augmentation record for epoch {epoch} in {str(folder)!r}")
    return torch.from_numpy(np.load(path))


def apply_resized_crop(img: Any, params: torch.Tensor | Sequence[int], size: int) -> Any:
    """Replay one recorded (top, left, h, w, flip) on a PIL image or tensor [C, H, W]:
    ``resized_crop`` to ``size x size`` (bilinear, antialiased, as RandomResizedCrop), then a
    horizontal flip when recorded."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    top, left, h, w, f = (int(v) for v in params)
    out = TF.resized_crop(
        img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True
    )
    return TF.hflip(out) if f else out
