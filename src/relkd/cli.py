"""Command line: ``relkd train|eval|probe|list|demo|bench|report``.

User errors (:class:`relkd.registry.RelkdError`, bad configs, missing data) print one line and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from relkd.registry import RelkdError


def _cmd_train(args: argparse.Namespace) -> int:
    from relkd import distributed as D
    from relkd import train

    summary = train(
        args.config, overrides=args.overrides, resume=args.resume, quiet=args.quiet,
        allow_change=args.allow_change,
    )  # fmt: skip
    if D.is_main():  # under torchrun every rank returns the same summary; print it once
        print(json.dumps(summary, indent=2))
    if D.is_dist():
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from relkd.config import load_config
    from relkd.data import build_datasets
    from relkd.engine.trainer import _make_loaders, evaluate, resolve_device
    from relkd.methods import MethodContext, build_method
    from relkd.models import create_model, load_checkpoint

    _, test_ds, info = build_datasets(args.data, args.root, image_size=args.image_size)
    kw = {"in_chans": info.in_channels} if info.in_channels != 3 else {}
    model = create_model(args.model, info.num_classes, **kw)
    load_checkpoint(model, args.checkpoint)
    device = resolve_device(args.device)
    cfg = load_config(
        {
            "student": {"name": args.model},
            "data": {"name": args.data, "eval_batch_size": args.batch_size},
        }
    )
    method, _ = build_method("ce", MethodContext(num_classes=info.num_classes))
    _, test = _make_loaders(cfg, method, test_ds, test_ds, info, device)
    with torch.no_grad():
        res = evaluate(model.to(device), test, device)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from relkd import list_methods, list_models
    from relkd.data import DATASETS

    items = {"models": list_models, "methods": list_methods, "datasets": DATASETS.names}[
        args.what
    ]()
    print("\n".join(items))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from relkd.demo import run_demo

    run_demo(
        out_dir=args.out,
        seeds=args.seeds,
        methods=args.methods.split(",") if args.methods else None,
        root=args.root,
        student_epochs=args.epochs,
        quiet=not args.verbose,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relkd", description="Relational knowledge distillation")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a student (or a teacher with method=ce)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=10")
    t.add_argument("--resume", action="store_true", help="continue the run in its run folder")
    t.add_argument(
        "--allow-change", action="append", default=[], metavar="KEY",
        help="with --resume: let config KEY (or a section, e.g. method.args) differ from the "
        "recorded config; the change is recorded in run.json (repeatable)",
    )  # fmt: skip
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a data set's test split")
    e.add_argument("--model", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--root", default=None)
    e.add_argument("--image-size", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=_cmd_eval)

    from relkd.probe import add_probe_parser

    add_probe_parser(sub)

    ls = sub.add_parser("list", help="registered models, methods or data sets")
    ls.add_argument("what", choices=["models", "methods", "datasets"])
    ls.set_defaults(fn=_cmd_list)

    d = sub.add_parser("demo", help="distil on Fashion-MNIST on a CPU and print the comparison")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seeds", type=int, default=1)
    d.add_argument("--methods", default=None, help="comma separated; default: the demo set")
    d.add_argument("--root", default=None, help="Fashion-MNIST folder (default: auto-detect)")
    d.add_argument("--epochs", type=int, default=None, help="student epochs (default: demo's)")
    d.add_argument("--verbose", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    from relkd.bench.cli import add_bench_parsers

    add_bench_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except RelkdError as e:
        print(f"relkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (engine.rundir)
        print("relkd: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))


if __name__ == "__main__":
    sys.exit(main())
