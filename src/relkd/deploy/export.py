"""A student that runs without relkd: ONNX export with the normalisation inside, checked by
ONNX Runtime against the torch model, optionally quantised to int8.

The exported graph takes ``image``: float32 ``[B, C, H, W]`` in ``[0, 1]`` (``B`` = 1, or any
with ``dynamic_batch``) and returns ``logits`` ``[B, num_classes]``; ``(x - mean) / std`` is
its first operation. The file's metadata (``metadata_props``) holds ``class_names`` (JSON),
``mean`` / ``std`` (JSON), ``input_size`` (``CxHxW``), ``input_range`` (``[0, 1]``),
``relkd_version``, ``exporter`` and ``architecture``.

:func:`export_onnx` builds the file in a temporary folder, runs it with ONNX Runtime on the
given images and compares with the torch model: the largest absolute logit difference and the
top-1 agreement go into the file's record ``<stem>.export.json`` beside it (``student.onnx`` ->
``student.export.json``: each export into a folder keeps its own record). A difference above
``atol + rtol * max |logit|`` raises :class:`~relkd.RelkdError` and writes nothing. Only a
checked file is copied to its destination, atomically (a temporary name beside it, then a
rename); a failure to write there (a read-only folder, a full disk) is one line naming the path
and the reason, and leaves nothing half-written.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export-based, PyTorch's default since 2.9);
where it fails, the TorchScript-based exporter (``dynamo=False``); the record says which.
``int8``: ONNX Runtime's static post-training quantisation (QDQ, per-channel int8 weights,
uint8 activations, min-max calibration on training images).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd.deploy.int8 import quantize
from relkd.deploy.ort import (
    ort_logits,
    ort_session,
    ort_version,
    quiet,
    require_extra,
    topk_stats,
)
from relkd.deploy.profile import _logits, on_cpu_eval, parse_input
from relkd.registry import RelkdError


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


def record_path(onnx_file: str | os.PathLike) -> Path:
    """The record of an exported file: ``<stem>.export.json`` beside it."""
    p = Path(onnx_file)
    return p.with_name(p.stem + ".export.json")


def _os_error(err: BaseException | None) -> OSError | None:
    """The ``OSError`` that caused ``err`` (itself, or along its cause / context), if any."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def write_error(path: str | os.PathLike, err: OSError) -> RelkdError:
    """One line for a failure to write an exported file: the path and the system's reason."""
    reason = err.strerror or str(err) or type(err).__name__
    where = err.filename if err.filename is not None else path
    at = f": {str(where)!r}" if str(where) != str(path) else ""  # e.g. a parent that is a file
    return RelkdError(f"cannot write {str(path)!r}: {reason}{at} (errno {err.errno})")


def _place(src: Path, dst: Path) -> None:
    """Copy the checked file ``src`` to ``dst`` atomically (a temporary file beside ``dst``,
    fsync, rename): ``dst`` holds the old or the new file, never a part."""
    from relkd._fs import atomic_write_bytes

    try:
        atomic_write_bytes(dst, src.read_bytes())
    except OSError as e:
        raise write_error(dst, e) from e


def _export_file(
    wrapped: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int | None
) -> str:
    """Write ``path`` with the dynamo exporter, else the TorchScript one; returns which."""
    errors: list[BaseException] = []
    names = {"input_names": ["image"], "output_names": ["logits"]}
    try:
        with quiet():
            dyn = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=True, opset_version=opset,
                dynamic_shapes=dyn, external_data=False, **names,
            )  # fmt: skip
        return "dynamo"
    except Exception as e:  # any exporter failure: try the other exporter
        errors.append(e)
    try:
        with quiet():
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
    os_err = next((o for o in map(_os_error, errors) if o is not None), None)
    if os_err is not None:  # writing the file failed, not exporting the model
        raise write_error(path, os_err) from errors[-1]
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
    the normalisation inside, check it with ONNX Runtime and return its record (also written
    beside ``path`` as ``<stem>.export.json``, :func:`record_path`). The file is built and
    checked in a temporary folder and only then copied to ``path`` atomically; a failure to
    write there is a :class:`~relkd.RelkdError` naming the path and the reason.

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
    made = [p for p in (out.parent, *out.parent.parents) if not os.path.exists(p)]
    try:
        try:  # before the export's work: a folder that cannot be made or written fails first
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"):
                pass
        except OSError as e:
            raise write_error(out, e) from e
        with on_cpu_eval(model), tempfile.TemporaryDirectory(prefix="relkd-export-") as work:
            return _export(
                model, out, Path(work) / out.name, shape, mean, std, class_names, images,
                labels, images_source, dynamic_batch, opset, atol, rtol, int8, calibration,
                metadata, reference,
            )  # fmt: skip
    except BaseException:
        for folder in made:  # deepest first: the folders made for a file that was not written
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _export(
    model, out, tmp, shape, mean, std, class_names, images, labels, images_source,
    dynamic_batch, opset, atol, rtol, int8, calibration, metadata, reference,
) -> dict[str, Any]:  # fmt: skip
    """Export to ``tmp`` (in a temporary folder), check it, then place it at ``out``."""
    from relkd._version import __version__

    wrapped = NormalizedModel(model, mean, std).eval()
    if images is None:
        images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(0))
        images_source = images_source or "64 random images (uniform in [0, 1])"
    images = images.float()
    if tuple(images.shape[1:]) != shape:
        raise RelkdError(f"verification images are {tuple(images.shape[1:])}, the input {shape}")
    example = images[:2] if dynamic_batch else images[:1]
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
    used_opset = _set_metadata(tmp, meta)
    if opset is not None and used_opset != opset:  # the dynamo exporter may not honour it
        raise RelkdError(
            f"--opset {opset} was asked for but the {exporter} exporter wrote opset "
            f"{used_opset}; no file written (leave --opset out for the exporter's own)"
        )
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
        "runtime": "onnxruntime " + ort_version() + " (CPUExecutionProvider)",
    }
    if labels is not None:
        check["torch_top1"] = topk_stats(want, labels)["top1"]
        check["onnx_top1"] = topk_stats(got, labels)["top1"]
    if not diff <= limit:
        raise RelkdError(
            f"export check failed: ONNX Runtime's logits differ from the torch model's by "
            f"{diff:.3g} (> tolerance {limit:.3g}) on {len(images)} images; no file written"
        )
    _place(tmp, out)
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
        q_name = out.stem + ".int8.onnx"
        try:  # in the temporary folder too: the quantiser writes its helper files beside it
            record["int8"] = quantize(tmp, shape, calibration, images, labels, sess)
        except RelkdError:
            raise
        except Exception as e:  # ORT's quantiser refused the graph: the fp32 file stays
            os_err = _os_error(e)
            if os_err is not None:
                raise write_error(tmp.with_name(q_name), os_err) from e
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise RelkdError(
                f"int8 quantisation of {out.name} failed ({type(e).__name__}: {first}); the "
                f"fp32 file {str(out)!r} is written and checked"
            ) from e
        _place(tmp.with_name(q_name), out.with_name(q_name))
    from relkd._fs import atomic_write_text

    rec_file = record_path(out)
    try:
        atomic_write_text(rec_file, json.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise write_error(rec_file, e) from e
    return record
