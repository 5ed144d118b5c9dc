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
built as :func:`relkd.engine.build.build_method_parts` builds them (zoo models, random init,
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

Code layout: this module holds the constants, :func:`run_speed` and the planning of the cached
steps; :mod:`relkd.bench.speed_measure` the memory readings and the timed, interleaved steps;
:mod:`relkd.bench.speed_builds` the configurations (the engine's step on synthetic data, the
teacher forward, the data pipelines, the synthetic cache files); :mod:`relkd.bench.speed_summary`
the ratios and tables made from the records. The public names (and the private ones tests and
benchmarks import) stay importable from here.
"""

from __future__ import annotations

import functools
import gc
import math
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from relkd.bench.speed_builds import (
    _CacheFiles,
    _data,
    _engine_preloads,
    _open_cache,
    _parts,
    _Spec,
    _SyntheticSet,
    _teacher_forward,
    _train_step,
)

# _evict_pages, _read_bytes: kept importable from here (tests, benchmarks/cold_cache.py use them).
from relkd.bench.speed_measure import (  # noqa: F401
    MIB,
    _blocks,
    _evict_pages,
    _measure_group,
    _read_bytes,
)
from relkd.bench.speed_summary import (  # noqa: F401  (public names kept importable from here)
    format_ratios,
    format_table,
    speed_ratios,
)
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
    from relkd.methods import MethodSpec

    for m in methods:
        MethodSpec.parse(m)  # a RelkdError naming an unknown method or a bad composition
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
    from relkd.engine.build import resolve_device

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
    from relkd.methods import MethodSpec

    if not MethodSpec.parse(m).requires_teacher:
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

    parts = _parts(spec, method_name, with_teacher=True)
    ctx, method = parts.context, parts.method
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
