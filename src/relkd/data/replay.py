"""FKD-style teacher-output replay for RandomResizedCrop on file-based data sets.

RandomResizedCrop has continuous parameters, so the exact cache of
:mod:`relkd.data.teacher_cache` cannot enumerate its outcomes. FKD (Shen & Xing, "A Fast
Knowledge Distillation Framework for Visual Recognition", ECCV 2022, arXiv 2112.01528) fixes the
crops instead: each epoch's crop of each image is a recorded parameter set, the teacher's outputs
on exactly those crops are stored once, and later runs replay the crops and read the outputs
instead of running the teacher. relkd's version, switched on by ``train.teacher_replay``:

- :class:`ReplayCropDataset` wraps the train set (a :class:`~relkd.data.base.FileImageDataset`,
  possibly inside ``Subset`` s) whose transform is ``RandomResizedCrop [+ RandomHorizontalFlip]``
  followed by deterministic steps (ToTensor, Normalize, ...). Item ``i`` of epoch ``e`` is the
  crop drawn from ``(replay_seed, e, i)`` alone -- torchvision's distribution, a different random
  stream (:func:`~relkd.data.aug_records.draw_resized_crop_params`) -- and carries the extras
  ``index`` = i and ``aug_params`` = int64 [5] (top, left, h, w, flip).
- :class:`ReplayStore` is a folder ``manifest.json`` + ``epoch_<e>/{params, logits[, pooled]}.npy``
  (params int64 [N, 5], logits [N, C], pooled [N, D]; fp16 or fp32), keyed by the sha256 of the
  teacher's weights, the data (every sample's path relative to the data root, label and the
  sha256 of the file's bytes, in order: an image edited without changing its size changes the
  key), the transform, the replay seed, the taps and the storage dtype. Hashing reads every
  image file once when the store is opened (the reads of one epoch without the decoding: ~1 s
  per GB of images, in threads; 10k CIFAR-size JPEGs take well under a second).
- Each stored epoch carries ``checksums.json`` (sha256 of each of its files), checked whenever
  the epoch is read (cost: reading the epoch's arrays once, ~0.6 MiB for 10k CIFAR-10 samples,
  ~2.4 GiB for ImageNet-1k, ~2 s): same-shape garbage or a truncated file is refused, never
  used. An epoch is written only after a check of the free disk space (one line naming the
  folder and the bytes needed) with its files' blocks reserved.
- The replay teacher (:class:`relkd.engine.teacher.ReplayTeacher`) answers from the store for
  a stored epoch, checking that the crops drawn now equal the recorded ones (a changed image changes its crops: refused, never silently wrong).
  For an epoch not stored yet it runs the online teacher, rounds its outputs to the storage dtype
  (so the run that writes an epoch and every run that reads it see the same numbers) and writes
  them through to a temporary folder that is renamed into place once every sample of the epoch
  was written. One writer per epoch: the writer holds the claim ``.epoch_<e>.claim``
  (:mod:`relkd.claims`, valid across nodes) and checks it before the rename; a run that finds
  the epoch claimed by another live writer reads nothing and writes nothing for it (online
  teacher only), and a writer whose claim was taken over discards its epoch. The first run of a table therefore costs what an online run costs; every later
  method and seed of the table runs no teacher forward pass for the stored epochs.

What changes for the user: under replay the crops depend on ``train.replay_seed`` (default 0),
not on ``train.seed``, so seeds of a table share crops (as in FKD); initialisation and data
order still follow ``train.seed``. Only a single process writes epochs; under DDP stored epochs
are read and missing ones use the online teacher without storing.

Disk: every stored epoch holds the full logits (and pooled features where a method reads them),
N x (C [+ D]) values plus 40 bytes of crop parameters per sample: ~0.6 MiB an epoch for 10k
CIFAR-10 images in fp16, ~2.4 GiB for ImageNet-1k
(FKD keeps only the top-k soft labels of each crop; relkd does not compress yet). The run logs
the size when it opens the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from relkd._fs import fsync_dir as _fsync_dir
from relkd.claims import Claim, ClaimLost
from relkd.data.aug_records import draw_resized_crop_params
from relkd.data.memory import _mix_seed
from relkd.data.store_files import check_free_space, file_sha256, reserve_file, verify_files
from relkd.data.teacher_cache_format import _dtype_name
from relkd.models.base import POOLED, ModelOutput
from relkd.registry import RelkdError

REPLAY_VERSION = 2  # 2: content-hashed data, per-epoch checksums
FORMAT = "relkd-teacher-replay"
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
#: Batch extras a :class:`relkd.engine.teacher.ReplayTeacher` reads (``ReplayCropDataset`` yields them).
REPLAY_EXTRAS = ("index", "aug_params")
# Steps allowed after the crop: they must not draw random numbers, or replay would not be exact.
_DETERMINISTIC = (
    T.ToTensor,
    T.PILToTensor,
    T.Normalize,
    T.ConvertImageDtype,
    T.Resize,
    T.CenterCrop,
    T.Grayscale,
)
_NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}


# ------------------------------------------------------------------------- the data set
def _resolve(ds: Dataset) -> tuple[Any, list[int] | None]:
    """The innermost data set below ``Subset`` s and the map from outer positions to its items."""
    index: list[int] | None = None
    while isinstance(ds, Subset):
        inner = [int(i) for i in ds.indices]
        index = inner if index is None else [inner[i] for i in index]
        ds = ds.dataset
    return ds, index


def _split_transform(transform: Any) -> tuple[T.RandomResizedCrop, bool, list[Any]] | str:
    """``(crop, flip, tail)`` of a replayable pipeline, else the reason it is not replayable."""
    steps = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    crops = [k for k, t in enumerate(steps) if isinstance(t, T.RandomResizedCrop)]
    if not crops:
        names = [type(t).__name__ for t in steps]
        return f"its train transform {names} has no RandomResizedCrop"
    k = crops[0]
    if k != 0:
        return "its train transform does something before RandomResizedCrop"
    crop, rest = steps[0], steps[1:]
    flip = bool(rest) and isinstance(rest[0], T.RandomHorizontalFlip)
    if flip:
        if float(rest[0].p) != 0.5:
            return f"RandomHorizontalFlip(p={rest[0].p}) is not replayable (p = 0.5 only)"
        rest = rest[1:]
    bad = [type(t).__name__ for t in rest if not isinstance(t, _DETERMINISTIC)]
    if bad:
        return f"its train transform has random steps after the crop ({bad})"
    return crop, flip, rest


def replay_unsupported(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be replayed (a sentence), or None when :class:`ReplayCropDataset` can wrap it."""
    base, _ = _resolve(ds)
    if not (hasattr(base, "samples") and hasattr(base, "transform")):
        return f"data set {type(base).__name__} is not a file-based image data set"
    split = _split_transform(base.transform)
    return split if isinstance(split, str) else None


class ReplayCropDataset(Dataset):
    """Replayable RandomResizedCrop: item i of epoch e is ``(x, y, {"index": i, "aug_params": p})``
    with ``p`` = int64 [5] (top, left, h, w, flip) drawn from ``(seed, e, i)`` only.

    ``ds`` is a file-based data set (``samples`` = [(path, label)], ``transform``) or a ``Subset``
    of one; its transform must be ``RandomResizedCrop [+ RandomHorizontalFlip(0.5)]`` followed by
    deterministic steps. :meth:`apply` re-creates the image of any recorded parameter set.
    """

    def __init__(self, ds: Dataset, seed: int = 0) -> None:
        why = replay_unsupported(ds)
        if why:
            raise RelkdError(f"teacher replay cannot wrap this data set: {why}")
        self.dataset = ds
        self.base, self.index_map = _resolve(ds)
        crop, self.flip, tail = _split_transform(self.base.transform)  # type: ignore[misc]
        self.crop: T.RandomResizedCrop = crop
        self.tail = T.Compose(tail) if tail else None
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _sample(self, i: int) -> tuple[str, int]:
        j = self.index_map[i] if self.index_map is not None else i
        path, target = self.base.samples[j]
        return str(path), int(target)

    def params(self, i: int, height: int, width: int, epoch: int | None = None) -> torch.Tensor:
        """int64 [5] for sample ``i`` of an image of ``height x width`` in ``epoch``."""
        e = self.epoch if epoch is None else int(epoch)
        return draw_resized_crop_params(
            [height], [width], seed=_mix_seed(self.seed, "replay", i), epoch=e,
            scale=tuple(self.crop.scale), ratio=tuple(self.crop.ratio), flip=self.flip,
        )[0]  # fmt: skip

    def apply(self, img: Any, params: torch.Tensor) -> Any:
        """The transform's output for ``img`` with the recorded ``params`` (crop, flip, tail)."""
        top, left, h, w, f = (int(v) for v in params)
        out = TF.resized_crop(
            img, top, left, h, w, list(self.crop.size), self.crop.interpolation,
            antialias=self.crop.antialias,
        )  # fmt: skip
        if f:
            out = TF.hflip(out)
        return self.tail(out) if self.tail is not None else out

    def __getitem__(self, i: int) -> tuple[Any, int, dict[str, Any]]:
        from relkd.data.formats import load_image

        path, target = self._sample(i)
        img = load_image(path)
        p = self.params(i, img.height, img.width)
        return self.apply(img, p), target, {"index": i, "aug_params": p}

    def fingerprint(self) -> dict[str, Any]:
        """What the replayed images depend on: data (paths relative to their common folder,
        labels and the sha256 of each file's content, in order) and the transform."""
        paths = [self._sample(i) for i in range(len(self))]
        root = os.path.commonpath([p for p, _ in paths]) if paths else ""

        def digest(p: str) -> str:
            try:
                return file_sha256(Path(p))
            except OSError as e:
                raise RelkdError(f"image file not found or unreadable: {p}") from e

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:  # hashlib releases the GIL
            digests = list(ex.map(digest, [p for p, _ in paths]))
        h = hashlib.sha256(f"n={len(paths)}".encode())
        for (p, t), d in zip(paths, digests):
            h.update(f"|{os.path.relpath(p, root)}|{t}|{d}".encode())
        c = self.crop
        return {
            "data": h.hexdigest(),
            "crop": [list(c.size), list(c.scale), list(c.ratio), str(c.interpolation), c.antialias],
            "flip": self.flip,
            "tail": repr(self.tail),
            "replay_seed": self.seed,
        }


# ------------------------------------------------------------------------- the store
def replay_key(
    teacher_fp: str, data_fp: dict[str, Any], taps: list[str], dtype: str
) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: the sha256 naming a store and the readable parts it covers."""
    parts = {
        "version": REPLAY_VERSION,
        "teacher": teacher_fp,
        **data_fp,
        "taps": list(taps),
        "dtype": _dtype_name(dtype),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


class EpochWriter:
    """One epoch being written into a temporary sibling folder; rows arrive in any order. The
    writer holds the epoch's claim (``claim``) from creation to commit or abort."""

    def __init__(self, store: ReplayStore, epoch: int, claim: Claim) -> None:
        self.store, self.epoch, self.claim = store, epoch, claim
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = store.path / f".tmp-epoch_{epoch}-{tag}"
        try:
            self.tmp.mkdir(parents=True)
        except BaseException:
            claim.release()
            raise
        n = store.num_samples
        self.filled = np.zeros(n, dtype=bool)
        self.arrays: dict[str, np.ndarray] = {}
        self._create("params", np.int64, (n, 5))

    def _create(self, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
        """A memory-mapped array, its disk space checked and reserved first (no SIGBUS)."""
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            check_free_space(self.store.path, need, "teacher replay")
            f = self.tmp / f"{name}.npy"
            self.arrays[name] = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=shape)
            reserve_file(f, self.store.path, "teacher replay")
        except BaseException:
            self.abort()
            raise

    def put(self, index: torch.Tensor, params: torch.Tensor, out: ModelOutput) -> None:
        idx = index.detach().cpu().numpy()
        rows = {"params": params.detach().cpu().numpy(), "logits": out.logits}
        if POOLED in self.store.taps:
            rows[POOLED] = out.feats[POOLED]
        for name, v in rows.items():
            v = v.detach().float().cpu().numpy() if torch.is_tensor(v) else v
            if name not in self.arrays:  # shapes are known at the first batch
                self._create(name, self.store.np_dtype, (self.store.num_samples, *v.shape[1:]))
            self.arrays[name][idx] = v
        self.filled[idx] = True

    def commit(self) -> bool:
        """Move the epoch into place if every sample was written; else discard it. Returns
        whether the store now holds the epoch."""
        if not self.filled.all():
            self.abort()
            return False
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        sums = {f.name: file_sha256(f) for f in sorted(self.tmp.glob("*.npy"))}
        (self.tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        _fsync_dir(self.tmp)
        final = self.store.epoch_dir(self.epoch)
        try:
            self.claim.check(f"storing replay epoch {self.epoch + 1}")
        except ClaimLost:
            self.abort()  # another writer owns the epoch now; the run itself goes on
            return self.store.has_epoch(self.epoch)
        try:
            os.replace(self.tmp, final)  # atomic; refused when another writer got there first
        except OSError:
            self.abort()
            return self.store.has_epoch(self.epoch)
        self.claim.release()
        _fsync_dir(self.store.path)
        return True

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.claim.release()


class ReplayStore:
    """A replay folder: ``manifest.json`` and one ``epoch_<e>/`` folder per stored epoch."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.num_samples = int(manifest["num_samples"])
        self.taps = tuple(manifest["parts"]["taps"])
        self.dtype = manifest["parts"]["dtype"]
        self.np_dtype = _NP_DTYPES[self.dtype]

    @classmethod
    def open(
        cls, path: str | os.PathLike, key: tuple[str, dict[str, Any]], num_samples: int
    ) -> ReplayStore:
        """Open the store in ``path`` (created when missing); a store with another key is
        refused."""
        path = Path(path)
        k, parts = key
        mpath = path / MANIFEST
        if not mpath.exists():
            path.mkdir(parents=True, exist_ok=True)
            manifest = {
                "format": FORMAT, "key": k, "parts": parts, "num_samples": int(num_samples),
            }  # fmt: skip
            tmp = path / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(manifest, indent=1))
            try:  # exclusive: a concurrent creator's manifest (maybe another key) is kept
                os.link(tmp, mpath)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system
                if not mpath.exists():
                    os.replace(tmp, mpath)
            tmp.unlink(missing_ok=True)
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise RelkdError(f"teacher replay store {str(path)!r}: unreadable {MANIFEST}") from e
        if manifest.get("format") != FORMAT:
            raise RelkdError(f"{str(path)!r} is not a relkd teacher replay store")
        if manifest.get("key") != k:
            theirs = manifest.get("parts", {})
            diff = sorted(n for n in set(parts) | set(theirs) if parts.get(n) != theirs.get(n))
            raise RelkdError(
                f"teacher replay store {str(path)!r} is stale: it was written for another "
                f"{', '.join(diff) or 'key'}. Delete the folder or point to another one"
            )
        store = cls(path, manifest)
        store._remove_dead_temporaries()
        return store

    def _remove_dead_temporaries(self) -> None:
        """Temporary epoch folders of crashed writers on this host (their pid is gone)."""
        host = socket.gethostname()
        for d in self.path.glob(".tmp-epoch_*"):
            parts = d.name.split("-")
            try:
                pid = int(parts[-2])
            except (ValueError, IndexError):
                continue
            if "-".join(parts[2:-2]) != host:
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass

    def epoch_dir(self, epoch: int) -> Path:
        return self.path / f"epoch_{int(epoch)}"

    def has_epoch(self, epoch: int) -> bool:
        d = self.epoch_dir(epoch)
        files = (CHECKSUMS, *(f"{t}.npy" for t in ("params", *self.taps)))
        return all((d / f).is_file() for f in files)

    def stored_epochs(self) -> list[int]:
        out = []
        for d in self.path.glob("epoch_*"):
            try:
                e = int(d.name.split("_", 1)[1])
            except ValueError:
                continue
            if self.has_epoch(e):
                out.append(e)
        return sorted(out)

    def read(self, epoch: int) -> dict[str, np.ndarray]:
        """The stored arrays of ``epoch``, memory-mapped read-only, after checking every file
        against the epoch's ``checksums.json``."""
        d = self.epoch_dir(epoch)
        names = [f"{t}.npy" for t in ("params", *self.taps)]
        try:
            sums = json.loads((d / CHECKSUMS).read_text())
        except (OSError, ValueError) as e:
            raise RelkdError(
                f"teacher replay store {str(d)!r} is damaged: {CHECKSUMS} missing or unreadable"
            ) from e
        if not isinstance(sums, dict) or set(sums) != set(names):
            raise RelkdError(f"teacher replay store {str(d)!r} is damaged: bad {CHECKSUMS}")
        verify_files(d, sums, "teacher replay store")
        try:
            arrays = {n[:-4]: np.load(d / n, mmap_mode="r") for n in names}
        except (OSError, ValueError) as e:
            raise RelkdError(f"teacher replay store {str(d)!r} is damaged: {e}") from e
        n = self.num_samples
        if any(a.shape[0] != n for a in arrays.values()) or arrays["params"].shape != (n, 5):
            raise RelkdError(f"teacher replay store {str(d)!r} is damaged (row counts)")
        return arrays

    def writer(self, epoch: int) -> EpochWriter | None:
        """A writer for ``epoch``, or None while another live process holds its claim."""
        claim = Claim(self.path / f".epoch_{int(epoch)}.claim", what=f"replay epoch {epoch + 1}")
        if not claim.try_acquire():
            return None
        return EpochWriter(self, epoch, claim)

    def __repr__(self) -> str:
        return (
            f"ReplayStore({str(self.path)!r}, n={self.num_samples}, taps={list(self.taps)}, "
            f"dtype={self.dtype}, epochs stored={len(self.stored_epochs())}, key={self.key[:12]})"
        )
