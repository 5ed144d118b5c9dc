"""Command-line entries of :mod:`relkd.bench`: ``relkd bench accuracy`` and ``relkd report``.

Wired into ``relkd`` by :func:`add_bench_parsers` (called from :func:`relkd.cli.build_parser`).
``bench`` is a group of subcommands so that more benchmarks (``bench speed``) can be added to the
group it returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from relkd.bench.accuracy import load_suite, run_suite
    from relkd.bench.report import write_report

    out = args.out or str(Path("runs") / "bench" / load_suite(args.suite).name)
    results = run_suite(
        args.suite,
        out,
        workers=args.workers,
        only=args.only,
        dry_run=args.dry_run,
        quiet=not args.verbose,
        overrides=args.overrides,
    )
    if args.dry_run:
        return 0
    failed = [r for r in results if r["status"] in ("failed", "incomplete")]
    if not args.no_report and any(r["status"] != "failed" for r in results):
        path = write_report(Path(out) / "runs", out)
        print(f"report: {path} (and {path.with_suffix('.html')})")
    if failed:
        print(f"{len(failed)} run(s) not finished: " + ", ".join(r["id"] for r in failed))
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from relkd.bench.report import write_report

    path = write_report(args.runs_dir, args.out)
    print(
        f"wrote {path}, {path.with_suffix('.html')}, {path.parent / 'accuracy.png'}, "
        f"{path.parent / 'curves.png'}"
    )
    return 0


def add_bench_parsers(subparsers) -> argparse._SubParsersAction:
    """Register ``bench {accuracy}`` and ``report`` on the ``relkd`` subparsers; returns the
    ``bench`` group so that other benchmarks can add their subcommand to it."""
    b = subparsers.add_parser("bench", help="benchmarks (accuracy suites, ...)")
    group = b.add_subparsers(dest="bench_cmd", required=True)

    a = group.add_parser(
        "accuracy",
        help="run or continue an accuracy suite (methods x pairs x seeds) and write its report",
        description="Run every run of a suite file (benchmarks/suites/*.yaml) that is not "
        "finished yet: finished runs are kept, interrupted ones resumed. Several processes may "
        "share one output folder (runs are claimed with lock files).",
    )
    a.add_argument("suite", help="suite YAML file, e.g. benchmarks/suites/fmnist-mini.yaml")
    a.add_argument(
        "overrides", nargs="*", help="key=value applied to every run, e.g. data.root=DIR"
    )
    a.add_argument("--out", default=None, help="output folder (default: runs/bench/<suite name>)")
    a.add_argument("--workers", type=int, default=1, help="processes (GPUs: round-robin)")
    a.add_argument("--only", default=None, help="glob(s) on run ids METHOD/TEACHER_STUDENT/sSEED")
    a.add_argument("--dry-run", action="store_true", help="validate and list the runs only")
    a.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    a.add_argument("--verbose", action="store_true", help="show each run's per-epoch output")
    a.set_defaults(fn=_cmd_accuracy)

    r = subparsers.add_parser(
        "report", help="tables (markdown, HTML) and plots from a folder of runs"
    )
    r.add_argument("runs_dir", help="a suite output folder, its runs/ folder, or any runs folder")
    r.add_argument("--out", default=None, help="output folder (default: next to the runs)")
    r.set_defaults(fn=_cmd_report)
    return group
