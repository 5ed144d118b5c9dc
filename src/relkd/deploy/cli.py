"""``relkd profile`` and ``relkd export`` (and ``relkd eval FILE.onnx``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relkd.deploy.checks import flags_at_least
from relkd.registry import RelkdError


def _cmd_profile(args: argparse.Namespace) -> int:
    from relkd.deploy.profile import (
        format_profile,
        profile_json,
        profile_model,
        profile_run,
        ratios,
    )

    flags_at_least(args, {
        "num_classes": (1, "classes of the model's output"),
        "batch": (1, "the larger batch timed"),
        "threads": (1, "torch CPU threads"),
        "warmup": (0, "untimed calls first"),
        "repeats": (1, "timed calls"),
    })  # fmt: skip
    devices = {"auto": None, "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    if devices == ["cuda"]:
        import torch

        if not torch.cuda.is_available():
            raise RelkdError("--device cuda but CUDA is not available; use cpu or auto")
    kw = dict(
        latency=not args.no_latency, batches=sorted({1, args.batch}), devices=devices,
        compile=args.compile, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
    )  # fmt: skip
    target = Path(args.target)
    if target.is_dir() or (target / "config.yaml").is_file():
        if args.teacher or args.num_classes or args.input:
            raise RelkdError("a run folder brings its own models and input: drop --teacher, "
                             "--num-classes and --input")  # fmt: skip
        res = profile_run(target, **kw)
        costs = [c for c in (res["student"], res["teacher"]) if c is not None]
        ratio = res["ratios"]
    else:
        if args.num_classes is None:
            raise RelkdError(
                f"{args.target!r} is no run folder; to profile a model name give --num-classes "
                "N (and --input CxHxW, default 3x32x32)"
            )
        shape = args.input or "3x32x32"
        costs = [profile_model(args.target, shape, num_classes=args.num_classes, **kw)]
        if args.teacher:
            costs.append(profile_model(args.teacher, shape, num_classes=args.num_classes, **kw))
        ratio = ratios(costs[0], costs[1]) if len(costs) == 2 else None
    if args.json:
        print(json.dumps(profile_json(costs, ratio), indent=2))
    else:
        print(format_profile(costs, ratio))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from relkd.deploy.runs import export_run

    flags_at_least(args, {
        "opset": (1, "the ONNX opset version"),
        "verify_images": (1, "evaluation images the check runs on"),
        "calibration_images": (1, "training images that calibrate --int8"),
    })  # fmt: skip
    rec = export_run(
        args.run_dir, args.out, format=args.format, best=args.best,
        dynamic_batch=args.dynamic_batch, opset=args.opset, no_data=args.no_data,
        verify_images=args.verify_images, int8=args.int8,
        calibration_images=args.calibration_images,
    )  # fmt: skip
    if args.json:
        print(json.dumps(rec, indent=2))
        return 0
    if args.format == "safetensors":
        print(f"wrote {rec['file']} (safetensors, with the run's metadata)")
        return 0
    out = Path(args.out) if args.out else Path(args.run_dir) / rec["file"]
    v = rec["verification"]
    print(
        f"wrote {out} ({rec['exporter']} exporter, opset {rec['opset']}, "
        f"{'dynamic batch' if rec['dynamic_batch'] else 'batch 1'}; input float [0, 1] "
        f"{'x'.join(map(str, rec['input'][1:]))}, normalisation inside)"
    )
    line = (
        f"checked with {v['runtime']} on {v['source']}: max |logit diff| "
        f"{v['max_abs_logit_diff']:.2g} (tolerance {v['tolerance']:.2g}), top-1 agreement "
        f"{100 * v['top1_agreement']:.2f} %"
    )
    if "onnx_top1" in v:
        line += f", top-1 {v['onnx_top1']:.2f} (torch {v['torch_top1']:.2f})"
    print(line)
    q = rec.get("int8")
    if q:
        acc = (
            f"top-1 {q['int8_top1']:.2f} vs fp32 {q['fp32_top1']:.2f} on {q['eval_images']} images"
            if "int8_top1" in q
            else f"top-1 agreement with fp32 {100 * q['top1_agreement_with_fp32']:.2f} %"
        )
        fl, il = q["fp32_latency"], q["int8_latency"]
        print(
            f"int8: {out.with_name(q['file'])} (calibrated on {q['calibration_images']} "
            f"training images): {acc}; batch-1 latency fp32 {fl['median_ms']:.3f} ms, int8 "
            f"{il['median_ms']:.3f} ms ({il['machine']}); {q['bytes_fp32'] / 1024:.0f} KiB -> "
            f"{q['bytes_int8'] / 1024:.0f} KiB"
        )
    from relkd.deploy.export import record_path

    print(f"record: {record_path(out)}")
    return 0


def cmd_eval_onnx(args: argparse.Namespace) -> int:
    """``relkd eval FILE.onnx --data NAME [--root DIR]``."""
    from relkd.deploy.runs import eval_onnx

    if args.data is None:
        raise RelkdError("evaluating an ONNX file needs --data NAME (and --root DIR)")
    if args.model or args.checkpoint or args.best:
        raise RelkdError(
            "an ONNX file holds its model and weights: drop --model/--checkpoint/--best"
        )
    # Flags of the run-folder path that this path does not apply: refused, never ignored.
    ignored = [
        flag
        for flag, given in (
            ("--split val", getattr(args, "split", "test") != "test"),
            ("--test-subset", getattr(args, "test_subset", None) is not None),
            ("--device", getattr(args, "device", "auto") != "auto"),
        )
        if given
    ]
    if ignored:
        raise RelkdError(
            f"{', '.join(ignored)}: not supported for an ONNX file (it is evaluated on the whole "
            "test split of --data with ONNX Runtime on the CPU); evaluate the run folder for a "
            "run's own split or subset"
        )
    res = eval_onnx(
        args.run_dir, args.data, args.root, image_size=args.image_size,
        batch_size=args.batch_size,
    )  # fmt: skip
    print(json.dumps(res, indent=2))
    return 0


def add_deploy_parsers(sub) -> None:
    """Register ``profile`` and ``export`` on the ``relkd`` subparsers."""
    p = sub.add_parser(
        "profile",
        help="parameters, MACs, weight size, activation memory and latency of models",
        description="What a model costs. TARGET is a run folder (its student and teacher, with "
        "the ratios) or a model name (zoo, torchvision:NAME, timm:NAME) with --num-classes. "
        "MACs: one batch-1 forward, matmul/conv/attention products (FLOPs/2 of "
        "torch.utils.flop_counter); bias, norm layers, activations, pooling and residual sums "
        "are not counted. Latency: median and quartiles of timed calls after a warm-up.",
    )
    p.add_argument("target", help="a run folder or a model name")
    p.add_argument("--teacher", default=None, help="a second model name to compare with")
    p.add_argument("--num-classes", type=int, default=None, help="classes (model names only)")
    p.add_argument("--input", default=None, help="CxHxW for model names (default 3x32x32)")
    p.add_argument("--batch", type=int, default=64, help="the larger batch timed (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to time (auto: the CPU, and CUDA when present)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while timing")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls (default 30)")
    p.add_argument("--no-latency", action="store_true", help="counts only, no timing")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(fn=_cmd_profile)

    e = sub.add_parser(
        "export",
        help="export a run's student to ONNX (checked by ONNX Runtime) or safetensors",
        description="Write the student as an ONNX file that takes float images in [0, 1] "
        "(NCHW, the run's channels and size) and returns logits, its normalisation inside and "
        "class names, mean/std, input size and relkd version in the metadata. ONNX Runtime "
        "runs the file against the torch student on the run's evaluation images (random with "
        "--no-data); <stem>.export.json beside the file (student.export.json) records the largest "
        "logit difference and the top-1 agreement; beyond tolerance nothing is written. Needs: "
        "pip install "
        "'relkd[export]'.",
    )
    e.add_argument("run_dir", help="a run folder written by relkd train")
    e.add_argument("--format", choices=["onnx", "safetensors"], default="onnx")
    e.add_argument("--out", default=None, help="output file (default: RUN_DIR/student.onnx)")
    e.add_argument("--best", action="store_true", help="the run's student_best.pt")
    e.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: 1)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: exporter's)")
    e.add_argument("--no-data", action="store_true", help="verify on random images")
    e.add_argument("--verify-images", type=int, default=512,
                   help="evaluation images the check runs on (default 512)")  # fmt: skip
    e.add_argument("--int8", action="store_true",
                   help="also write an int8 file (ONNX Runtime static quantisation) and report "
                   "its top-1 on the evaluation split and latency next to fp32's")  # fmt: skip
    e.add_argument("--calibration-images", type=int, default=256,
                   help="training images that calibrate --int8 (default 256)")  # fmt: skip
    e.add_argument("--json", action="store_true", help="print the record (<stem>.export.json)")
    e.set_defaults(fn=_cmd_export)
