"""Measuring for :mod:`relkd.bench.speed`: memory and timed, interleaved steps.

:class:`_Memory` reads what one configuration holds (CUDA allocator counters, or the resident
set size from ``/proc/self/status`` on the CPU) and :class:`_Run` times one configuration in
blocks of consecutive steps; :func:`_measure_group` interleaves the blocks of several
configurations. What is measured and why it is measured this way is in the docstring of
:mod:`relkd.bench.speed`; the configurations themselves are built by
:mod:`relkd.bench.speed_builds`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import mmap
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from relkd.registry import RelkdError

if TYPE_CHECKING:  # annotations only: speed_builds imports this module
    from relkd.bench.speed_builds import _Spec

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
