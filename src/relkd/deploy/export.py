"""A student that runs without relkd: ONNX export with the normalisation inside, checked by
ONNX Runtime against the torch model, optionally quantised to int8.

The exported graph takes ``image``: float32 ``[B, C, H, W]`` in ``[0, 1]`` (``B`` = 1, or any
with ``dynamic_batch``) and returns ``logits`` ``[B, num_classes]``; ``(x - mean) / std`` is
its first operation. The file's metadata (``metadata_props``) holds ``class_names`` (JSON),
``mean`` / ``std`` (JSON), ``input_size`` (``CxHxW``), ``input_range`` (``[0, 1]``),
``relkd_version``, ``exporter`` and ``architecture``.

After writing the file :func:`export_onnx` runs it with ONNX Runtime on the given images and
compares with the torch model: the largest absolute logit difference and the top-1 agreement
go into ``export.json`` beside the file. A difference above ``atol + rtol * max |logit|``
deletes the file and raises :class:`~relkd.RelkdError`.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export-based, PyTorch's default since 2.9);
where it fails, the TorchScript-based exporter (``dynamo=False``); ``export.json`` says which.
``int8``: ONNX Runtime's static post-training quantisation (QDQ, per-channel int8 weights,
uint8 activations, min-max calibration on training images).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd.deploy.profile import _logits, cpu_model, on_cpu_eval, parse_input
from relkd.registry import RelkdError

EXTRA_HINT = "pip install 'relkd[export]' (onnx, onnxruntime, onnxscript)"


def require_extra(what: str = "ONNX export") -> None:
    """One line saying what to install when the ``export`` extra is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise RelkdError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


class NormalizedModel(nn.Module):
    """``model`` behind its input normalisation: images in ``[0, 1]`` -> logits.

    ``x``: float ``[B, C, H, W]`` in ``[0, 1]``; returns ``model((x - mean) / std)``'s logits
    ``[B, num_classes]`` (a :class:`~relkd.models.ModelOutput` or tuple is reduced to them).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model((x - self.mean) / self.std))


# -------------------------------------------------------------------------------- exporting
_OP = re.compile(r"(aten[:.]{1,2}[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?|prim::[A-Za-z_0-9]+)")


def _operator(err: BaseException) -> str | None:
    """The operator an exporter names in its error, if any."""
    text = f"{err}\n{err.__cause__ or ''}"
    m = _OP.search(text)
    return m.group(1) if m else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress, warnings and (the TorchScript one, from C++) whole graphs;
    a CLI prints its own lines, so both streams go to a scratch file meanwhile."""
    import logging
    import sys
    import tempfile

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as sink:
        try:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    stream.flush()
                    fd = stream.fileno()
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            logger.setLevel(level)


def _export_file(
    wrapped: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None
) -> str:
    """Write ``path`` with the dynamo exporter, else the TorchScript one; returns which."""
    errors: list[BaseException] = []
    names = {"input_names": ["image"], "output_names": ["logits"]}
    try:
        with _quiet():
            dyn = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=True, opset_version=opset,
                dynamic_shapes=dyn, external_data=False, **names,
            )  # fmt: skip
        return "dynamo"
    except Exception as e:  # any exporter failure: try the other exporter
        errors.append(e)
    try:
        with _quiet():
            axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=False, opset_version=opset,
                dynamic_axes=axes, **names,
            )  # fmt: skip
        return "torchscript"
    except Exception as e:
        errors.append(e)
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    op = next((o for o in map(_operator, errors) if o), None)
    model_name = type(getattr(wrapped, "model", wrapped)).__name__
    first = str(errors[-1]).strip().splitlines()[0][:200] if str(errors[-1]).strip() else ""
    if op:
        raise RelkdError(
            f"cannot export {model_name} to ONNX: operator {op} is not supported by the dynamo "
            "or the TorchScript exporter" + (f" at opset {opset}" if opset else "")
        ) from errors[-1]
    raise RelkdError(
        f"cannot export {model_name} to ONNX (dynamo and TorchScript exporters both failed): "
        f"{type(errors[-1]).__name__}: {first}"
    ) from errors[-1]


def _set_metadata(path: Path, meta: dict[str, Any]) -> int:
    """Write ``meta`` into the file's ``metadata_props``; returns the file's ONNX opset."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(k), v if isinstance(v, str) else json.dumps(v)
    model.doc_string = "relkd student: float [0, 1] NCHW images in, logits out"
    onnx.save(model, str(path))
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file (JSON values decoded)."""
    require_extra("reading an ONNX file")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RelkdError(f"{str(path)!r} is not an ONNX file: {type(e).__name__}") from e
    out: dict[str, Any] = {}
    for entry in model.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out


# ------------------------------------------------------------------------------ running ORT
def ort_session(path: str | os.PathLike, threads: int | None = None):
    require_extra("running an ONNX file")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Logits of ``images`` (float [N, C, H, W] in [0, 1]) from an ORT session; a file with a
    fixed batch of 1 is fed one image at a time."""
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or batch
    outs = []
    for i in range(0, len(images), step):
        chunk = images[i : i + step].float().contiguous().numpy()
        if fixed and len(chunk) != fixed:  # the last, short chunk of a fixed-batch file
            outs += [sess.run(None, {inp.name: chunk[j : j + 1]})[0] for j in range(len(chunk))]
            continue
        outs.append(sess.run(None, {inp.name: chunk})[0])
    import numpy as np

    return torch.from_numpy(np.concatenate(outs, axis=0))


def ort_latency(sess, shape: Sequence[int], warmup: int = 5, repeats: int = 50) -> dict:
    """Median and quartiles (ms) of ``repeats`` batch-1 ORT calls after ``warmup``."""
    import numpy as np

    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append(1000.0 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=4)
    n = sess.get_session_options().intra_op_num_threads
    threads = f"{n} intra-op threads" if n else f"default intra-op threads, {os.cpu_count()} CPUs"
    return {"batch": 1, "median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2],
            "repeats": repeats, "warmup": warmup,
            "machine": f"{cpu_model()}, ONNX Runtime CPU, {threads}"}  # fmt: skip


def _topk_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(labels[:, None])
    ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="mean")
    n = max(1, len(labels))
    return {  # counts, not float32 means: 74.37, not 74.37000274658203
        "top1": 100.0 * int(hit[:, 0].sum()) / n,
        "top5": 100.0 * int(hit.any(dim=1).sum()) / n,
        "test_loss": float(ce),
        "images": len(labels),
    }


# ------------------------------------------------------------------------------- the export
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] | str = (3, 32, 32),
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    class_names: Sequence[str] | None = None,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    images_source: str | None = None,
    dynamic_batch: bool = False,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    int8: bool = False,
    calibration: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (taking ``(x - mean) / std`` of ``[B, C, H, W]`` images) to ONNX with
    the normalisation inside, check it with ONNX Runtime and return the ``export.json`` record
    (also written beside ``path``).

    Args:
        model: any ``nn.Module`` returning logits ``[B, K]`` (or a ``ModelOutput`` / tuple).
        input_shape: ``(C, H, W)`` or ``"CxHxW"``.
        mean, std: the normalisation the model expects (``C`` values, or 1).
        class_names: stored in the metadata (``K`` names).
        images: float ``[N, C, H, W]`` in ``[0, 1]`` to verify on (default: 64 random images);
            ``labels`` ``[N]``: also report the top-1 of torch and ONNX Runtime on them.
        images_source: what ``images`` are, for the record (e.g. ``"test split of cifar10"``).
        dynamic_batch: any batch size (default: a fixed batch of 1).
        opset: ONNX opset (default: the exporter's).
        atol, rtol: the check fails when ``max |logit_ort - logit_torch| > atol + rtol *
            max |logit_torch|``; the file is then deleted.
        int8: also write ``<stem>.int8.onnx`` (static quantisation calibrated on
            ``calibration``, float ``[M, C, H, W]`` in ``[0, 1]``); with ``labels`` both
            files' top-1 on ``images`` and both batch-1 latencies are recorded.
        metadata: more ``metadata_props`` entries.
        reference: the torch computation the file must reproduce, images in ``[0, 1]`` ->
            logits (default: ``model((x - mean) / std)``); a run's export passes the student
            fed as in training (data statistics, then its own re-normalisation hook).
    """
    require_extra()

    shape = parse_input(input_shape)
    out = Path(path)
    if out.suffix != ".onnx":
        raise RelkdError(f"ONNX output {str(out)!r} must end in .onnx")
    if int8 and calibration is None:
        raise RelkdError(
            "int8 quantisation needs calibration images (a few hundred training images)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with on_cpu_eval(model):
        return _export(
            model, out, shape, mean, std, class_names, images, labels, images_source,
            dynamic_batch, opset, atol, rtol, int8, calibration, metadata, reference,
        )  # fmt: skip


def _export(
    model, out, shape, mean, std, class_names, images, labels, images_source, dynamic_batch,
    opset, atol, rtol, int8, calibration, metadata, reference,
) -> dict[str, Any]:  # fmt: skip
    from relkd import __version__

    wrapped = NormalizedModel(model, mean, std).eval()
    if images is None:
        images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(0))
        images_source = images_source or "64 random images (uniform in [0, 1])"
    images = images.float()
    if tuple(images.shape[1:]) != shape:
        raise RelkdError(f"verification images are {tuple(images.shape[1:])}, the input {shape}")
    example = images[:2] if dynamic_batch else images[:1]
    tmp = out.with_name(f".{out.name}.tmp")
    exporter = _export_file(wrapped, example, tmp, dynamic_batch, opset)
    meta = {
        "relkd_version": __version__,
        "input_size": "x".join(map(str, shape)),
        "input_range": "[0, 1]",
        "input_layout": "NCHW float32",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "class_names": list(class_names) if class_names is not None else None,
        "exporter": exporter,
        "architecture": type(model).__name__,
        **(metadata or {}),
    }
    try:
        used_opset = _set_metadata(tmp, meta)
        sess = ort_session(tmp)
        got = ort_logits(sess, images)
        with torch.no_grad():
            ref = reference or wrapped
            want = torch.cat([ref(images[i : i + 64]) for i in range(0, len(images), 64)])
        diff = float((got - want).abs().max())
        limit = atol + rtol * float(want.abs().max())
        agree = float((got.argmax(1) == want.argmax(1)).float().mean())
        check = {
            "images": len(images),
            "source": images_source or "images passed from Python",
            "max_abs_logit_diff": diff,
            "top1_agreement": agree,
            "tolerance": limit,
            "runtime": "onnxruntime " + _ort_version() + " (CPUExecutionProvider)",
        }
        if labels is not None:
            check["torch_top1"] = _topk_stats(want, labels)["top1"]
            check["onnx_top1"] = _topk_stats(got, labels)["top1"]
        if not diff <= limit:
            raise RelkdError(
                f"export check failed: ONNX Runtime's logits differ from the torch model's by "
                f"{diff:.3g} (> tolerance {limit:.3g}) on {len(images)} images; no file written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    record: dict[str, Any] = {
        "file": out.name,
        "format": "onnx",
        "exporter": exporter,
        "opset": used_opset,
        "dynamic_batch": dynamic_batch,
        "input": [1 if not dynamic_batch else "batch", *shape],
        "metadata": meta,
        "verification": check,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if int8:
        try:
            record["int8"] = _quantize(out, shape, calibration, images, labels, sess)
        except RelkdError:
            raise
        except Exception as e:  # ORT's quantiser refused the graph: the fp32 file stays
            out.with_name(out.stem + ".int8.onnx").unlink(missing_ok=True)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RelkdError(
                f"int8 quantisation of {out.name} failed ({type(e).__name__}: {first}); the "
                f"fp32 file {str(out)!r} is written and checked"
            ) from e
    (out.parent / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class _Reader:
    """ORT's calibration data reader over float [M, C, H, W] images in [0, 1]."""

    def __init__(self, name: str, images: torch.Tensor, batch: int) -> None:
        self.name, self.images, self.batch, self.i = name, images, batch, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        x = self.images[self.i : self.i + self.batch].float().contiguous().numpy()
        self.i += self.batch
        return {self.name: x}

    def rewind(self) -> None:
        self.i = 0


def _quantize(
    fp32: Path,
    shape: tuple[int, int, int],
    calibration: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    fp32_sess,
) -> dict[str, Any]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(_Reader, CalibrationDataReader):
        pass

    dst = fp32.with_name(fp32.stem + ".int8.onnx")
    pre = fp32.with_name(f".{fp32.stem}.pre.onnx")
    inp = fp32_sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    try:
        with _quiet():
            try:  # shape inference + graph optimisation, as ORT recommends before quantising
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                src = pre
            except Exception:
                src = fp32
            quantize_static(
                str(src), str(dst), Reader(inp.name, calibration, fixed or 32),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
    finally:
        pre.unlink(missing_ok=True)
        for extra in fp32.parent.glob("augmented_model*.onnx"):
            extra.unlink(missing_ok=True)
    import onnx

    m = onnx.load(str(dst))
    del m.metadata_props[:]
    m.metadata_props.extend(onnx.load(str(fp32), load_external_data=False).metadata_props)
    entry = m.metadata_props.add()
    entry.key, entry.value = "quantization", "int8 static QDQ (onnxruntime), per-channel weights"
    onnx.save(m, str(dst))
    int8_sess = ort_session(dst)
    rec: dict[str, Any] = {
        "file": dst.name,
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 "
        "activations, min-max calibration",
        "calibration_images": len(calibration),
        "bytes_fp32": fp32.stat().st_size,
        "bytes_int8": dst.stat().st_size,
    }
    q = ort_logits(int8_sess, images)
    f = ort_logits(fp32_sess, images)
    rec["top1_agreement_with_fp32"] = float((q.argmax(1) == f.argmax(1)).float().mean())
    if labels is not None:
        rec["fp32_top1"] = _topk_stats(f, labels)["top1"]
        rec["int8_top1"] = _topk_stats(q, labels)["top1"]
        rec["eval_images"] = len(labels)
    rec["fp32_latency"] = ort_latency(fp32_sess, shape)
    rec["int8_latency"] = ort_latency(int8_sess, shape)
    return rec


# ----------------------------------------------------------------------------- a run folder
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
    from relkd.models.normalization import _HOOK_ATTR

    hook = getattr(student, _HOOK_ATTR, None)
    if hook is None:
        return list(mean), list(std)
    return list(hook[0].model[0]), list(hook[0].model[1])


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
    as training writes ``student.safetensors``. Returns the record (``export.json``)."""
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
        save_student(student, dst, metadata=meta)
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
    sess = ort_session(p)
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
    res = _topk_stats(torch.cat(logits), torch.cat(labels))
    res["file"] = str(p)
    return res
