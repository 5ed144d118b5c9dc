"""Speed benchmark: images/s and peak memory of a training step, per method, on synthetic data.

``run_speed("resnet32x4", "resnet8x4", ["ce", "kd"], batch=64)`` returns one record (a dict with
the keys :data:`RECORD_KEYS`) per *configuration* for one teacher / student pair, batch size and
device (``relkd bench speed`` prints them, ``--json`` as JSON lines; benchmarks/speed.md is one
recorded run):

``teacher_forward``
    ``Teacher(model)(x)`` alone: eval mode, no grad, no taps (what a logit-KD step pays for it).
``student_ce_step``
    The engine's training step of the student with method ``ce`` and no teacher: the baseline.
``online_step`` (per method)
    The engine's training step with the online teacher.
``cached_step`` (per method that needs a teacher)
    The same step with the teacher replaced by the engine's teacher-output cache
    (:class:`~relkd.engine.teacher.CachedTeacher` over a
    :class:`~relkd.data.teacher_cache.TeacherCache` opened as the engine opens it: memory-mapped
    on the host, preloaded onto a GPU when it fits), looked up by sample index and the drawn crop
    / flip. The cache files have the real format, shapes and dtype but synthetic contents
    (building a real one runs the teacher on every augmentation outcome of every image); they
    are written once per run into a temporary folder and deleted at the end. A record with
    ``status: "skipped"`` and the reason where the engine would use the online teacher anyway
    or where the cache would exceed ``cache_budget_mb``.
``cached_step_preloaded``
    The same with the cache read into device memory first: a lookup is pure tensor indexing.
``cached_step_cold`` (opt-in: cache variant ``cold``; CPU only)
    ``cached_step`` with the page cache always cold: before every step (untimed) its own copy of
    the cache files is unmapped (``MADV_DONTNEED``) and dropped from the page cache
    (``POSIX_FADV_DONTNEED``, no root needed), so every lookup reads from storage (on tmpfs
    nothing can be evicted; its ``disk_read_mb`` of ~0 shows it).
``data_inmemory`` / ``data_dataloader``
    The input pipeline alone at the same batch: :class:`~relkd.data.InMemoryLoader` versus a
    ``DataLoader`` over :class:`~relkd.data.ArrayImageDataset` (per-sample PIL crop + flip +
    ToTensor + Normalize, default collate, ``.to(device)``), per worker count.

The step timed is the engine's own (:mod:`relkd.engine.step`, the one ``fit`` runs), on parts
built as :func:`relkd.engine.trainer.build_components` builds them (zoo models, random init,
:class:`MethodContext`, method, :class:`Distiller`, teacher, channels-last, ``torch.compile``,
autocast, ``GradScaler``, SGD with the config defaults); as in ``fit`` the step reads its
on-device loss sums to the host only every ``train.log_every`` steps. Only the data differ: a
fixed synthetic batch already on the device (random images, labels and sample indices; the
drawn augmentation for the cached teacher), so the step is measured without its input pipeline.
The cached steps run where the engine's planner (:func:`relkd.engine.plan.make_plan`) would use
the cache; elsewhere the record is skipped with the planner's reason.

Measurement: ``warmup`` steps first (excluded; they absorb ``torch.compile``), then ``steps``
steps, each timed with ``time.perf_counter`` (CUDA synchronised after every step). The training
configurations of one option set (precision, channels-last, compile) are measured
*interleaved*: all are built and warmed up, then in each of ``rounds`` rounds every
configuration runs a block of ``steps / rounds`` consecutive timed steps in turn, so a slow
drift of the machine hits all alike (one after the other, the same configurations differed by
up to ~15% between two runs on the 2-core dev VM). ``torch.utils.benchmark.Timer`` does not fit
this design: it times ``number`` repetitions as one measurement and has no untimed per-step
hook (the cold variant's eviction) nor interleaving. The data pipelines are measured one after
the other (a DataLoader's workers would keep prefetching). Records give the median and mean
step time, ``images_per_s = batch / median`` (``images_per_s_mean = batch / mean``),
``warmup_s`` and ``first_step_ms`` (one-off costs: compile, kernel selection, epoch start).

Memory (MiB). CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated``. CPU: resident
set size from ``/proc/self/status`` (``VmHWM`` reset via ``/proc/self/clear_refs`` after
``gc.collect()`` + ``malloc_trim(0)``, Linux >= 4.0; otherwise the peak since process start and
``mem_source`` says so); ``tracemalloc`` cannot see torch's C++ allocator and ``getrusage``'s
peak cannot be reset. ``step_mem_mb`` = peak during the first measured block minus the usage
before it; ``peak_mem_mb`` = that plus what the build and warm-up left resident (weights,
optimizer state, buffers, data). ``file_mem_mb`` (CPU): the file-backed part of the growth
(pages of memory-mapped cache files: page cache, shared and reclaimable). ``disk_read_mb``
(Linux): what the process read from storage during its own timed steps (``/proc/self/io``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import mmap
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from relkd._fs import remove_dead_temp_dirs
from relkd.registry import RelkdError

PRECISIONS = ("fp32", "bf16", "fp16")
#: cached-step variants and their configurations (``cold`` is not in the default set: it reads
#: from storage on purpose).
CACHE_VARIANTS = {
    "engine": "cached_step",
    "preloaded": "cached_step_preloaded",
    "cold": "cached_step_cold",
}
CONFIGS = ("teacher_forward", "student_ce_step", "online_step", *CACHE_VARIANTS.values(),
           "data_inmemory", "data_dataloader")  # fmt: skip
#: the measured numbers of a record with status "ok" (all finite; timings positive except
#: ``warmup_s`` (0 without warm-up); memory >= 0).
NUMBER_KEYS = (
    "step_ms_median", "step_ms_mean", "step_ms_min", "step_ms_max", "images_per_s",
    "images_per_s_mean", "warmup_s", "first_step_ms", "peak_mem_mb", "step_mem_mb",
)  # fmt: skip
#: keys of every record (numbers are None where a record has status "skipped").
RECORD_KEYS = (
    "config", "method", "teacher", "student", "batch", "steps", "warmup", "device", "precision",
    "channels_last", "compile", "image_size", "in_chans", "num_classes", "threads", "workers",
    "status", "reason", *NUMBER_KEYS, "file_mem_mb",
    "mem_source", "nonfinite_steps", "rounds", "cache", "disk_read_mb",
)  # fmt: skip
MIB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------------- memory


def _proc_field(path: str, key: str) -> int | None:
    """The first number of the line ``key: N ...`` of a ``/proc`` file (None: unavailable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (Linux ``/proc/self/io``)."""
    return _proc_field("/proc/self/io", "read_bytes")


def _status_bytes(key: str) -> float:
    kb = _proc_field("/proc/self/status", key)
    return float("nan") if kb is None else kb * 1024.0


class _Memory:
    """Memory of one configuration: what its build + warm-up left resident (persistent: weights,
    optimizer state, buffers, data) and the peak above that during measured steps (transient)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.source = "cuda_max_memory_allocated" if self.cuda else "rss_vmhwm"

    def _settle(self) -> tuple[float, float]:
        """(bytes in use, file-backed bytes) after a collection."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.memory_allocated(self.device)), float("nan")
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the kernel
        return _status_bytes("VmRSS"), _status_bytes("RssFile")

    def begin(self) -> None:  # before the build
        self.base, self.file0 = self._settle()

    def built(self) -> None:  # after the build and the warm-up
        self.resident, self.file_built = self._settle()

    def before_steps(self) -> None:
        self.before, self.file_before = self._settle()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            self.source = "rss_vmhwm_since_start"  # not resettable: peak since process start

    def after_steps(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak, file_now = float(torch.cuda.max_memory_allocated(self.device)), math.nan
        else:
            self.peak, file_now = _status_bytes("VmHWM"), _status_bytes("RssFile")
        # File-backed pages (memory-mapped teacher cache files) mapped during the build /
        # warm-up and during the measured steps.
        self.file = (self.file_built - self.file0) + (file_now - self.file_before)

    def result(self) -> dict[str, Any]:
        transient = max(0.0, self.peak - self.before)
        return {
            "peak_mem_mb": (self.resident - self.base + transient) / MIB,
            "step_mem_mb": transient / MIB,
            "file_mem_mb": None if math.isnan(self.file) else self.file / MIB,
            "mem_source": self.source,
        }


# ------------------------------------------------------------------------------- measuring


def _evict_pages(cache: Any) -> None:
    """Make the next lookups in a memory-mapped :class:`TeacherCache` cold: unmap the pages this
    process has mapped (``MADV_DONTNEED``: page cache pages that are still mapped cannot be
    dropped), then write back and drop the files' pages from the page cache
    (``POSIX_FADV_DONTNEED``)."""
    for tap, arr in cache._arrays.items():
        m = getattr(arr, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
        if m is not None:
            m.madvise(mmap.MADV_DONTNEED)  # present: _cached() checked it
        fd = os.open(cache.path / f"{tap}.npy", os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages (a file just written) are not dropped: write them
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One configuration: built and warmed up by :meth:`start`, then timed in blocks of
    consecutive steps (:meth:`block`); memory is measured around its first block."""

    def __init__(self, build: Callable[[], Callable[[int], Any]], device: torch.device,
                 batch: int) -> None:  # fmt: skip
        self.build, self.device, self.batch = build, device, batch
        self.mem = _Memory(device)
        self.times: list[float] = []
        self.read: int | None = 0

    def _step(self) -> float:
        """One step (after its untimed ``before`` work): its wall time, disk reads counted."""
        if self.before is not None:
            self.before()
        r0, t = _read_bytes(), time.perf_counter()
        self.step(self.i)
        _sync(self.device)
        dt, r1 = time.perf_counter() - t, _read_bytes()
        self.read = None if None in (r0, r1, self.read) else self.read + r1 - r0  # type: ignore[operator]
        self.i += 1
        return dt

    def start(self, warmup: int) -> None:
        self.mem.begin()
        self.step = self.build()
        self.before = getattr(self.step, "before", None)  # untimed work before each step
        self.i, t0 = 0, time.perf_counter()
        self.first = self._step() if warmup else None
        for _ in range(warmup - 1):
            self._step()
        self.warmup_s = time.perf_counter() - t0
        self.read = 0  # disk reads of the timed steps only
        self.mem.built()

    def block(self, k: int) -> None:
        measure_memory = not self.times
        if measure_memory:
            self.mem.before_steps()
        self.times += [self._step() for _ in range(k)]
        if measure_memory:
            self.mem.after_steps()  # before the step (and its memory maps) goes

    def finish(self) -> dict[str, Any]:
        stats, nonfinite = getattr(self.step, "stats", None), 0
        if stats is not None:
            try:
                nonfinite = stats().skipped
            except RelkdError:  # a non-finite loss: the engine (on_nonfinite=stop) stops here
                nonfinite = 1  # at least one
        del self.step
        times = self.times
        med, mean = statistics.median(times), statistics.fmean(times)
        return {
            "step_ms_median": 1e3 * med,
            "step_ms_mean": 1e3 * mean,
            "step_ms_min": 1e3 * min(times),
            "step_ms_max": 1e3 * max(times),
            "images_per_s": self.batch / med,
            "images_per_s_mean": self.batch / mean,
            "warmup_s": self.warmup_s,
            "first_step_ms": 1e3 * (times[0] if self.first is None else self.first),
            **self.mem.result(),
            "nonfinite_steps": nonfinite,
            "disk_read_mb": None if self.read is None else self.read / 1e6,
        }


def _blocks(steps: int, rounds: int) -> list[int]:
    """``steps`` split into ``rounds`` nearly equal blocks (none empty)."""
    r = max(1, min(rounds, steps))
    return [steps // r + (1 if j < steps % r else 0) for j in range(r)]


def _measure_group(
    builds: Sequence[Callable[[], Callable[[int], Any]]], spec: _Spec, rounds: int
) -> list[dict[str, Any]]:
    """Measure several configurations *interleaved*: all are built and warmed up first, then
    each round times one block of consecutive steps of every configuration in turn, so a slow
    drift of the machine (clock, a neighbour's load) affects all of them alike and the ratios
    between them stay fair. ``rounds=1``: one block each, one configuration after the other."""
    runs = [_Run(b, spec.device, spec.batch) for b in builds]
    try:
        for run in runs:
            run.start(spec.warmup)
        for k in _blocks(spec.steps, rounds):
            for run in runs:
                run.block(k)
        return [run.finish() for run in runs]
    finally:
        for run in runs:
            run.__dict__.pop("step", None)


# ------------------------------------------------------------------------------ the pieces


class _Spec:
    """Everything fixed for one run_speed call."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def create(self, name: str) -> nn.Module:
        """The model as the engine creates it (``in_chans`` as its ``_chans_kwargs`` decides)."""
        from relkd.engine.trainer import _chans_kwargs
        from relkd.models import create_model

        torch.manual_seed(self.seed)
        return create_model(name, self.num_classes, **_chans_kwargs(name, {}, self.in_chans))

    def shape(self, b: int) -> tuple[int, int, int, int]:
        return (b, self.in_chans, self.image_size, self.image_size)


class _SyntheticSet(Dataset):
    """``batch`` random float images with labels (``targets`` for triplet samplers)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets.numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held in memory as tensors, as CIFAR is (the engine's planner asks for this)."""
        return self.images, torch.from_numpy(self.targets)


def _parts(spec: _Spec, method_name: str, with_teacher: bool) -> tuple[Any, ...]:
    """``(student, teacher model or None, MethodContext, method, ce weight)``, random init, the
    context exactly as build_components makes it (on a CPU dummy batch)."""
    from relkd.config import TrainConfig
    from relkd.engine.trainer import _tappable, probe_shapes
    from relkd.methods import MethodContext, build_method
    from relkd.models import get_feature_info

    student = spec.create(spec.student)
    teacher = spec.create(spec.teacher) if with_teacher else None
    dummy = torch.zeros(spec.shape(2))
    s_shapes = probe_shapes(student, _tappable(student), dummy)
    if s_shapes["logits"] != (spec.num_classes,):
        raise RelkdError(
            f"student {spec.student!r} predicts {s_shapes['logits'][0]} classes, not "
            f"num_classes={spec.num_classes}"
        )
    ctx = MethodContext(
        num_classes=spec.num_classes,
        student_stages=get_feature_info(student),
        student_shapes=s_shapes,
        epochs=TrainConfig.epochs,
        num_train_samples=spec.num_train_samples,
        seed=spec.seed,
    )
    if teacher is not None:
        ctx.teacher_stages = get_feature_info(teacher)
        ctx.teacher_shapes = probe_shapes(teacher, _tappable(teacher), dummy)
        if ctx.teacher_shapes["logits"] != s_shapes["logits"]:
            raise RelkdError(
                f"teacher {spec.teacher!r} predicts {ctx.teacher_shapes['logits'][0]} classes "
                f"but the student {s_shapes['logits'][0]}"
            )
    return (student, teacher, ctx, *build_method(method_name, ctx))


def _synthetic_batch(spec: _Spec, method) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One batch as the engine's loader would deliver it to this method (on the device):
    through the method's ``wrap_train_dataset`` (e.g. triplets) and ``IndexedDataset`` when it
    wants sample indices, collated with ``collate_with_extras``."""
    from relkd.data import IndexedDataset, collate_with_extras

    g = torch.Generator().manual_seed(spec.seed)
    images = torch.randn(spec.shape(spec.batch), generator=g)
    targets = torch.randint(0, spec.num_classes, (spec.batch,), generator=g)
    ds: Dataset = _SyntheticSet(images, targets)
    ds = method.wrap_train_dataset(ds)
    if "index" in method.batch_extras:
        ds = IndexedDataset(ds)
    batch = collate_with_extras([ds[i] for i in range(spec.batch)])
    x, y, extras = batch if len(batch) == 3 else (*batch, {})
    dev = spec.device
    extras = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in extras.items()}
    return x.to(dev), y.to(dev), extras


def _index_pool(spec: _Spec, n_steps: int, per_step: int) -> torch.Tensor:
    """Distinct random sample indices in [0, num_train_samples) for every step, [steps, n]."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    n = spec.num_train_samples
    rows = [torch.randperm(n, generator=g)[:per_step] for _ in range(n_steps)]
    if per_step > n:
        rows = [torch.randint(0, n, (per_step,), generator=g) for _ in range(n_steps)]
    return torch.stack(rows).to(spec.device)


class _CacheFiles:
    """Teacher-output caches in the format of :mod:`relkd.data.teacher_cache` (one per set of
    taps, written once per run into a temporary folder, removed at the end).

    The entries are synthetic (a random block tiled over the images): building a real cache runs
    the teacher on every (image, outcome) pair -- 8.1M forward passes for CIFAR -- and the
    lookup cost does not depend on the values. Files, shapes, dtype and the manifest are those
    :meth:`TeacherCache.build` writes, and they are opened with :meth:`TeacherCache.open`.
    """

    def __init__(self, spec: _Spec, dtype: str, root: str | None) -> None:
        self.spec, self.dtype, self.root_arg = spec, dtype, root
        self.root: Path | None = None
        self.paths: dict[tuple[tuple[str, ...], str], Path] = {}
        self.loaded: dict[tuple[str, ...], Any] = {}

    def nbytes(self, taps: Sequence[str], dims: dict[str, int]) -> int:
        from relkd.data.teacher_cache import num_outcomes

        k = num_outcomes(_padding(self.spec.image_size), True)
        esize = 2 if self.dtype == "fp16" else 4
        return self.spec.num_train_samples * k * sum(dims[t] for t in taps) * esize

    def path(self, taps: tuple[str, ...], dims: dict[str, int], copy: str = "") -> Path:
        """The cache files of ``taps``; a non-empty ``copy`` names a separate set of files (the
        cold variant needs its own: page-cache pages that another configuration's memory map
        still maps cannot be dropped)."""
        if (taps, copy) not in self.paths:
            self.paths[taps, copy] = self._write(taps, dims, copy)
        return self.paths[taps, copy]

    def _write(self, taps: tuple[str, ...], dims: dict[str, int], copy: str = "") -> Path:
        import json
        import tempfile
        import uuid

        from relkd.data import teacher_cache as tc
        from relkd.data.teacher_cache import CACHE_VERSION, FORMAT, MANIFEST, num_outcomes

        spec = self.spec
        if self.root is None:
            # Named after this pid, so a later run removes the GiBs a killed run left behind.
            parent = Path(self.root_arg or tempfile.gettempdir())
            remove_dead_temp_dirs(parent, "relkd_speed_cache_")
            prefix = f"relkd_speed_cache_{os.getpid()}_"
            self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        path = self.root / ("_".join(taps) + (f"_{copy}" if copy else ""))
        path.mkdir()
        p = _padding(spec.image_size)
        n, k = spec.num_train_samples, num_outcomes(p, True)
        np_dtype = np.float16 if self.dtype == "fp16" else np.float32
        rng = np.random.default_rng(spec.seed)
        for tap in taps:
            arr = np.lib.format.open_memmap(
                path / f"{tap}.npy", mode="w+", dtype=np_dtype, shape=(n, k, dims[tap])
            )
            block = rng.standard_normal((min(n, 256), k, dims[tap])).astype(np_dtype)
            for a in range(0, n, len(block)):
                m = min(len(block), n - a)
                arr[a : a + m] = block[:m]
            arr.flush()
            del arr
        mean, std = _norm_stats(spec.in_chans)
        manifest = {
            "format": FORMAT,
            "version": CACHE_VERSION,
            "key": f"relkd-bench-speed-synthetic-{uuid.uuid4().hex}",
            "parts": {
                "version": CACHE_VERSION, "teacher": "synthetic", "data": "synthetic",
                "padding": p, "flip": True, "mean": list(mean), "std": list(std),
                "taps": list(taps), "dtype": self.dtype,
            },
            "num_images": n,
            "num_outcomes": k,
            "num_classes": dims["logits"],
            "pooled_dim": dims.get("pooled"),
            "checksums": {f"{t}.npy": tc.file_sha256(path / f"{t}.npy") for t in taps},
        }  # fmt: skip
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return path

    def preloaded(self, taps: tuple[str, ...], dims: dict[str, int]):
        """The cache of ``taps`` read into memory on the device (``preload=True``), one copy
        shared by every configuration of the run."""
        from relkd.data.teacher_cache import TeacherCache

        if taps not in self.loaded:
            path = self.path(taps, dims)
            self.loaded[taps] = TeacherCache.open(path, device=self.spec.device, preload=True)
        return self.loaded[taps]

    def close(self) -> None:
        self.loaded.clear()
        import shutil

        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _engine_preloads(nbytes: int, device: torch.device) -> bool:
    """The engine's choice (relkd.engine.trainer._teacher_cache): memory-mapped on the host,
    preloaded onto a GPU when the cache takes under 40% of the free GPU memory."""
    return device.type == "cuda" and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]


def _open_cache(path: Path, device: torch.device):
    """Open the cache as the engine does (see :func:`_engine_preloads`)."""
    from relkd.data.teacher_cache import TeacherCache

    cache = TeacherCache.open(path, device=device)
    if _engine_preloads(cache.nbytes, device):
        cache = TeacherCache.open(path, device=device, preload=True)
    return cache


def _train_step(
    spec: _Spec,
    method_name: str,
    *,
    precision: str,
    channels_last: bool,
    compile_: bool,
    teacher: str = "none",  # "none" | "online" | "cached"
    cache: Callable[[], Any] | None = None,
    cold: bool = False,
) -> Callable[[], Callable[[int], Any]]:
    """A build of the engine's :class:`~relkd.engine.step.TrainStep` on the synthetic batch;
    step ``i`` gets its own sample indices (and, cached, its own drawn crop / flip)."""

    def build() -> Callable[[int], Any]:
        from relkd.config import OptimConfig, TrainConfig
        from relkd.engine.distiller import Distiller
        from relkd.engine.step import TrainStep
        from relkd.engine.teacher import CachedTeacher, Teacher
        from relkd.engine.trainer import _amp

        device = spec.device
        student, teacher_model, _, method, ce_weight = _parts(spec, method_name, teacher != "none")
        distiller = Distiller(student, method, ce_weight).to(device)
        if channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        tea: Any = None
        drop: tuple[str, ...] = ()
        if teacher == "online" and method.requires_teacher:
            tea = Teacher(teacher_model, method.teacher_taps()).to(device)
        elif teacher == "cached":
            # As the engine: the cached teacher reads index + the drawn augmentation, which are
            # dropped before the method (index kept when the method wants it).
            tea = CachedTeacher(cache())
            drop = ("aug_offsets", "aug_flips")
            drop += () if "index" in method.batch_extras else ("index",)
        del teacher_model
        oc = OptimConfig()
        params = [p for p in distiller.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay,
            nesterov=oc.nesterov,
        )  # fmt: skip
        tc = TrainConfig  # the defaults of train.*
        model = torch.compile(distiller, mode=tc.compile_mode) if compile_ else distiller
        train_step = TrainStep(
            model, opt, params=params, state_module=distiller,
            scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            amp=_amp(precision, device), teacher=tea, drop_extras=drop,
            prepare_batch=method.prepare_batch, channels_last=channels_last,
            method_name=method_name,
        )  # fmt: skip
        method.set_phase("main")
        method.set_epoch(0)
        distiller.train()
        x0, y0, extras0 = _synthetic_batch(spec, method)
        n = spec.warmup + spec.steps
        per_step: dict[str, torch.Tensor] = {}  # [steps, B, ...] per-step extras
        if "index" in method.batch_extras or teacher == "cached":
            per_step["index"] = _index_pool(spec, n, len(x0))
        if teacher == "cached":
            p = _padding(spec.image_size)
            g = torch.Generator().manual_seed(spec.seed + 2)
            per_step["aug_offsets"] = torch.randint(0, 2 * p + 1, (n, len(x0), 2), generator=g)
            per_step["aug_flips"] = torch.randint(0, 2, (n, len(x0)), generator=g).bool()
        per_step = {k: v.to(device) for k, v in per_step.items()}

        def step(i: int) -> None:
            train_step(x0, y0, {**extras0, **{k: v[i] for k, v in per_step.items()}})
            if (i + 1) % tc.log_every == 0:  # fit's read point (the one host read)
                with contextlib.suppress(RelkdError):  # non-finite: counted by _Run.finish
                    train_step.read()

        # _Run reads the on-device sums once more after the timed steps (untimed): the number
        # of non-finite steps; with on_nonfinite "stop" the read raises instead.
        step.stats = train_step.read  # type: ignore[attr-defined]
        if cold:  # _Run calls this untimed before every step
            step.before = functools.partial(_evict_pages, tea.cache)  # type: ignore[attr-defined]
        return step

    return build


def _teacher_forward(spec: _Spec, channels_last: bool) -> Callable[[], Callable[[int], Any]]:
    def build() -> Callable[[int], Any]:
        from relkd.engine.teacher import Teacher

        # As in the engine's step: no taps for a logit method, the model not converted to
        # channels-last (only the input is), and no autocast (the engine calls the teacher
        # outside amp_ctx).
        tea = Teacher(spec.create(spec.teacher)).to(spec.device)
        g = torch.Generator().manual_seed(spec.seed)
        x = torch.randn(spec.shape(spec.batch), generator=g).to(spec.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def step(i: int) -> None:
            tea(x)

        return step

    return build


def _norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from relkd.data import transforms as T

    if in_chans == 3:
        return T.CIFAR100_MEAN, T.CIFAR100_STD
    if in_chans == 1:
        return T.FASHION_MNIST_MEAN, T.FASHION_MNIST_STD
    return (0.5,) * in_chans, (0.25,) * in_chans


def _fake_split(spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 [N, H, W, C] array of random pixels and int64 labels (a CIFAR-shaped split)."""
    rng = np.random.default_rng(spec.seed)
    s, c, n = spec.image_size, spec.in_chans, spec.num_train_samples
    data = rng.integers(0, 256, size=(n, s, s, c), dtype=np.uint8)
    return data, rng.integers(0, spec.num_classes, size=n).astype(np.int64)


def _padding(image_size: int) -> int:
    return 4 if image_size >= 32 else 2  # as the engine's default crop padding


def _cycling(make_iter: Callable[[int], Iterable[Any]]) -> Callable[[int], Any]:
    """A step that takes the next batch, starting a new epoch when one runs out."""
    state: dict[str, Any] = {"epoch": 0}
    state["it"] = iter(make_iter(0))

    def step(i: int) -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = iter(make_iter(state["epoch"]))
            return next(state["it"])

    return step


def _data(spec: _Spec, workers: int | None) -> Callable[[], Callable[[int], Any]]:
    """The input pipeline over a fake uint8 split: ``InMemoryLoader`` (``workers`` None) or a
    ``DataLoader`` over ``ArrayImageDataset`` with ``workers`` workers, batches to the device
    (as the engine's loaders deliver them)."""

    def build() -> Callable[[int], Any]:
        from relkd.data import ArrayImageDataset, InMemoryLoader
        from relkd.data.transforms import crop_flip_transforms

        data, targets = _fake_split(spec)
        mean, std = _norm_stats(spec.in_chans)
        pad, dev, cuda = _padding(spec.image_size), spec.device, spec.device.type == "cuda"
        if workers is None:
            loader = InMemoryLoader(
                torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(targets), batch_size=spec.batch, shuffle=True, augment=True,
                padding=pad, flip=True, mean=mean, std=std, device=dev, seed=spec.seed,
            )  # fmt: skip
            del data
        else:
            train_tf, _ = crop_flip_transforms(spec.image_size, pad, mean, std)
            ds = ArrayImageDataset(data, targets, transform=train_tf, mean=mean, std=std)

        def epoch(e: int) -> Iterable[Any]:
            if workers is None:
                loader.set_epoch(e)
                return loader
            batches = torch.utils.data.DataLoader(
                ds, batch_size=spec.batch, shuffle=True, num_workers=workers, pin_memory=cuda,
                generator=torch.Generator().manual_seed(spec.seed + e), persistent_workers=False,
            )  # fmt: skip
            return ((x.to(dev, non_blocking=cuda), y.to(dev)) for x, y in batches)

        return _cycling(epoch)

    return build


# ----------------------------------------------------------------------------------- API


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    out = [v.strip() for item in value for v in str(item).split(",") if v.strip()]
    if not out:
        raise RelkdError(f"no {what} given")
    return list(dict.fromkeys(out))


def _as_flags(value: bool | Sequence[bool], what: str) -> list[bool]:
    if isinstance(value, bool):
        return [value]
    flags = list(dict.fromkeys(bool(v) for v in value))
    if not flags:
        raise RelkdError(f"{what}: give True, False or both")
    return flags


def _validate(spec: _Spec, methods: list[str]) -> None:
    """Every name and number checked before anything is measured."""
    from relkd.methods.base import METHODS

    for m in methods:
        for part in m.split("+"):
            METHODS.get(part.strip())  # RelkdError naming the unknown method
    for name in (spec.student, spec.teacher):
        spec.create(name)  # a RelkdError naming an unknown model
    for p in spec.precisions:
        if p not in PRECISIONS:
            raise RelkdError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    lows = {"batch": 1, "steps": 1, "image_size": 1, "num_classes": 1, "in_chans": 1,
            "warmup": 0, "rounds": 1, "threads": 1}  # fmt: skip
    for key, low in lows.items():
        if getattr(spec, key) is not None and int(getattr(spec, key)) < low:
            raise RelkdError(f"{key} must be >= {low}, got {getattr(spec, key)}")
    if spec.num_train_samples < max(2, spec.batch):
        raise RelkdError(
            f"num_train_samples ({spec.num_train_samples}) must be >= the batch ({spec.batch})"
        )
    if spec.cache_dtype not in ("fp16", "fp32"):
        raise RelkdError(f"cache_dtype must be fp16 or fp32, got {spec.cache_dtype!r}")
    if any(w < 0 for w in spec.data_workers):
        raise RelkdError(f"data_workers must be >= 0, got {list(spec.data_workers)}")


def run_speed(
    teacher: str,
    student: str,
    methods: str | Sequence[str] = ("ce", "kd"),
    *,
    batch: int = 64,
    steps: int = 20,
    warmup: int = 5,
    device: str = "auto",
    precisions: str | Sequence[str] = ("fp32",),
    channels_last: bool | Sequence[bool] = False,
    compile: bool | Sequence[bool] = False,
    image_size: int = 32,
    num_classes: int = 100,
    threads: int | None = None,
    in_chans: int = 3,
    num_train_samples: int = 50_000,
    data: bool = True,
    data_workers: Sequence[int] = (0, 2),
    cache_budget_mb: float = 8192.0,
    cache_dtype: str = "fp16",
    cache_root: str | None = None,
    rounds: int = 5,
    cache_variants: str | Sequence[str] = ("engine", "preloaded"),
    seed: int = 0,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every configuration (see the module doc) and return one record per configuration.

    Args:
        teacher, student: zoo names (or ``torchvision:`` / ``timm:`` names).
        methods: registered methods or compositions, a list or a comma list; ``ce`` (the
            ``student_ce_step``) is measured always.
        batch, steps, warmup: batch size, measured steps, excluded warm-up steps per config.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        precisions: any of ``fp32``, ``bf16``, ``fp16`` (autocast as ``train.precision``).
        channels_last, compile: a flag, or ``(False, True)`` to measure without and with.
        image_size, in_chans, num_classes: the synthetic data's shape (CIFAR-100: 32, 3, 100).
        threads: ``torch.set_num_threads`` for the run (restored afterwards); None keeps it.
        num_train_samples: the training-set size N (memory banks, teacher cache, data split).
        data, data_workers: also measure the data pipelines, with these DataLoader workers.
        cache_budget_mb: the largest teacher cache to write (MiB); over it: skipped records.
        cache_dtype, cache_root: the cache's storage dtype (``fp16``, the engine's default, or
            ``fp32``) and the folder of its temporary files (default: the system's temp folder).
        cache_variants: any of ``engine``, ``preloaded``, ``cold`` (:data:`CACHE_VARIANTS`).
        rounds: interleaved rounds per option set (1: one configuration after the other).
        on_record: called with each record as soon as it is measured.
    """
    from relkd.engine.trainer import resolve_device

    methods = _as_list(methods, "methods")
    spec = _Spec(
        teacher=teacher, student=student, batch=int(batch), steps=int(steps),
        warmup=int(warmup), precisions=_as_list(precisions, "precisions"),
        image_size=int(image_size), num_classes=int(num_classes), in_chans=int(in_chans),
        threads=threads, num_train_samples=int(num_train_samples),
        data_workers=[int(w) for w in data_workers], seed=int(seed), cache_dtype=cache_dtype,
        rounds=int(rounds),
    )  # fmt: skip
    cache_variants = _as_list(cache_variants, "cache_variants")
    bad = [v for v in cache_variants if v not in CACHE_VARIANTS]
    if bad:
        raise RelkdError(f"unknown cache variant(s) {bad}: choose from {', '.join(CACHE_VARIANTS)}")
    cl_flags = _as_flags(channels_last, "channels_last")
    compile_flags = _as_flags(compile, "compile")
    _validate(spec, methods)
    spec.device = resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    base = {
        "teacher": teacher, "student": student, "batch": spec.batch, "steps": spec.steps,
        "warmup": spec.warmup, "device": str(spec.device), "image_size": spec.image_size,
        "in_chans": spec.in_chans, "num_classes": spec.num_classes,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    records: list[dict[str, Any]] = []
    files = _CacheFiles(spec, cache_dtype, cache_root)
    # (fields, build, skip reason or None), measured and emitted group by group.
    group: list[tuple[dict[str, Any], Any, str | None]] = []

    def flush(interleave: bool) -> None:
        todo = [b for _, b, why in group if why is None]
        if interleave:
            results = _measure_group(todo, spec, rounds)
        else:  # one after the other (the data pipelines: see the module doc)
            results = [_measure_group([b], spec, 1)[0] for b in todo]
        it = iter(results)
        for fields, _, why in group:
            rec: dict[str, Any] = {**dict.fromkeys(RECORD_KEYS), **base, **fields}
            if why is not None:
                rec.update(status="skipped", reason=why)
            else:
                rec.update(next(it), status="ok")
                rec["rounds"] = len(_blocks(spec.steps, rounds if interleave else 1))
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        group.clear()

    try:
        _prime(spec)
        # Objects alive now (modules, the imported libraries) are moved out of the collector's
        # reach: the gc.collect() before each measurement then costs milliseconds, not ~0.3 s.
        gc.collect()
        gc.freeze()
        for precision in spec.precisions:
            for cl in cl_flags:
                for comp in compile_flags:
                    opts = {"precision": precision, "channels_last": cl, "compile": comp}
                    kw = {"precision": precision, "channels_last": cl, "compile_": comp}
                    group.append(({"config": "teacher_forward", **opts},
                                  _teacher_forward(spec, cl), None))  # fmt: skip
                    for m in ["ce", *(m for m in methods if m != "ce")]:
                        config = "student_ce_step" if m == "ce" else "online_step"
                        mode = "none" if m == "ce" else "online"
                        fields = {"config": config, "method": m, **opts}
                        group.append((fields, _train_step(spec, m, teacher=mode, **kw), None))
                        if m != "ce":
                            for f, cache, why in _cached(spec, m, files, cache_budget_mb,
                                                         cache_variants):  # fmt: skip
                                cold = f["config"] == "cached_step_cold"
                                step = _train_step(
                                    spec, m, teacher="cached", cache=cache, cold=cold, **kw
                                )
                                group.append(({**f, **opts}, step, why))
                    flush(interleave=True)
        if data:
            group.append(({"config": "data_inmemory"}, _data(spec, None), None))
            for w in spec.data_workers:
                group.append(({"config": "data_dataloader", "workers": w}, _data(spec, w), None))
            flush(interleave=False)
    finally:
        files.close()
        gc.unfreeze()
        torch.set_num_threads(old_threads)
    return records


def _cached(
    spec: _Spec, m: str, files: _CacheFiles, budget_mb: float, variants: Sequence[str]
) -> list[tuple[dict[str, Any], Callable[[], Any] | None, str | None]]:
    """``(record fields, cache opener, skip reason)`` of each cached step of method ``m`` (none
    for a method without a teacher)."""
    from relkd.methods.base import METHODS

    if not any(METHODS.get(p.strip()).requires_teacher for p in m.split("+")):
        return []
    why, taps, dims, nbytes = _cache_plan(spec, m, files, budget_mb)
    what = f"TeacherCache {files.dtype} {'+'.join(taps)} {nbytes / MIB:.0f} MiB"
    gpu_preload = why is None and _engine_preloads(nbytes, spec.device)
    out = []
    for v in variants:
        skip, opener, desc = why, None, None
        if v == "cold" and skip is None:
            if not hasattr(os, "posix_fadvise") or not hasattr(mmap, "MADV_DONTNEED"):
                skip = "this platform has no posix_fadvise / MADV_DONTNEED to evict the pages"
            elif spec.device.type != "cpu":
                skip = "the cold variant measures the host memory map (CPU)"
        if v == "preloaded" and skip is None and gpu_preload:
            skip = "the engine preloads this cache on this device already"
        if skip is None and v == "preloaded":
            opener = functools.partial(lambda c: c, files.preloaded(taps, dims))
            desc = (f"{what}, preloaded into {spec.device} memory before the build (one copy "
                    "shared by the run, not in peak_mem_mb)")  # fmt: skip
        elif skip is None:
            path = files.path(taps, dims, "cold" if v == "cold" else "")
            opener = functools.partial(_open_cache, path, spec.device)
            desc = f"{what}, " + (
                "memory-mapped, its pages evicted before every step" if v == "cold" else
                "engine's choice: memory-mapped" + (", preloaded on the GPU" * gpu_preload)
            )  # fmt: skip
        fields = {"config": CACHE_VARIANTS[v], "method": m, "cache": desc}
        out.append((fields, opener, skip))
    return out


def _prime(spec: _Spec) -> None:
    """Two unrecorded steps of a teacher forward and a student step: one-off costs of the
    process (lazy library initialisation, first-use kernel caches) are not charged to the
    first configuration measured."""
    for build in (
        _teacher_forward(spec, False),
        _train_step(spec, "ce", precision="fp32", channels_last=False, compile_=False),
    ):
        step = build()
        step(0)
        step(min(1, spec.warmup + spec.steps - 1))
        del step


def _cache_plan(
    spec: _Spec, method_name: str, files: _CacheFiles, budget_mb: float
) -> tuple[str | None, tuple[str, ...], dict[str, int], int]:
    """``(why not, taps, dims, bytes)`` of the teacher cache of a method: logits plus its
    teacher taps; not cached where the engine's planner (on in-memory data, with
    ``train.teacher_cache`` on) keeps the online teacher, with its reason."""
    from relkd.engine.plan import make_plan

    _, _, ctx, method, _ = _parts(spec, method_name, with_teacher=True)
    taps = tuple(dict.fromkeys(["logits", *method.teacher_taps()]))
    plan = make_plan(
        method=method, method_name=method_name, has_teacher=True, teacher_cache="auto",
        train_ds=_SyntheticSet(torch.zeros(spec.shape(1)), torch.zeros(1, dtype=torch.long)),
    )  # fmt: skip
    if plan.teacher != "cache":
        return "; ".join(plan.notes) or f"the engine's teacher: {plan.teacher}", taps, {}, 0
    dims = {t: int(math.prod(ctx.teacher_shapes[t])) for t in taps}
    need = files.nbytes(taps, dims)
    why = None
    if need > budget_mb * MIB:
        why = (
            f"a {files.dtype} teacher cache ({', '.join(taps)}) for {spec.num_train_samples} "
            f"images x their augmentation outcomes needs {need / MIB:.0f} MiB > "
            f"cache_budget_mb={budget_mb:.0f}"
        )
    return why, taps, dims, need


_CACHED_RATIO = {
    "cached_step": "cached / ce",
    "cached_step_preloaded": "cached (preloaded) / ce",
    "cached_step_cold": "cached (cold page cache) / ce",
}


def speed_ratios(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios of the speed targets, from the records of ONE run_speed call.

    * ``online / (ce + teacher)``: online step median / (student CE step median + teacher
      forward median), per method and option set (target <= 1.05 for ``kd``);
    * ``cached / ce``, ``cached (preloaded) / ce``, ``cached (cold page cache) / ce``: cached
      step median / student CE step median (target <= 1.10 for ``kd``);
    * ``inmemory / dataloader(workers=W)``: InMemoryLoader images/s / DataLoader images/s
      (target >= 3).

    ``value`` is from the medians, ``value_mean`` from the means.
    """
    ok = [r for r in records if r["status"] == "ok"]
    out: list[dict[str, Any]] = []

    def opts(r: dict[str, Any]) -> tuple[Any, Any, Any]:
        return r["precision"], r["channels_last"], r["compile"]

    def find(config: str, o: tuple[Any, Any, Any]) -> dict[str, Any] | None:
        return next((r for r in ok if r["config"] == config and opts(r) == o), None)

    def add(name: str, r: dict[str, Any], over: list, target: str | None) -> None:
        """``r``'s time / the summed times of ``over``; ``target`` like ``"<= 1.05"``."""
        v, v_mean = (r[k] / sum(d[k] for d in over) for k in ("step_ms_median", "step_ms_mean"))
        meets = None
        if target is not None:
            bound = float(target.split()[1])
            meets = v <= bound if target.startswith("<=") else v >= bound
        o = opts(r)
        out.append({
            "ratio": name, "method": r["method"], "precision": o[0], "channels_last": o[1],
            "compile": o[2], "value": v, "value_mean": v_mean, "target": target, "meets": meets,
        })  # fmt: skip

    mem = next((r for r in ok if r["config"] == "data_inmemory"), None)
    for r in ok:
        o, kd = opts(r), r["method"] == "kd"
        ce, tf = find("student_ce_step", o), find("teacher_forward", o)
        if r["config"] == "online_step" and ce and tf:
            add("online / (ce + teacher)", r, [ce, tf], "<= 1.05" if kd else None)
        elif r["config"] in _CACHED_RATIO and ce:
            add(_CACHED_RATIO[r["config"]], r, [ce], "<= 1.10" if kd else None)
        elif r["config"] == "data_dataloader" and mem:
            # images/s ratio = the inverse ratio of the step times (images/s = batch / time)
            add(f"inmemory / dataloader(workers={r['workers']})", r, [mem], ">= 3")
    return out


#: The columns of :func:`format_table`: record key -> (header, format of a float value).
_COLUMNS = {
    "config": ("config", ""), "method": ("method", ""), "precision": ("precision", ""),
    "channels_last": ("channels_last", ""), "compile": ("compile", ""),
    "workers": ("workers", ""), "step_ms_median": ("ms/step median", ".2f"),
    "step_ms_mean": ("ms/step mean", ".2f"), "images_per_s": ("images/s", ".0f"),
    "peak_mem_mb": ("peak MiB", ".1f"), "step_mem_mb": ("step MiB", ".1f"),
    "file_mem_mb": ("file MiB", ".0f"), "disk_read_mb": ("disk read MB", ".1f"),
}  # fmt: skip


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = ["| " + " | ".join(h for h, _ in _COLUMNS.values()) + " |", "|---" * 13 + "|"]
    for r in records:
        cells = [
            "" if (v := r.get(k)) is None else format(v, f) if isinstance(v, float) else str(v)
            for k, (_, f) in _COLUMNS.items()
        ]
        if r["status"] != "ok":
            cells[6:] = [f"skipped: {r['reason']}"] + [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratios(ratios: Sequence[dict[str, Any]]) -> str:
    lines = []
    for q in ratios:
        opt = "" if q["precision"] is None else f" [{q['precision']}"
        if q["precision"] is not None:
            opt += (", channels_last" if q["channels_last"] else "") + (
                ", compile" if q["compile"] else ""
            )
            opt += "]"
        who = f" {q['method']}" if q["method"] else ""
        tgt = ""
        if q["target"]:
            tgt = f"  target {q['target']}: {'met' if q['meets'] else 'MISSED'}"
        lines.append(
            f"{q['ratio']}{who}{opt}: {q['value']:.3f} (means: {q['value_mean']:.3f}){tgt}"
        )
    return "\n".join(lines)
