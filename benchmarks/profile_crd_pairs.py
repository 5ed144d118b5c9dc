"""`relkd profile` for the 13 teacher -> student pairs of the CRD table (CIFAR-100: 3x32x32 input,
100 classes): parameters, MACs, weights, peak activations and CPU latency at batch 1 and 64 of
each model, and the student / teacher factors. The run behind benchmarks/profile.md.

    python benchmarks/profile_crd_pairs.py --out benchmarks/results/profile/DATE
        [--threads 2] [--repeats 30] [--warmup 5] [--pairs resnet32x4:resnet8x4,...]
        [--no-latency]

Prints the date, the machine and the command, writes ``OUT.jsonl`` (one record per model, as
``relkd profile --json`` gives it) and ``OUT.md`` (the table). Run it on an otherwise idle
machine: anything else on the same cores distorts every latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from relkd.bench.reference import CRD_PAIRS
from relkd.deploy.profile import NOT_COUNTED, cpu_model, profile_model, ratios


def _ms(cost, batch: int) -> str:
    v = cost.latency_ms("cpu", batch)
    return "-" if v is None else f"{v:.2f}"


def render(rows: list[dict], header_lines: list[str]) -> str:
    """The markdown table of one run: a line per pair, teacher / student side by side."""
    lines = [*header_lines, ""]
    lines += [
        "| teacher → student | params T / S (M) | MACs T / S (M) | CPU ms b=1 T / S | "
        "CPU ms b=64 T / S | fewer params | fewer MACs | speed-up b=1 | speed-up b=64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s, x = r["teacher"], r["student"], r["ratios"]
        sp = {(v["batch"]): v["x"] for v in x["speedup"]}

        def lat(c: dict, b: int) -> str:
            v = next((e["median_ms"] for e in c["latency"] if e["batch"] == b), None)
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"| {t['name']} → {s['name']} | {t['params'] / 1e6:.2f} / {s['params'] / 1e6:.2f} | "
            f"{t['macs'] / 1e6:.1f} / {s['macs'] / 1e6:.1f} | {lat(t, 1)} / {lat(s, 1)} | "
            f"{lat(t, 64)} / {lat(s, 64)} | {x['params_x']:.1f}× | {x['macs_x']:.1f}× | "
            + " | ".join(f"{sp[b]:.1f}×" if b in sp else "-" for b in (1, 64))
            + " |"
        )
    lines += ["", f"Note: {NOT_COUNTED}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output prefix: OUT.jsonl and OUT.md")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pairs", default=None, help="teacher:student,... (default: all 13)")
    p.add_argument("--no-latency", action="store_true", help="counts only (a smoke run)")
    args = p.parse_args(argv)
    pairs = [tuple(x.split(":")) for x in args.pairs.split(",")] if args.pairs else list(CRD_PAIRS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    header = [
        "# `relkd profile` of the CRD pairs (CIFAR-100 input 3x32x32, 100 classes)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} torch threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}; load average "
        f"before: {load}",
        f"- command: python benchmarks/profile_crd_pairs.py {' '.join(argv or sys.argv[1:])}",
        f"- latency: median of {args.repeats} timed calls after {args.warmup} warm-up calls, "
        "eager, random input",
    ]
    print("\n".join(header), flush=True)
    rows, cache = [], {}
    kw = dict(
        num_classes=100, latency=not args.no_latency, batches=(1, 64), devices=["cpu"],
        threads=args.threads, repeats=args.repeats, warmup=args.warmup,
    )  # fmt: skip
    with open(out.with_suffix(".jsonl"), "w") as jl:
        for t_name, s_name in pairs:
            for name in (t_name, s_name):
                if name not in cache:
                    cache[name] = profile_model(name, (3, 32, 32), **kw)
                    jl.write(json.dumps(cache[name].to_dict()) + "\n")
                    jl.flush()
            t, s = cache[t_name], cache[s_name]
            rows.append({"teacher": t.to_dict(), "student": s.to_dict(), "ratios": ratios(s, t)})
            print(f"  {t_name} -> {s_name}: {_ms(t, 1)} / {_ms(s, 1)} ms at batch 1", flush=True)
    text = render(rows, header)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
