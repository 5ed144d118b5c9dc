"""Apply the validation study's decision rule (``cifar10jpg-val-study.yaml``) to its report.

    python benchmarks/decide_variants.py STUDY/report.json [--metric last]

The rule, fixed in the suite's header before the study ran: for each method, a variant replaces
the default only if, on last-epoch validation top-1,
  (a) it beats the default on each seed (paired by seed: a seed fixes the student's
      initialisation and data order for both), and
  (b) its mean exceeds the default's by more than twice the larger of the two sample standard
      deviations.
Otherwise the default stays ("no clear difference"). Where more than one variant of a method
passes, the one with the highest mean is chosen (written down here on 2026-12-01, before any
CLKD / CMKD / RRD run of the study had finished).

Variants are the report's groups named ``<method>-<variant>`` (``clkd-ce1``); the default of each
method is a group given by ``--default METHOD=GROUP`` (the study's: clkd-default, cmkd-default,
rrd-v4). Prints one markdown table per method and the decision; a method whose default is
missing, has fewer than 3 seeds, or has a variant with other seeds gets no decision, and the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

STUDY_DEFAULTS = {"clkd": "clkd-default", "cmkd": "cmkd-default", "rrd": "rrd-v4"}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value), as the report computes them."""
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def judge(default: dict[int, float], variant: dict[int, float]) -> dict:
    """The rule for one variant against its default; both map seed -> top-1 (%)."""
    seeds = sorted(default)
    if sorted(variant) != seeds or len(seeds) < 2:
        raise ValueError(f"seeds differ or too few: default {seeds}, variant {sorted(variant)}")
    md, sd = _mean_std([default[s] for s in seeds])
    mv, sv = _mean_std([variant[s] for s in seeds])
    wins = sum(variant[s] > default[s] for s in seeds)
    every_seed = wins == len(seeds)
    margin = 2 * max(sd, sv)
    beyond = (mv - md) > margin
    return {
        "mean": mv,
        "std": sv,
        "diff": mv - md,
        "margin": margin,
        "wins": wins,
        "seeds": len(seeds),
        "every_seed": every_seed,
        "beyond_spread": beyond,
        "passes": every_seed and beyond,
    }


def decide(
    report: Path,
    defaults: dict[str, str] | None = None,
    metric: str = "last",
    min_seeds: int = 3,
) -> tuple[str, dict[str, str], bool]:
    """(markdown, {method: chosen group}, every group the rule needs was complete). A method
    whose default has fewer than ``min_seeds`` seeds, or a variant other seeds than its default,
    gets no decision. Variants not yet in the report are not seen: decide on the finished study."""
    defaults = dict(STUDY_DEFAULTS if defaults is None else defaults)
    data = json.loads(Path(report).read_text())
    by_name = {g["method"]: dict(zip(g["seeds"], g[metric], strict=True)) for g in data["groups"]}
    ce = _mean_std(list(by_name["ce"].values()))[0] if "ce" in by_name else None
    out, chosen, complete = [], {}, True
    for method, dname in defaults.items():
        out.append(f"## {method} (default: {dname}; {metric}-epoch top-1 %)\n")
        if dname not in by_name:
            out.append(f"default group {dname!r} missing from the report\n")
            complete = False
            continue
        base = by_name[dname]
        mb, sb = _mean_std(list(base.values()))
        out.append(
            "| group | mean ± std | Δ vs default | 2 × larger std | seeds won | passes | Δ vs CE |"
        )
        out.append("|---|---|---|---|---|---|---|")
        vs_ce = f"{mb - ce:+.2f}" if ce is not None else ""
        out.append(f"| {dname} (default) | {mb:.2f} ± {sb:.2f} | | | | | {vs_ce} |")
        passing, broken = [], len(base) < min_seeds
        for name in sorted(n for n in by_name if n.startswith(method + "-") and n != dname):
            try:
                j = judge(base, by_name[name])
            except ValueError as e:
                out.append(f"| {name} | {e} | | | | | |")
                broken = True
                continue
            vs_ce = f"{j['mean'] - ce:+.2f}" if ce is not None else ""
            out.append(
                f"| {name} | {j['mean']:.2f} ± {j['std']:.2f} | {j['diff']:+.2f} | "
                f"{j['margin']:.2f} | {j['wins']}/{j['seeds']} | "
                f"{'yes' if j['passes'] else 'no'} | {vs_ce} |"
            )
            if j["passes"]:
                passing.append((j["mean"], name))
        if broken:
            complete = False
            out.append(f"\nDecision: **none yet** (a group has fewer than {min_seeds} seeds)\n")
            continue
        chosen[method] = max(passing)[1] if passing else dname
        verdict = (
            f"**{chosen[method]} replaces {dname}**"
            if passing
            else f"**{dname} stays** (no clear difference)"
        )
        out.append(f"\nDecision: {verdict}\n")
    return "\n".join(out), chosen, complete


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("--metric", choices=["last", "best"], default="last")
    p.add_argument(
        "--default",
        action="append",
        default=None,
        metavar="METHOD=GROUP",
        help="the default group of a method (repeatable); the study's when omitted",
    )
    args = p.parse_args(argv)
    if not args.report.is_file():
        p.error(f"report {str(args.report)!r} not found (the study's OUT/report.json)")
    defaults = None
    if args.default:
        defaults = {}
        for item in args.default:
            method, sep, group = item.partition("=")
            if not sep or not method or not group:
                p.error(f"--default {item!r}: expected METHOD=GROUP, e.g. clkd=clkd-default")
            defaults[method] = group
    text, _, complete = decide(args.report, defaults, args.metric)
    print(text)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
