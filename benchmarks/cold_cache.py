"""Cold-cache lookups in a teacher-output cache: default read-ahead vs ``MADV_RANDOM``.

    sudo python benchmarks/cold_cache.py [--images 50000] [--outcomes 162] [--classes 100]
                                          [--batch 64] [--batches 50] [--dir /tmp/relkd_cold]

Writes a CIFAR-100-sized ``logits.npy`` ([N, K, C] fp16 of random values, the layout of
:mod:`relkd.data.teacher_cache`), then for each variant drops the page cache
(``/proc/sys/vm/drop_caches``: needs root) and times ``arr[index, outcome]`` for random batches,
as :meth:`TeacherCache.lookup` does on the host. Prints one JSON object per variant (median and
mean and 90th-percentile ms per batch, MB read from disk). The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from relkd.bench.speed import _read_bytes
from relkd.data.teacher_cache import _advise_random


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--outcomes", type=int, default=162)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--dir", type=Path, default=Path("/tmp/relkd_cold"))
    a = p.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    path = a.dir / "logits.npy"
    shape = (a.images, a.outcomes, a.classes)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    rng = np.random.default_rng(0)
    for s in range(0, a.images, 1000):  # write in slices: bounded memory
        arr[s : s + 1000] = rng.standard_normal((min(1000, a.images - s), *shape[1:]))
    arr.flush()
    del arr
    draws = [
        (rng.integers(0, a.images, a.batch), rng.integers(0, a.outcomes, a.batch))
        for _ in range(a.batches)
    ]
    try:
        for variant in ("default", "madv_random"):
            _drop_caches()
            m = np.load(path, mmap_mode="r")
            if variant == "madv_random":
                _advise_random(m)
            times = []
            read0 = _read_bytes() or 0
            for i, k in draws:
                t0 = time.perf_counter()
                np.array(m[i, k])
                times.append(1e3 * (time.perf_counter() - t0))
            read = (_read_bytes() or 0) - read0
            del m
            print(
                json.dumps(
                    {
                        "variant": variant,
                        "file_gib": round(path.stat().st_size / 2**30, 3),
                        "batch": a.batch,
                        "batches": a.batches,
                        "median_ms": round(statistics.median(times), 3),
                        "mean_ms": round(statistics.fmean(times), 3),
                        "p90_ms": round(statistics.quantiles(times, n=10)[-1], 3),
                        "disk_read_mb": round(read / 1e6, 1),
                        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    }
                ),
                flush=True,
            )
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
