"""Command line: ``relkd train|configs|eval|probe|list|demo|bench|report|profile|export``.

User errors (:class:`relkd.registry.RelkdError`, bad configs, missing data) print one line and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from relkd._fs import json_safe
from relkd.registry import RelkdError

_KV = re.compile(r"^[A-Za-z_][\w.\-]*=")


def _cmd_train(args: argparse.Namespace) -> int:
    from relkd import distributed as D
    from relkd import train

    if args.print_config:
        return _print_config(args)
    from relkd.engine import preempt

    # SIGUSR1 (a scheduler's warning before a time limit): stop at a safe point, exit 75
    preempt.install()
    summary = train(
        args.config, overrides=args.overrides, resume=args.resume, quiet=args.quiet,
        allow_change=args.allow_change,
    )  # fmt: skip
    if D.is_main():  # under torchrun every rank returns the same summary; print it once
        print(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    if D.is_dist():
        import torch.distributed

        torch.distributed.destroy_process_group()
    return 0


def _print_config(args: argparse.Namespace) -> int:
    """The resolved config (file + overrides + defaults) and its run folder; trains nothing."""
    from relkd.config import load_config, to_yaml
    from relkd.engine.rundir import run_path
    from relkd.preflight import check_config
    from relkd.resources import resolve

    path = resolve(args.config)
    cfg = load_config(path, args.overrides)
    print(f"# config: {path}")
    print(to_yaml(cfg), end="")
    print(f"# run folder: {run_path(cfg)}", flush=True)
    check_config(cfg)  # after printing: the config is shown even when it cannot run yet
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from relkd.resources import copy_packaged, list_packaged, packaged, resolve

    what = args.configs_cmd or "list"
    if what == "list":
        names = list_packaged(getattr(args, "prefix", None) or "")
        if not names:
            raise RelkdError(f"no packaged config or suite under {args.prefix!r}")
        print("\n".join(names))
    elif what == "show":
        name = args.name.strip().removesuffix(".yaml")
        path = packaged().get(name) or resolve(name, suite=name.startswith("suites/"))
        print(path.read_text(), end="")
    elif what == "path":
        name = args.name.strip().removesuffix(".yaml")
        print(packaged().get(name) or resolve(name, suite=name.startswith("suites/")))
    else:
        for p in copy_packaged(args.name, args.dest):
            print(p)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from relkd.config import load_config
    from relkd.data import build_datasets
    from relkd.deploy.checks import flags_at_least
    from relkd.engine.build import model_kwargs, resolve_device
    from relkd.engine.evaluation import evaluate
    from relkd.engine.plan import build_loaders, plan_for_config
    from relkd.methods import MethodContext, build_method
    from relkd.models import create_model, load_checkpoint
    from relkd.progress import progress

    flags_at_least(args, {  # before anything is read, for a run folder and an ONNX file alike
        "batch_size": (1, "images per evaluation batch"),
        "test_subset": (1, "images of the stratified subset"),
        "image_size": (1, "the input's side in pixels"),
    })  # fmt: skip
    if args.run_dir is not None and str(args.run_dir).endswith(".onnx"):
        from relkd.deploy.cli import cmd_eval_onnx

        return cmd_eval_onnx(args)
    device = resolve_device(args.device, key="--device")  # before any data is read
    run_cfg = None
    if args.run_dir is not None:
        run = Path(args.run_dir)
        if not (run / "config.yaml").is_file():
            raise RelkdError(f"{str(run)!r} is not a run folder (it has no config.yaml)")
        cfg = run_cfg = load_config(run / "config.yaml")
        if args.checkpoint is None:
            names = ("student_best.pt",) if args.best else ("student.pt", "checkpoint.pt")
            found = [run / n for n in names if (run / n).is_file()]
            if not found:
                raise RelkdError(f"run folder {str(run)!r} holds no {' or '.join(names)}")
            args.checkpoint = str(found[0])
    else:
        missing = [f"--{k}" for k in ("model", "checkpoint", "data") if getattr(args, k) is None]
        if missing:
            raise RelkdError(f"give a run folder (relkd eval RUN_DIR) or {', '.join(missing)}")
        cfg = load_config({"student": {"name": args.model}, "data": {"name": args.data}})
    changes = {"student": {}, "data": {}}
    if args.model is not None and args.model != cfg.student.name:
        # Another model: the run's student weights / statistics do not describe it.
        changes["student"] = {"name": args.model, "kwargs": {}, "weights": None}
        changes["student"].update(mean=None, std=None)
    for key, value in (("name", args.data), ("root", args.root), ("image_size", args.image_size)):
        if value is not None:
            changes["data"][key] = value
    changes["data"]["eval_batch_size"] = args.batch_size
    from omegaconf import OmegaConf

    cfg = load_config(OmegaConf.merge(OmegaConf.structured(cfg), changes))
    val_split = _eval_split(args, cfg)
    _, test_ds, info = build_datasets(
        cfg.data.name, cfg.data.root, image_size=cfg.data.image_size, val_split=val_split,
        val_seed=cfg.data.val_seed, test_subset=args.test_subset,
    )  # fmt: skip
    kw = model_kwargs(cfg.student.name, cfg.student.kwargs, info.in_channels)
    # Built as relkd.engine.build.build_models builds the student (its weights set the
    # statistics a pretrained model declares), then the trained weights replace them.
    model = create_model(cfg.student.name, info.num_classes, weights=cfg.student.weights, **kw)
    load_checkpoint(model, args.checkpoint)
    # The model sees inputs normalised as in training, by the rule training uses for a teacher:
    # student.mean / student.std of the run's config, else the model's own (pretrained)
    # statistics, else those recorded with the checkpoint, else the data set's (no hook).
    from relkd.models.input_check import attach_trained_input_norm

    _, notes = attach_trained_input_norm(
        model, cfg.student.name, args.checkpoint, cfg.student.mean, cfg.student.std, info
    )
    for note in notes:
        print(f"relkd eval: note: {note}", file=sys.stderr)
    method, _ = build_method("ce", MethodContext(num_classes=info.num_classes))
    plan = plan_for_config(cfg, method, False, test_ds)
    _, test = build_loaders(plan, cfg, method, test_ds, test_ds, info, device)
    bar = progress(test, total=len(test), desc="eval", unit="batch", leave=False,
                   disable=args.no_progress)  # fmt: skip
    with torch.no_grad():
        res = evaluate(model.to(device), bar, device)
    bar.close()
    res["checkpoint"] = str(args.checkpoint)
    # What the numbers were measured on, beside them (a run's own top-1 may be on a subset).
    res["split"] = "validation" if val_split else "test"
    res["test_subset"] = args.test_subset
    res["images"] = len(test_ds)
    print(json.dumps(json_safe(res), indent=2, allow_nan=False))
    if run_cfg is not None and _differs_from_run(args, run_cfg):
        print(
            f"relkd eval: note: the run's own top-1 was measured on {_run_eval_text(run_cfg)}; "
            f"use {_run_eval_flags(run_cfg)} to reproduce it",
            file=sys.stderr,
        )
    return 0


def _eval_split(args: argparse.Namespace, cfg) -> float | None:
    """The validation fraction ``relkd eval --split val`` evaluates on (the run's own
    ``data.val_split`` / ``val_seed``), or None for the test split."""
    if args.split == "test":
        return None
    if not cfg.data.val_split:
        raise RelkdError(
            "--split val needs a run folder whose config sets data.val_split (the validation "
            "hold-out is part of the run's recipe); this one has none: use --split test"
        )
    return cfg.data.val_split


def _differs_from_run(args: argparse.Namespace, run_cfg) -> bool:
    """Whether this evaluation set differs from the one the run measured its own top-1 on."""
    want_val = bool(run_cfg.data.val_split)
    return (args.split == "val") != want_val or args.test_subset != run_cfg.data.test_subset


def _run_eval_text(cfg) -> str:
    split = "validation hold-out" if cfg.data.val_split else "test split"
    n = cfg.data.test_subset
    return f"a {n}-image subset of the {split}" if n else f"the whole {split}"


def _run_eval_flags(cfg) -> str:
    flags = ["--split val" if cfg.data.val_split else "--split test"]
    if cfg.data.test_subset:
        flags.append(f"--test-subset {cfg.data.test_subset}")
    return " ".join(flags)


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
        teacher_quiet=args.quiet,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from relkd._version import __version__

    p = argparse.ArgumentParser(prog="relkd", description="Relational knowledge distillation")
    p.add_argument("--version", action="version", version=f"relkd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser(
        "train",
        help="train a student (or a teacher with method=ce)",
        description="Train as a config says. CONFIG is a YAML file or a packaged config name "
        "(relkd configs list), e.g. cifar100/kd/resnet32x4_resnet8x4; key=value overrides and "
        "options may come in any order.",
    )
    t.add_argument("config", help="YAML config file or packaged config name")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=10")
    t.add_argument("--resume", action="store_true", help="continue the run in its run folder")
    t.add_argument(
        "--allow-change", action="append", default=[], metavar="KEY",
        help="with --resume: let config KEY (or a section, e.g. method.args) differ from the "
        "recorded config; the change is recorded in run.json (repeatable)",
    )  # fmt: skip
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    t.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config and its run folder, check it, and exit without training",
    )  # fmt: skip
    t.set_defaults(fn=_cmd_train)

    c = sub.add_parser(
        "configs",
        help="list, show or copy the packaged configs and suites",
        description="Configs and benchmark suites ship inside the package. `relkd train NAME` "
        "and `relkd bench accuracy NAME` take their names directly; copy one to edit it.",
    )
    c.set_defaults(fn=_cmd_configs, configs_cmd=None, prefix="")
    csub = c.add_subparsers(dest="configs_cmd", help="default: list")
    cl = csub.add_parser("list", help="packaged names (default command)")
    cl.add_argument("prefix", nargs="?", default="", help="only names under this, e.g. cifar100/kd")
    cs = csub.add_parser("show", help="print one packaged YAML")
    cs.add_argument("name", help="e.g. fashion_mnist/kd or suites/fmnist-mini")
    cp = csub.add_parser("path", help="the installed file of a packaged name")
    cp.add_argument("name", help="e.g. cifar100/kd/resnet32x4_resnet8x4")
    cc = csub.add_parser("copy", help="copy a packaged YAML (or a folder of them) to edit it")
    cc.add_argument("name", help="a name or a folder, e.g. cifar100/kd")
    cc.add_argument("dest", nargs="?", default=".", help="destination folder (default: .)")

    e = sub.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint on a data set's test split",
        description="Evaluate a run folder (its config.yaml names the model and data; its "
        "student.pt, else checkpoint.pt, holds the weights; its student.mean / student.std or "
        "the model's pretrained statistics normalise the inputs as in training) or any "
        "checkpoint with --model and --data. Prints JSON: top1, top5 (%), test_loss, checkpoint, "
        "split, test_subset and images (what the numbers were measured on).",
    )
    e.add_argument(
        "run_dir", nargs="?", default=None,
        help="a run folder written by relkd train, or an exported FILE.onnx (with --data)",
    )  # fmt: skip
    e.add_argument("--model", default=None, help="model name (default: the run's student)")
    e.add_argument(
        "--checkpoint", default=None,
        help="weights file: relkd's student*.pt / checkpoint.pt, .safetensors, RepDistiller or "
        "a bare state dict (default: the run's student.pt, else checkpoint.pt)",
    )  # fmt: skip
    e.add_argument("--best", action="store_true", help="the run's student_best.pt")
    e.add_argument("--data", default=None, help="data set name (default: the run's)")
    e.add_argument("--root", default=None, help="data folder (default: the run's / auto-detect)")
    e.add_argument("--image-size", type=int, default=None, help="input size (default: the run's)")
    e.add_argument(
        "--split", choices=["test", "val"], default="test",
        help="test: the data set's test split (default); val: the run's validation hold-out "
        "(its data.val_split and val_seed), where a run with data.val_split measured its top-1",
    )  # fmt: skip
    e.add_argument(
        "--test-subset", type=int, default=None, metavar="N",
        help="evaluate the same stratified N-image subset a run with data.test_subset=N used "
        "(default: every image of the split)",
    )  # fmt: skip
    e.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    d.add_argument("--verbose", action="store_true", help="per-epoch output of every run")
    d.add_argument("--quiet", action="store_true", help="no teacher progress either")
    d.set_defaults(fn=_cmd_demo)
    from relkd.bench.cli import add_bench_parsers

    add_bench_parsers(sub)
    from relkd.deploy.cli import add_deploy_parsers

    add_deploy_parsers(sub)
    _no_abbreviations(p)
    return p


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated options everywhere (argparse takes ``--resum`` for ``--resume`` and
    would take a future option's prefix for an old one): an option is spelled out or refused."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def _is_file(token: str) -> bool:
    """``Path.is_file`` that says no instead of raising (a token over 255 bytes, NUL bytes)."""
    try:
        return Path(token).is_file()
    except (OSError, ValueError):
        return False


#: Errors of the machine, not of relkd: a full or read-only disk, a missing permission, a name
#: the file system cannot hold. They end in one line naming the file, like a RelkdError.
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENAMETOOLONG", "ENOTDIR", "EISDIR")
    if hasattr(errno, n)
)


def _os_error_line(e: OSError) -> str:
    if e.strerror is None:  # relkd._fs.UnreadableFile: its message names the file
        return str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{e.strerror or e}{': ' + repr(where) if where else ''}"


def _place_positionals(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str], primary: str
) -> list[str]:
    """``key=value`` tokens anywhere on the line become overrides; the one other positional is
    the ``primary`` argument (config / suite). Returns the tokens that fit neither."""
    tokens = [getattr(args, primary), *args.overrides, *extra]
    plain = [t for t in tokens if not _KV.match(t) or _is_file(t)]
    if not plain:
        parser.error(f"no {primary} given, only key=value overrides")
    setattr(args, primary, plain[0])
    args.overrides = [t for t in tokens if t not in plain]
    return plain[1:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    primary = {"train": "config", "bench": "suite"}.get(args.cmd)
    if primary and hasattr(args, "overrides") and hasattr(args, primary):
        opts = [t for t in extra if t.startswith("-")]
        extra = opts + _place_positionals(
            parser, args, [t for t in extra if t not in opts], primary
        )
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "bench" and hasattr(args, "suite"):
            from relkd.resources import resolve

            args.suite = str(resolve(args.suite, suite=True))
        if args.cmd == "probe" and getattr(args, "config", None):
            from relkd.resources import resolve

            args.config = str(resolve(args.config))
        return int(args.fn(args) or 0)
    except RelkdError as e:
        print(f"relkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (engine.rundir)
        if code := getattr(e, "exit_code", None):  # a preemption request (engine.preempt)
            print(f"relkd: stopped for requeueing: {e}", file=sys.stderr)
            return int(code)
        print("relkd: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    except BrokenPipeError:  # `relkd configs list | head`
        sys.stderr.close()
        return 0
    except OSError as e:
        from relkd._fs import UnreadableFile

        if e.errno not in _ENVIRONMENT_ERRNOS and not isinstance(e, UnreadableFile):
            raise
        print(f"relkd: error: {_os_error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
