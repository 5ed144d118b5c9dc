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
run on CPU was observed bit-identical to the online one; with ``train.channels_last`` the online
teacher is fed channels-last batches while the cache is built from NCHW ones, so the cache holds
the NCHW teacher's values), and (b) the storage dtype. ``dtype="fp32"`` stores the fp32 outputs
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
teacher's outputs per (epoch, sample) for crops drawn reproducibly from a replay seed, with the
augmentation records of :mod:`relkd.data.aug_records`.

Code layout: this module holds :class:`TeacherCache` (open, build, spot check, lookup);
:mod:`relkd.data.teacher_cache_format` the constants, the outcome rows and the key;
:mod:`relkd.data.teacher_cache_build` the build (claim, temporary folder, rename into place);
:mod:`relkd.data.store_files` the checksum / disk-space / memory-map helpers it shares with the
replay store; :mod:`relkd.data.aug_records` the FKD-style records
(:func:`~relkd.data.aug_records.draw_resized_crop_params`, ``save_aug_record``,
``load_aug_record``, ``apply_resized_crop``). Their public names, and the private ones tests and
:mod:`relkd.data.replay` used, stay importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd._fs import fsync_dir as _fsync_dir  # noqa: F401  (replay imported it from here)
from relkd.data.aug_records import (  # noqa: F401  (public names kept importable from here)
    apply_resized_crop,
    draw_resized_crop_params,
    load_aug_record,
    save_aug_record,
)
from relkd.data.memory import crop_flip
from relkd.data.store_files import (  # noqa: F401  (names kept importable from here)
    _advise_random,
    check_free_space,
    file_sha256,
    reserve_file,
    verify_files,
)
from relkd.data.teacher_cache_build import _build_into, _build_lock, _discard
from relkd.data.teacher_cache_format import (  # noqa: F401  (names kept importable from here)
    _DTYPES,
    CACHE_VERSION,
    FORMAT,
    MANIFEST,
    _check_taps,
    _dtype_name,
    _read_manifest,
    cache_key,
    data_fingerprint,
    num_outcomes,
    outcome_index,
    outcome_table,
    teacher_fingerprint,
)
from relkd.models.base import FeatureTap, ModelOutput
from relkd.registry import RelkdError

_REBUILD = ("auto", "missing", "never")


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
                from relkd.data.kit import cache_dir

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
            # Concurrent builders of one cache (workers of a benchmark grid, on any node) queue
            # on a claim instead of computing it twice; the first builds, the others open it.
            with _build_lock(path, log) as claim:
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
                    log=log, claim=claim,
                )  # fmt: skip
        raise RelkdError(f"no teacher cache at {str(path)!r} and rebuild='never'; build it first")

    @classmethod
    def _build_locked(
        cls, model, images_u8, path, manifest, *, padding, flip, mean, std, taps, dname, k, parts,
        rebuild, batch_size, device, preload, progress, log, claim=None,
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
            progress=progress, log=log, claim=claim,
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
