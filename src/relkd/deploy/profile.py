"""What a model costs: parameters, MACs, weight bytes, peak activation memory and latency.

Every number describes one forward pass of the model in evaluation mode under ``no_grad``:

* **parameters**: elements of the model's parameters (a parameter shared by two modules once).
* **MACs** of one forward at batch 1: multiply-accumulates of the matrix products and
  convolutions, counted by ``torch.utils.flop_counter.FlopCounterMode`` at the operator level
  (``aten.mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` / ``convolution``, however a module calls
  them; scaled dot-product attention runs on its math backend while counting, as torch has no
  count for the fused CPU kernel). PyTorch counts FLOPs, two per multiply-accumulate;
  relkd reports MACs = FLOPs / 2. **Not counted**: bias additions, batch / layer normalisation
  (folded into the convolution before it by every inference runtime), activations, pooling,
  element-wise sums of residual blocks, softmax, resizing. On the convolutional networks of the
  zoo these are a few per cent of the MACs at most.
* **weight bytes** (fp32 and fp16): floating parameters and floating buffers (batch-norm running
  statistics) at 4 and 2 bytes per element; integer buffers (``num_batches_tracked``) are left
  out, as an exported model does not hold them.
* **peak activation memory** of a batch-1 forward: the most bytes held at once by the tensors
  the forward's operators return (weights and the input excluded), tracked on the CPU by a
  ``TorchDispatchMode`` that adds a tensor's storage when an operator returns it and subtracts
  it when the last tensor using it is freed. Scratch buffers an operator allocates and frees
  inside itself (oneDNN workspaces) are not seen; the figure is what the graph needs live.
* **latency**: ``warmup`` untimed calls, then ``repeats`` timed calls of a batch of random
  images; median and quartiles in milliseconds (CUDA calls are synchronised). On the CPU the
  torch thread count is stated; ``torch.compile`` is timed when asked (its compile happens in
  the warm-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relkd.deploy.checks import check_counts, forward_errors
from relkd.registry import RelkdError

#: What the MAC count leaves out (printed with every profile).
NOT_COUNTED = (
    "MACs count matmul/linear, convolution and attention products (FLOPs/2 of "
    "torch.utils.flop_counter); not counted: bias adds, batch/layer norm, activations, pooling, "
    "residual sums, softmax"
)


@dataclass
class ModelCost:
    """The cost of one model; see the module docstring for how each number is measured.

    ``input_shape`` is ``(C, H, W)``; ``latency`` holds one dict per (device, batch, mode) with
    ``median_ms``, ``q1_ms``, ``q3_ms``, ``min_ms``, ``max_ms``, ``threads`` and ``machine``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    params: int
    macs: int
    weight_bytes_fp32: int
    weight_bytes_fp16: int
    peak_activation_bytes: int
    latency: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def latency_ms(self, device: str = "cpu", batch: int = 1, mode: str = "eager") -> float | None:
        for r in self.latency:
            if (r["device"], r["batch"], r["mode"]) == (device, batch, mode):
                return float(r["median_ms"])
        return None


# ------------------------------------------------------------------------------ the machine
def cpu_model() -> str:
    """The CPU's model string (``/proc/cpuinfo``'s ``model name``, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_label(device: str = "cpu", threads: int | None = None) -> str:
    """``"<CPU model>, N torch threads"`` or the CUDA device's name."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = threads if threads is not None else torch.get_num_threads()
    return f"{cpu_model()}, {n} torch thread{'s' if n != 1 else ''}"


# ------------------------------------------------------------------------------- the counts
def parse_input(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"3x32x32"`` (or ``"32"``: 3 channels, square) -> ``(3, 32, 32)``."""
    if not isinstance(text, str):
        vals = [int(v) for v in text]
    else:
        try:
            vals = [int(v) for v in text.lower().replace("*", "x").split("x")]
        except ValueError:
            vals = []
    if len(vals) == 1:
        vals = [3, vals[0], vals[0]]
    if len(vals) != 3 or min(vals) < 1:
        raise RelkdError(f"--input {text!r} is not CxHxW (e.g. 3x32x32, 1x28x28)")
    return vals[0], vals[1], vals[2]


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise RelkdError(f"the model returned {type(out).__name__}, not logits")


def count_params(model: nn.Module) -> int:
    """Elements of the model's parameters (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates


def weight_bytes(model: nn.Module, bytes_per_element: int = 4) -> int:
    """Floating parameters and buffers at ``bytes_per_element`` bytes each."""
    seen: set[int] = set()
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n * bytes_per_element


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` (``x``: [B, C, H, W]): FLOPs of torch's flop counter / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        # The fused CPU attention kernel has no FLOP formula in torch (counted as 0); the math
        # backend computes the same attention with matmuls, which are counted.
        with _math_attention(), counter:
            model(x)
    finally:
        model.train(was)
    return int(counter.get_total_flops()) // 2


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no fused CPU kernel to avoid
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class _LiveTensorBytes:
    """Bytes of the storages operators return, alive at once (see the module docstring)."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tracked tensors]
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self.skip:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [st.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


@torch.no_grad()
def peak_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes held by the tensors the forward ``model(x)`` creates (output included)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    tracker = _LiveTensorBytes([x, *model.parameters(), *model.buffers()])

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    tracker.add(t)
            return out

    was = model.training
    model.eval()
    try:
        with _Mode():
            out = model(x)
        del out
    finally:
        model.train(was)
    return tracker.peak


# ---------------------------------------------------------------------------------- latency
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    device: str = "cpu",
    compile: bool = False,
    warmup: int = 5,
    repeats: int = 30,
) -> dict[str, Any]:
    """Median and spread (ms) of ``repeats`` timed forwards of a random ``[batch, *input_shape]``
    batch after ``warmup`` untimed ones. The model is moved to ``device`` (and left there)."""
    check_counts([batch], warmup, repeats, None)
    dev = torch.device(device)
    model = model.to(dev).eval()
    fn = model
    if compile:
        try:
            fn = torch.compile(model)
        except Exception as e:  # no compiler on this platform
            raise RelkdError(f"torch.compile is not available here: {e}".splitlines()[0]) from e
    x = torch.rand(batch, *input_shape, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(max(1, warmup) if compile else warmup):
            fn(x)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            sync()
            times.append(1000.0 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "device": dev.type,
        "machine": machine_label(device),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "batch": batch,
        "mode": "compile" if compile else "eager",
        "warmup": warmup,
        "repeats": len(times),
        "median_ms": statistics.median(times),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "min_ms": min(times),
        "max_ms": max(times),
    }


# --------------------------------------------------------------------------------- profiles
@contextlib.contextmanager
def on_cpu_eval(model: nn.Module):
    """``model`` on the CPU in eval mode meanwhile; its device and train flag restored after
    (profiling or exporting a user's module must not change it)."""
    p = next(iter([*model.parameters(), *model.buffers()]), None)
    device, was = (p.device if p is not None else None), model.training
    model.cpu().eval()
    try:
        yield model
    finally:
        model.train(was)
        if device is not None:
            model.to(device)


def build_named(name: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """A zoo / ``torchvision:`` / ``timm:`` model by name, untrained (the cost is the
    architecture's), for ``input_shape[0]`` channels."""
    from relkd.engine.build import model_kwargs
    from relkd.models import create_model

    kw = model_kwargs(name, {}, int(input_shape[0]))
    return create_model(name, int(num_classes), **kw)


def profile_model(
    model: nn.Module | str,
    input_shape: Sequence[int] | str = (3, 32, 32),
    *,
    num_classes: int | None = None,
    name: str | None = None,
    latency: bool = True,
    batches: Sequence[int] = (1, 64),
    devices: Sequence[str] | None = None,
    compile: bool = False,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
) -> ModelCost:
    """The cost of ``model`` (an ``nn.Module``, or a model name built with ``num_classes``) on
    inputs of ``input_shape`` ``(C, H, W)``.

    ``latency``: time it on each of ``devices`` (default: the CPU, and CUDA when present) at
    each batch size of ``batches`` (eager; also ``torch.compile`` when ``compile``);
    ``threads``: torch CPU threads for the timing (default: torch's current setting).
    """
    shape = parse_input(input_shape)
    check_counts(batches, warmup, repeats, threads)
    if isinstance(model, str):
        if num_classes is None:
            raise RelkdError(f"give --num-classes to build {model!r}")
        name = name or model
        model = build_named(model, num_classes, shape)
    if not isinstance(model, nn.Module):
        raise RelkdError(f"profile needs an nn.Module or a model name, got {type(model).__name__}")
    with on_cpu_eval(model):
        return _profile(
            model, shape, name, latency, batches, devices, compile, threads, warmup, repeats
        )


def _profile(model, shape, name, latency, batches, devices, compile, threads, warmup, repeats):
    x = torch.rand(1, *shape)
    with torch.no_grad(), forward_errors(model, name, shape, 1):
        out = _logits(model(x))
    cost = ModelCost(
        name=name or type(model).__name__,
        input_shape=shape,
        num_classes=int(out.shape[-1]),
        params=count_params(model),
        macs=count_macs(model, x),
        weight_bytes_fp32=weight_bytes(model, 4),
        weight_bytes_fp16=weight_bytes(model, 2),
        peak_activation_bytes=peak_activation_bytes(model, x),
    )
    if latency:
        devs = (
            list(devices) if devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
        )
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            for dev in devs:
                for mode in ("eager", "compile") if compile else ("eager",):
                    for b in batches:
                        with forward_errors(model, name, shape, int(b)):
                            r = measure_latency(
                                model, shape, batch=int(b), device=dev,
                                compile=mode == "compile", warmup=warmup, repeats=repeats,
                            )  # fmt: skip
                        cost.latency.append(r)
        finally:
            torch.set_num_threads(old)
            model.cpu()
    return cost


def ratios(student: ModelCost, teacher: ModelCost) -> dict[str, Any]:
    """Teacher / student factors: ``params_x`` (how many times fewer parameters), ``macs_x``,
    ``weight_bytes_x``, ``activation_x`` and ``speedup`` per (device, batch, mode) of both."""

    def div(a: float, b: float) -> float | None:
        return a / b if b else None

    out: dict[str, Any] = {
        "params_x": div(teacher.params, student.params),
        "macs_x": div(teacher.macs, student.macs),
        "weight_bytes_x": div(teacher.weight_bytes_fp32, student.weight_bytes_fp32),
        "activation_x": div(teacher.peak_activation_bytes, student.peak_activation_bytes),
        "speedup": [],
    }
    for r in student.latency:
        t = teacher.latency_ms(r["device"], r["batch"], r["mode"])
        if t is not None:
            out["speedup"].append(
                {k: r[k] for k in ("device", "batch", "mode")} | {"x": t / r["median_ms"]}
            )
    return out


def run_models(run_dir: str | os.PathLike, *, weights: bool = False, best: bool = False):
    """The student (and the teacher, when the run names one) of a run folder, with the input
    shape and class count the run used. Returns ``(student, teacher, info)``; ``info`` holds
    ``input_shape``, ``num_classes``, ``teacher_name`` / ``student_name``, ``meta`` (the
    exported student's metadata) and ``cfg``; ``teacher`` is ``None`` when the run has none or
    it was passed from Python. With ``weights`` the student's trained weights are loaded
    (``student_best.pt`` with ``best``)."""
    from relkd.config import load_config
    from relkd.engine.build import model_kwargs
    from relkd.models import create_model, load_checkpoint

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise RelkdError(f"{str(run)!r} is not a run folder (it has no config.yaml)")
    cfg = load_config(run / "config.yaml")
    meta = run_metadata(run)
    if meta is None:  # an unfinished run: the data set says what the model saw
        from relkd.data import build_datasets

        _, _, di = build_datasets(cfg.data.name, cfg.data.root, image_size=cfg.data.image_size)
        meta = {"num_classes": di.num_classes, "in_chans": di.in_channels,
                "image_size": di.image_size, "mean": list(di.mean), "std": list(di.std),
                "dataset": di.name}  # fmt: skip
    shape = (int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))
    nc = int(meta["num_classes"])
    # With its trained weights the student is built as `relkd eval` builds it: pretrained
    # weights named by the config set the input statistics the student was trained on.
    student = create_model(
        cfg.student.name, nc, weights=cfg.student.weights if weights else None,
        **model_kwargs(cfg.student.name, cfg.student.kwargs, shape[0]),
    )  # fmt: skip
    if weights:
        names = ("student_best.pt",) if best else ("student.pt", "checkpoint.pt")
        found = [run / n for n in names if (run / n).is_file()]
        if not found:
            raise RelkdError(f"run folder {str(run)!r} holds no {' or '.join(names)}")
        load_checkpoint(student, found[0])
    teacher = None
    if cfg.teacher is not None:
        tc = cfg.teacher
        teacher = create_model(tc.name, nc, **model_kwargs(tc.name, tc.kwargs, shape[0]))
    info = {
        "input_shape": shape,
        "num_classes": nc,
        "student_name": cfg.student.name,
        "teacher_name": cfg.teacher.name if cfg.teacher is not None else None,
        "meta": meta,
        "cfg": cfg,
    }
    return student, teacher, info


def run_metadata(run: Path) -> dict[str, Any] | None:
    """The metadata training wrote with the run's student (``student.safetensors`` header, else
    ``student.pt``'s ``meta``: num_classes, in_chans, image_size, mean, std, ...), or None."""
    p = run / "student.safetensors"
    if p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
        if "num_classes" in meta:
            return meta
    p = run / "student.pt"
    if p.is_file():
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and obj["meta"]:
            return obj["meta"]
    return None


def profile_run(run_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """:func:`profile_model` of a run's student and teacher (same input) and their ratios:
    ``{"run_dir", "student": ModelCost, "teacher": ModelCost | None, "ratios": dict | None}``."""
    student, teacher, info = run_models(run_dir)
    shape = info["input_shape"]
    s = profile_model(student, shape, name=info["student_name"], **kwargs)
    t = profile_model(teacher, shape, name=info["teacher_name"], **kwargs) if teacher else None
    return {"run_dir": str(run_dir), "student": s, "teacher": t,
            "ratios": ratios(s, t) if t else None}  # fmt: skip


# ------------------------------------------------------------------------------- the output
def _si(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def format_profile(costs: Sequence[ModelCost], ratio: dict[str, Any] | None = None) -> str:
    """The human-readable profile: one block per model, then the teacher / student factors."""
    lines: list[str] = []
    for c in costs:
        c_, h, w = c.input_shape
        lines.append(f"{c.name} ({c.num_classes} classes, input {c_}x{h}x{w})")
        lines.append(f"  parameters        {c.params:,} ({_si(c.params)})")
        lines.append(f"  MACs (batch 1)    {c.macs:,} ({_si(c.macs, 'MAC')})")
        lines.append(
            f"  weights           {_bytes(c.weight_bytes_fp32)} fp32, "
            f"{_bytes(c.weight_bytes_fp16)} fp16"
        )
        lines.append(f"  peak activations  {_bytes(c.peak_activation_bytes)} (batch 1)")
        for r in c.latency:
            lines.append(
                f"  latency {r['device']} {r['mode']} batch {r['batch']:<4} "
                f"{r['median_ms']:.3f} ms median (IQR {r['q1_ms']:.3f}-{r['q3_ms']:.3f}, "
                f"{r['repeats']} calls after {r['warmup']} warm-up) on {r['machine']}"
            )
    if ratio:
        parts = [f"{ratio['params_x']:.1f}x fewer parameters", f"{ratio['macs_x']:.1f}x fewer MACs"]
        parts += [
            f"{s['x']:.1f}x faster ({s['device']} {s['mode']}, batch {s['batch']})"
            for s in ratio["speedup"]
        ]
        lines.append("student vs teacher: " + ", ".join(parts))
    lines.append(f"note: {NOT_COUNTED}")
    return "\n".join(lines)


def profile_json(costs: Sequence[ModelCost], ratio: dict[str, Any] | None = None) -> dict:
    out: dict[str, Any] = {"models": [c.to_dict() for c in costs], "ratios": ratio}
    out["macs_note"] = NOT_COUNTED
    out["activation_note"] = (
        "peak bytes of the tensors a batch-1 forward's operators return, alive at once "
        "(weights and input excluded), tracked with a TorchDispatchMode on the CPU"
    )
    return out
