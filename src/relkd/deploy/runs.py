"""A run folder's student exported (:func:`export_run`) and an exported file evaluated on a data
set (:func:`eval_onnx`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd.deploy.export import NormalizedModel, export_onnx
from relkd.deploy.ort import ort_logits, ort_session, read_metadata, require_extra, topk_stats
from relkd.registry import RelkdError


def _eval_images(cfg: Any, meta: dict[str, Any], limit: int | None, calibration: int = 0):
    """The run's evaluation split as float [N, C, H, W] in [0, 1] with labels, its class names,
    and ``calibration`` training images (un-augmented, a fixed random choice)."""
    from relkd.data import build_datasets

    d = cfg.data
    train, test, info = build_datasets(
        d.name, d.root, augment=False, image_size=d.image_size, val_split=d.val_split,
        val_seed=d.val_seed, test_subset=d.test_subset,
    )  # fmt: skip
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)

    def take(ds, idx) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*((ds[int(i)][0], int(ds[int(i)][1])) for i in idx))
        return (torch.stack(xs) * std + mean).clamp(0, 1), torch.tensor(ys)

    n = len(test) if limit is None else min(limit, len(test))
    x, y = take(test, range(n))
    cal = None
    if calibration:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(train), generator=g)[: min(calibration, len(train))]
        cal = take(train, idx.tolist())[0]
    split = "validation hold-out" if d.val_split else "test split"
    return x, y, info, cal, f"{n} images of the {split} of {d.name}"


def _effective_norm(student: nn.Module, mean, std) -> tuple[list[float], list[float]]:
    """The statistics the student really sees (its own, when a hook re-normalises)."""
    import json

    from relkd.models.normalization import input_norm_fingerprint

    fp = input_norm_fingerprint(student)  # JSON of both pairs; "" when there is no hook
    if not fp:
        return list(mean), list(std)
    own = json.loads(fp)
    return list(own["mean"]), list(own["std"])


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    format: str = "onnx",
    best: bool = False,
    dynamic_batch: bool = False,
    opset: int | None = None,
    no_data: bool = False,
    verify_images: int = 512,
    int8: bool = False,
    calibration_images: int = 256,
) -> dict[str, Any]:
    """Export a run folder's student (``student.pt``; ``student_best.pt`` with ``best``).

    ``format="onnx"``: :func:`export_onnx` checked on ``verify_images`` images of the run's
    evaluation split (random images with ``no_data``), default file ``RUN/student.onnx``;
    ``int8`` adds the quantised file, its top-1 on the whole evaluation split next to the fp32
    file's, and both latencies. ``format="safetensors"``: the weights with the run's metadata,
    as training writes ``student.safetensors``. Returns the record (ONNX: also written as
    ``<stem>.export.json`` beside the file)."""
    from relkd.deploy.profile import run_models
    from relkd.models.normalization import attach_input_norm

    if format not in ("onnx", "safetensors"):
        raise RelkdError(f"--format {format!r}: choose onnx or safetensors")
    run = Path(run_dir)
    student, _, info = run_models(run, weights=True, best=best)
    meta, cfg = dict(info["meta"]), info["cfg"]
    stem = "student_best" if best else "student"
    if format == "safetensors":
        from relkd.models import save_student

        onnx_only = {"--int8": int8, "--dynamic-batch": dynamic_batch, "--opset": opset,
                     "--no-data": no_data}  # fmt: skip
        if any(onnx_only.values()):
            used = ", ".join(k for k, v in onnx_only.items() if v)
            raise RelkdError(f"{used}: ONNX options; --format safetensors writes the weights only")

        dst = Path(out) if out is not None else run / f"{stem}.safetensors"
        if dst.suffix != ".safetensors":
            raise RelkdError(f"safetensors output {str(dst)!r} must end in .safetensors")
        try:
            save_student(student, dst, metadata=meta)
        except OSError as e:  # a read-only folder, a full disk: not a problem of the model
            from relkd.deploy.export import write_error

            raise write_error(dst, e) from e
        return {"file": str(dst), "format": "safetensors", "metadata": meta}
    require_extra()
    if int8 and no_data:
        raise RelkdError("--int8 calibrates on the run's training images: drop --no-data")
    import copy

    attach_input_norm(student, meta["mean"], meta["std"], cfg.student.mean, cfg.student.std)
    # The check's reference: the student exactly as training fed it (data statistics, then its
    # own re-normalisation hook, if any); the file folds both into one (x - mean) / std.
    trained = NormalizedModel(copy.deepcopy(student), meta["mean"], meta["std"]).eval()
    mean, std = _effective_norm(student, meta["mean"], meta["std"])
    attach_input_norm(student, mean, std, mean, std)  # the wrapper normalises: no hook
    shape = info["input_shape"]
    classes, images, labels, cal, source = None, None, None, None, None
    if not no_data:
        x, y, dinfo, cal, source = _eval_images(
            cfg, meta, None if int8 else verify_images, calibration_images if int8 else 0
        )
        classes = dinfo.classes
        if tuple(x.shape[1:]) != tuple(shape):
            raise RelkdError(
                f"the run's data gives {tuple(x.shape[1:])} images, its student {shape}"
            )
        images, labels = x, y
    dst = Path(out) if out is not None else run / f"{stem}.onnx"
    extra = {"dataset": meta.get("dataset"), "run": run.resolve().name, "weights": f"{stem}.pt",
             "architecture": info["student_name"]}  # fmt: skip
    return export_onnx(
        student, dst, input_shape=shape, mean=mean, std=std, class_names=classes,
        images=images, labels=labels, images_source=source, dynamic_batch=dynamic_batch,
        opset=opset, int8=int8, calibration=cal, metadata=extra, reference=trained,
    )  # fmt: skip


def eval_onnx(
    path: str | os.PathLike,
    data: str,
    root: str | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 (%) and mean CE of an exported ONNX file on data set ``data``'s test split
    (images un-normalised to ``[0, 1]``, the file normalises them itself)."""
    from relkd.data import build_datasets

    p = Path(path)
    if not p.is_file():
        raise RelkdError(f"ONNX file {str(p)!r} does not exist")
    meta = read_metadata(p)
    size = image_size
    if size is None and isinstance(meta.get("input_size"), str):
        size = int(meta["input_size"].split("x")[-1])
    _, test, info = build_datasets(data, root, augment=False, image_size=size)
    sess = ort_session(p, user_file=True)
    want = sess.get_inputs()[0].shape
    if isinstance(want[1], int) and want[1] != info.in_channels:
        raise RelkdError(
            f"{p.name} takes {want[1]}-channel images, data set {data!r} has {info.in_channels}"
        )
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False)
    logits, labels = [], []
    for x, y, *_ in loader:
        logits.append(ort_logits(sess, (x * std + mean).clamp(0, 1), batch_size))
        labels.append(torch.as_tensor(y))
    res = topk_stats(torch.cat(logits), torch.cat(labels))
    res.update(split="test", file=str(p))
    return res
