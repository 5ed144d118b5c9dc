"""Time and peak memory of the logit losses (forward + backward), written as a markdown table.

    python benchmarks/bench_losses.py                                # print the table
    python benchmarks/bench_losses.py --out benchmarks/losses.md     # also record it with context
    python benchmarks/bench_losses.py --threads 1                    # on a shared/loaded machine

Each loss runs on random logits (student with grad, teacher without) at every (B, C): one warm-up
call, then ``--repeats`` timed forward+backward calls; the median is reported.

Peak memory (CPU) is measured in a second process started with glibc's MALLOC_MMAP_THRESHOLD_=4096,
so that every allocation of 4 KiB or more is its own mapping, returned to the OS when freed: the
resident set then follows the live tensors, and the growth of its peak (VmHWM, reset through
/proc/self/clear_refs) during one forward+backward, over the resident set with the inputs already
allocated, is the loss's peak working memory. (Without that setting freed heap memory is reused
without growing the resident set and small losses read as 0.) The timing process runs with the
default allocator settings. On CUDA, torch.cuda.max_memory_allocated is used instead.

Intra-op threads: on a machine whose cores are shared with other processes PyTorch's parallel ops
can slow down by 10-100x (every op waits for its slowest thread); ``--threads 1`` gives stable
numbers there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

from relkd.losses.clkd import clkd_loss
from relkd.losses.cmkd import cmkd_loss
from relkd.losses.dist import dist_loss
from relkd.losses.dkd import dkd_loss

LOSSES = {
    "dkd": lambda s, t, y: dkd_loss(s, t, y),
    "dist": lambda s, t, y: dist_loss(s, t, temperature=4.0),
    "clkd": lambda s, t, y: clkd_loss(s, t),
    "clkd (corr=sample)": lambda s, t, y: clkd_loss(s, t, corr="sample"),
    "cmkd": lambda s, t, y: cmkd_loss(s, t),
    "cmkd (rank=sorting_network)": lambda s, t, y: cmkd_loss(s, t, rank="sorting_network"),
}


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kib("VmHWM") is not None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(b: int, c: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_(True)
    zt = (torch.randn(b, c, generator=g) * 3).to(device)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    return zs, zt, y


def measure_time(fn, b: int, c: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward+backward."""
    zs, zt, y = _inputs(b, c, device)

    def step() -> None:
        zs.grad = None
        fn(zs, zt, y).backward()

    step()  # warm-up (kernel loading, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_memory(fn, b: int, c: int, device: torch.device) -> float | None:
    """Peak working memory (MiB) of one forward+backward, see the module docstring."""
    zs, zt, y = _inputs(b, c, device)
    fn(zs, zt, y).backward()  # warm-up
    zs.grad = torch.zeros_like(zs)  # keep the gradient buffer out of the measurement
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(zs, zt, y).backward()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_peak_rss():
        return None
    base = _vm_kib("VmRSS")
    fn(zs, zt, y).backward()
    return (_vm_kib("VmHWM") - base) / 1024


def _memory_pass(args: argparse.Namespace) -> dict[str, float | None]:
    """Run this script again with the mmap threshold set and collect its memory numbers."""
    if torch.device(args.device).type == "cuda":
        return _memory_rows(args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-only", "--sizes", args.sizes]
    cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _memory_rows(args: argparse.Namespace) -> dict[str, float | None]:
    device = torch.device(args.device)
    return {
        f"{name}|{b}x{c}": measure_memory(fn, b, c, device)
        for name, fn in LOSSES.items()
        for b, c in _sizes(args.sizes)
    }


def _sizes(spec: str) -> list[tuple[int, int]]:
    return [(int(b), int(c)) for b, c in (s.split("x") for s in spec.split(","))]


def _fmt(load: tuple[float, ...] | None) -> str:
    return "n/a" if load is None else " / ".join(f"{v:.2f}" for v in load)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64x100,256x1000", help="comma-separated BxC")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(_memory_rows(args)))
        return
    device = torch.device(args.device)

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    seconds = {}
    for name, fn in LOSSES.items():
        for b, c in _sizes(args.sizes):
            seconds[f"{name}|{b}x{c}"] = measure_time(fn, b, c, device, args.repeats)
            print(f"{name} {b}x{c}: {seconds[f'{name}|{b}x{c}'] * 1e3:.2f} ms", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    memory = _memory_pass(args)

    rows = []
    for key, sec in seconds.items():
        name, size = key.split("|")
        mib = memory.get(key)
        mem = "n/a" if mib is None else f"{mib:.2f}"
        rows.append(f"| {name} | {size.replace('x', ' x ')} | {sec * 1e3:.2f} | {mem} |")
    table = [
        "| loss | B x C | forward+backward ms (median) | peak memory MiB |",
        "|---|---|---|---|",
        *rows,
    ]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    header = [
        "# Logit-loss benchmark (forward + backward)",
        "",
        "Generated by `benchmarks/bench_losses.py`; numbers are from the run below, not edited.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {machine()}",
        f"- device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- repeats: {args.repeats} timed calls after one warm-up; median reported",
        "- peak memory: growth of the peak resident set during one forward+backward, inputs"
        " already allocated, measured in a second process with MALLOC_MMAP_THRESHOLD_=4096"
        " (CPU; see the script's docstring) / growth of max_memory_allocated (CUDA)",
        f"- 1/5/15-min load average at the start of the timing {_fmt(load0)}, at its end"
        f" {_fmt(load)}; above nproc means other processes competed for the CPUs"
        if load
        else "- load average: n/a",
        "",
    ]
    report = "\n".join(header + table) + "\n"
    print()
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
