"""Command-line entries of :mod:`relkd.bench`: ``relkd bench accuracy``, ``relkd bench speed`` and ``relkd report``.

Wired into ``relkd`` by :func:`add_bench_parsers` (called from :func:`relkd.cli.build_parser`).
``bench`` is a group of subcommands so that more benchmarks (``bench speed``) can be added to the
group it returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from relkd.registry import RelkdError


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
    from relkd.bench.report_json import write_report_from_json

    cost = {"cost": not args.no_cost, "latency": not args.no_latency, "threads": args.threads}
    if args.from_json:
        if args.runs_dir is not None or args.out is None:
            raise RelkdError("--from-json REPORT.json takes no runs folder and needs --out DIR")
        path = write_report_from_json(
            args.from_json, args.out, input_shape=args.input, num_classes=args.num_classes, **cost
        )
    elif args.runs_dir is None:
        raise RelkdError("give a runs folder (relkd report RUNS_DIR) or --from-json REPORT.json")
    else:
        path = write_report(
            args.runs_dir, args.out, evaluate_teachers=not args.no_teacher_eval, **cost
        )
    pngs = [p for p in ("accuracy.png", "curves.png", "cost.png") if (path.parent / p).is_file()]
    print(
        f"wrote {path}, {path.with_suffix('.html')}, "
        + ", ".join(str(path.parent / p) for p in pngs)
    )
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    import json

    from relkd.bench.speed import format_ratios, format_table, run_speed, speed_ratios

    def both(value: str) -> list[bool]:
        return {"off": [False], "on": [True], "both": [False, True]}[value]

    def show(rec: dict) -> None:
        if args.json:
            print(json.dumps(rec), flush=True)
        elif rec["status"] == "ok":
            extra = f" workers={rec['workers']}" if rec["workers"] is not None else ""
            print(
                f"{rec['config']:16s} {rec['method'] or '':8s} {rec['precision'] or '':5s}"
                f"{' cl' if rec['channels_last'] else ''}{' compile' if rec['compile'] else ''}"
                f"{extra}: {rec['step_ms_median']:.2f} ms/step (mean {rec['step_ms_mean']:.2f}), "
                f"{rec['images_per_s']:.0f} images/s, peak {rec['peak_mem_mb']:.1f} MiB"
                + (f" ({rec['file_mem_mb']:.0f} file-backed)" if rec["file_mem_mb"] else ""),
                flush=True,
            )
        else:
            print(f"{rec['config']:16s} {rec['method'] or '':8s} skipped: {rec['reason']}")

    records = run_speed(
        args.teacher,
        args.student,
        args.method or ["ce", "kd"],
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        precisions=args.precision,
        channels_last=both(args.channels_last),
        compile=both(args.compile),
        image_size=args.image_size,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        threads=args.threads,
        num_train_samples=args.num_train_samples,
        data=not args.no_data,
        data_workers=[int(w) for w in args.data_workers.split(",") if w.strip()],
        cache_budget_mb=args.cache_budget_mb,
        cache_dtype=args.cache_dtype,
        rounds=args.rounds,
        cache_variants=args.cache_variants,
        on_record=show,
    )
    if not args.json:
        print()
        print(format_table(records))
        ratios = speed_ratios(records)
        if ratios:
            print()
            print(format_ratios(ratios))
    return 0


def add_bench_parsers(subparsers) -> argparse._SubParsersAction:
    """Register ``bench {accuracy,speed}`` and ``report`` on the ``relkd`` subparsers; returns the
    ``bench`` group so that other benchmarks can add their subcommand to it."""
    b = subparsers.add_parser("bench", help="benchmarks (accuracy suites, ...)")
    group = b.add_subparsers(dest="bench_cmd", required=True)

    a = group.add_parser(
        "accuracy",
        help="run or continue an accuracy suite (methods x pairs x seeds) and write its report",
        description="Run every run of a suite file (benchmarks/suites/*.yaml) that is not "
        "finished yet: finished runs are kept, interrupted ones resumed. Several processes may "
        "share one output folder (runs are claimed with lock files). After each run a line "
        "'[ k/N] finished; ETA ...' estimates the time left from the mean wall time of the "
        "runs finished so far by this call.",
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

    s = group.add_parser(
        "speed",
        help="images/s and peak memory of a training step per method (synthetic data)",
        description="Time the engine's training step for a teacher/student pair on synthetic "
        "data: teacher forward, student CE step, online and cached-teacher step per method, "
        "and the data pipelines (InMemoryLoader vs DataLoader). Warm-up steps are excluded; "
        "images/s = batch / median step time.",
    )
    s.add_argument("--teacher", required=True, help="teacher model, e.g. resnet32x4")
    s.add_argument("--student", required=True, help="student model, e.g. resnet8x4")
    s.add_argument(
        "--method", action="append", default=None,
        help="method(s), repeatable or comma separated (default: ce,kd)",
    )  # fmt: skip
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--steps", type=int, default=20, help="measured steps per configuration")
    s.add_argument("--warmup", type=int, default=5, help="excluded warm-up steps")
    s.add_argument("--rounds", type=int, default=5,
                   help="interleave the configurations' timed steps in this many rounds")  # fmt: skip
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--precision", default="fp32", help="comma list of fp32, bf16, fp16")
    for flag in ("--channels-last", "--compile"):
        s.add_argument(
            flag, nargs="?", const="both", default="off", choices=["off", "on", "both"],
            help="off (default), on, or both (bare flag: measure without and with)",
        )  # fmt: skip
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--in-chans", type=int, default=3, help="image channels (1: grey)")
    s.add_argument("--num-classes", type=int, default=100)
    s.add_argument("--num-train-samples", type=int, default=50000,
                   help="training-set size N (memory banks, teacher cache, data pipelines)")  # fmt: skip
    s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    s.add_argument("--no-data", action="store_true", help="skip the data pipeline measurements")
    s.add_argument("--data-workers", default="0,2", help="DataLoader worker counts (comma list)")
    s.add_argument("--cache-dtype", default="fp16", choices=["fp16", "fp32"],
                   help="storage dtype of the teacher cache of the cached step")  # fmt: skip
    s.add_argument("--cache-budget-mb", type=float, default=8192.0,
                   help="largest teacher cache to write for the cached step (MiB)")  # fmt: skip
    s.add_argument("--cache-variants", default="engine,preloaded",
                   help="cached steps: engine (opened as the engine does), preloaded (in memory), cold (memory-mapped, pages evicted before every step; CPU)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="one JSON object per configuration")
    s.set_defaults(fn=_cmd_speed)

    r = subparsers.add_parser(
        "report", help="tables (markdown, HTML) and plots from a folder of runs"
    )
    r.add_argument(
        "runs_dir", nargs="?", default=None,
        help="a suite output folder, its runs/ folder, or any runs folder",
    )  # fmt: skip
    r.add_argument("--out", default=None, help="output folder (default: next to the runs)")
    r.add_argument(
        "--no-teacher-eval", action="store_true",
        help="do not evaluate teacher checkpoints whose top-1 is recorded nowhere",
    )  # fmt: skip
    r.add_argument(
        "--from-json", default=None, metavar="REPORT_JSON",
        help="re-render a report from its report.json alone (run folders not needed), with "
        "the models' cost measured now; needs --out",
    )  # fmt: skip
    r.add_argument("--no-cost", action="store_true", help="no cost table / plot (accuracy only)")
    r.add_argument("--no-latency", action="store_true", help="cost without timing the models")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads for the timing")
    r.add_argument("--input", default=None, help="with --from-json: the models' CxHxW where "
                   "the data set's name does not tell it")  # fmt: skip
    r.add_argument("--num-classes", type=int, default=None, help="with --from-json: classes")
    r.set_defaults(fn=_cmd_report)
    return group
