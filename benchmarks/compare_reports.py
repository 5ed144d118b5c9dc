"""Compare two accuracy reports (``report.json`` of ``relkd report``): does a rerun land within
the recorded spread?

    python benchmarks/compare_reports.py RECORDED/report.json RERUN/report.json [--metric best]

Prints a markdown table per (method, teacher, student): both means +- sample std over seeds, the
largest per-seed difference, and whether the rerun's mean lies within the recorded mean +- 2 std
(``within 2 std``) and within the recorded [min, max] over seeds (``within range``). Exit status 1
when a group of the recorded report is missing from the rerun or a rerun mean falls outside
mean +- 2 std. ``--shared-only`` compares only the groups both reports hold (a partial rerun of
some methods), and says how many recorded groups it left out. ``--exact`` also fails unless
every seed both reports hold has the same top-1 (a seeded rerun on the same kind of machine
should reproduce it bit for bit; 2 std is the bar for other machines), and a rerun of only some
seeds (``--only '*/*/s0'``) is then checked seed by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _groups(path: Path) -> dict[tuple, dict]:
    data = json.loads(path.read_text())
    return {(g["method"], g["teacher"], g["student"]): g for g in data["groups"]}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def compare(
    recorded: Path,
    rerun: Path,
    metric: str = "best",
    shared_only: bool = False,
    exact: bool = False,
) -> tuple[str, bool]:
    """(markdown table, every group within 2 std; with ``exact``, also every shared seed
    equal)."""
    a, b = _groups(recorded), _groups(rerun)
    left_out = 0
    if shared_only:
        left_out = len(set(a) - set(b))
        a = {k: v for k, v in a.items() if k in b}
        if not a:
            return "no group is in both reports", False
    rows = [
        f"| method | recorded ({metric}) | rerun ({metric}) | max per-seed diff | "
        "within 2 std | within range |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for key, ga in a.items():
        gb = b.get(key)
        if gb is None:
            rows.append(f"| {key[0]} | - | missing | - | no | no |")
            ok = False
            continue
        xa, xb = ga[metric], gb[metric]
        ma, sa = _mean_std(xa)
        mb, sb = _mean_std(xb)
        seeds = {s: x for s, x in zip(ga["seeds"], xa)}
        diffs = [abs(x - seeds[s]) for s, x in zip(gb["seeds"], xb) if s in seeds]
        within = abs(mb - ma) <= 2 * sa + 1e-9
        in_range = min(xa) - 1e-9 <= mb <= max(xa) + 1e-9
        ok &= within
        if exact:
            ok &= bool(diffs) and max(diffs) <= 1e-9
        rows.append(
            f"| {key[0]} | {ma:.2f} ± {sa:.2f} | {mb:.2f} ± {sb:.2f} | "
            f"{max(diffs) if diffs else float('nan'):.2f} | {'yes' if within else 'NO'} | "
            f"{'yes' if in_range else 'no'} |"
        )
    if left_out:
        rows.append(f"\n({left_out} recorded group(s) not in the rerun, left out: --shared-only)")
    return "\n".join(rows), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recorded", type=Path)
    p.add_argument("rerun", type=Path)
    p.add_argument("--metric", choices=("best", "last"), default="best")
    p.add_argument("--shared-only", action="store_true", help="compare the groups both hold")
    p.add_argument("--exact", action="store_true", help="every shared seed must be equal")
    args = p.parse_args(argv)
    table, ok = compare(args.recorded, args.rerun, args.metric, args.shared_only, args.exact)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
