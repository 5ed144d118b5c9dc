"""ONNX Runtime helpers of :mod:`relkd.deploy`: the ``export`` extra check, sessions, logits,
latency, metadata and top-k counts of an exported file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from relkd.deploy.profile import cpu_model
from relkd.registry import RelkdError

EXTRA_HINT = "pip install 'relkd[export]' (onnx, onnxruntime, onnxscript)"


def require_extra(what: str = "ONNX export") -> None:
    """One line saying what to install when the ``export`` extra is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise RelkdError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def short_reason(e: BaseException) -> str:
    """The gist of an onnx / ONNX Runtime load error, on one line: ORT prefixes its reason with
    ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Load model from PATH failed:``."""
    text = " ".join(str(e).split())
    if "failed:" in text:
        text = text.rsplit("failed:", 1)[1].strip()
    return text or type(e).__name__


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file (JSON values decoded)."""
    require_extra("reading an ONNX file")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RelkdError(
            f"{str(path)!r} is not a valid ONNX model (onnx: {short_reason(e)})"
        ) from e
    out: dict[str, Any] = {}
    for entry in model.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out


# ------------------------------------------------------------------------------ running ORT
def ort_session(path: str | os.PathLike, threads: int | None = None, *, user_file: bool = False):
    """A CPU ONNX Runtime session of ``path``. ``user_file``: the file came from the user (not
    from relkd's own export), so a file ORT cannot load is a one-line :class:`RelkdError`."""
    require_extra("running an ONNX file")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not user_file:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's errors (InvalidArgument, InvalidProtobuf, ...) derive from it
        raise RelkdError(
            f"{str(path)!r} is not a valid ONNX model (ONNX Runtime: {short_reason(e)})"
        ) from e


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


def topk_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
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


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
