"""Command-line entries of :mod:`relkd.bench`: ``relkd bench accuracy``, ``relkd bench speed`` and ``relkd report``.

Wired into ``relkd`` by :func:`add_bench_parsers` (called from :func:`relkd.cli.build_parser`).
``bench`` is a group of subcommands so that more benchmarks (``bench speed``) can be added to the
group it returns.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from relkd.registry import RelkdError


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from relkd.bench.accuracy import load_suite, run_suite
    from relkd.bench.report import write_report

    out = args.out or str(Path("runs") / "bench" / load_suite(args.suite).name)
    if args.launcher == "slurm":
        return _accuracy_slurm(args, out)
    for flag, given in (("--slurm", args.slurm), ("--max-parallel", args.max_parallel),
                        ("--runs-per-task", args.runs_per_task), ("--wait", args.wait)):  # fmt: skip
        if given is not None and given is not False:  # the defaults; 0 is given too
            raise RelkdError(f"{flag} applies to --launcher slurm only (launcher: local)")
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


def _accuracy_slurm(args: argparse.Namespace, out: str) -> int:
    from relkd.bench.report import write_report
    from relkd.bench.slurm import submit
    from relkd.bench.status import format_status, wait_for

    if args.workers != 1:
        raise RelkdError("--workers applies to the local launcher; with --launcher slurm use "
                         "--max-parallel N (array tasks at once)")  # fmt: skip
    sub = submit(
        args.suite, out, overrides=args.overrides, slurm=args.slurm or [],
        max_parallel=args.max_parallel,
        runs_per_task=1 if args.runs_per_task is None else args.runs_per_task, only=args.only,
        dry_run=args.dry_run, report=not (args.wait or args.no_report),
    )  # fmt: skip
    for jid, why in sub.resubmitted.items():
        print(f"resubmitting {jid}: {why}")
    done = sum(v == "done" for v in sub.skipped.values())
    queued = {k: v for k, v in sub.skipped.items() if v != "done"}
    for jid, why in queued.items():
        print(f"left alone: {jid} ({why})")
    if args.dry_run:
        for s in sub.scripts:
            print(f"# ---- {s['path']} (would run: {s['command']})")
            print(s["text"], end="")
        print(f"dry run: {len(sub.scripts)} job(s) would be submitted; {done} finished before")
        return 0
    for s in sub.scripts:
        print(f"submitted {s['name']}: job {s['job_id']} ({s['path']})")
    print(f"{len(sub.scripts)} job(s) submitted, {done} finished before, {len(queued)} "
          f"queued or running; follow with: relkd bench status {out}")  # fmt: skip
    if not args.wait:
        return 0
    rows = wait_for(out, poll_s=float(os.environ.get("RELKD_SLURM_POLL_S") or 10))
    print(format_status(rows))
    failed = [r["id"] for r in rows if r["state"] != "done"]
    if not args.no_report and len(failed) < len(rows):
        path = write_report(Path(out) / "runs", out)
        print(f"report: {path} (and {path.with_suffix('.html')})")
    if failed:
        print(f"{len(failed)} run(s) not finished: " + ", ".join(failed))
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from relkd.bench.status import format_status, suite_status

    rows = suite_status(args.out)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_status(rows))
    return 0


def _cmd_task(args: argparse.Namespace) -> int:
    from relkd.bench.slurm import run_task

    ids = [i for item in args.job for i in item.split(",") if i.strip()]
    return run_task(args.suite, args.out, ids, overrides=args.overrides,
                    build_cache=args.build_cache, quiet=args.quiet)  # fmt: skip


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
    a.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: train here (--workers); slurm: submit the grid as Slurm jobs")  # fmt: skip
    a.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                   help="sbatch option for every job, e.g. partition=gpu gres=gpu:1 "
                   "time=08:00:00 account=NAME (repeatable; after the suite's slurm: section; "
                   "the report job gets only partition, account and qos)")  # fmt: skip
    a.add_argument("--max-parallel", type=int, default=None,
                   help="slurm: array tasks running at once (%%N)")  # fmt: skip
    a.add_argument("--runs-per-task", type=int, default=None,
                   help="slurm: runs per array task, one after the other (default 1)")  # fmt: skip
    a.add_argument("--wait", action="store_true",
                   help="slurm: block until every job is over, then write the report; exit 1 "
                   "naming the runs that did not finish")  # fmt: skip
    a.set_defaults(fn=_cmd_accuracy)

    st = group.add_parser(
        "status", help="state of every run of a suite output folder (done, running, ...)",
        description="done / running / pending / failed / cancelled (its job never started) / "
        "interrupted / new, the Slurm job id and the last epoch of every teacher and run, from "
        "the run folders and squeue. A folder that is not a suite's output folder is an error.",
    )  # fmt: skip
    st.add_argument("out", help="the suite's output folder (--out of relkd bench accuracy)")
    st.add_argument("--json", action="store_true", help="one JSON list")
    st.set_defaults(fn=_cmd_status)

    tk = group.add_parser(
        "task", help="(used by the Slurm batch scripts) run the given jobs of a suite's grid",
        description="Run exactly the listed grid jobs (teacher/NAME or run ids) of a suite in "
        "OUT, as relkd bench accuracy would; exit 75 when stopped by SIGUSR1 for requeueing.",
    )  # fmt: skip
    tk.add_argument("suite")
    tk.add_argument("overrides", nargs="*", help="key=value applied to every run")
    tk.add_argument("--out", required=True)
    tk.add_argument("--job", action="append", required=True, help="grid job id(s), comma list")
    tk.add_argument("--build-cache", action="store_true",
                    help="only build the teacher cache the first job reads")  # fmt: skip
    tk.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    tk.set_defaults(fn=_cmd_task)

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
