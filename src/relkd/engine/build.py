"""Assembly: the one place where the parts of a training run are put together.

Two halves, both plain functions of what they are given:

- :func:`build_method_parts` measures the models (one no-grad forward pass on an example batch),
  fills the :class:`~relkd.methods.MethodContext`, builds the method and the
  :class:`~relkd.engine.distiller.Distiller` and the online :class:`~relkd.engine.teacher.Teacher`.
  :func:`build_components` does that for a checked config (data sets and models first);
  :class:`relkd.Distillation` and ``relkd bench speed`` call :func:`build_method_parts` with their
  own models.
- :func:`build_step` wraps a Distiller into the engine's :class:`~relkd.engine.step.TrainStep`
  (autocast, ``GradScaler``, ``torch.compile``, the teacher source and the non-finite policy);
  :func:`build_optimizer` makes the configured optimizer. ``fit``, ``relkd bench speed`` and
  ``relkd probe`` step through what these return.

Also here: the process-level set-up every entry point shares (:func:`seed_everything`,
:func:`resolve_device`, :func:`init_distributed`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd import distributed as D
from relkd.config import Config, OptimConfig
from relkd.engine.distiller import Distiller
from relkd.engine.step import TrainStep
from relkd.engine.teacher import Teacher
from relkd.methods import MethodContext, build_method
from relkd.methods.base import Method
from relkd.models import POOLED, FeatureTap, create_model, get_feature_info, load_checkpoint
from relkd.models.input_check import teacher_input
from relkd.models.normalization import attach_input_norm, describe_input_norm
from relkd.models.registry import MODELS
from relkd.registry import RelkdError

__all__ = [
    "Components",
    "MethodParts",
    "autocast",
    "build_components",
    "build_method_parts",
    "build_models",
    "build_optimizer",
    "build_step",
    "init_distributed",
    "model_kwargs",
    "probe_shapes",
    "resolve_device",
    "seed_everything",
    "tappable",
]


# ----------------------------------------------------------------------------- process set-up
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` (this rank's GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; errors name
    the setting as ``key`` (``--device`` for ``relkd eval``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_gpu())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RelkdError(f"{key}={name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RelkdError(f"{key}={name!r} but CUDA is not available; use cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", _local_gpu())
    return dev


def _local_gpu() -> int:
    """This process's GPU: its local rank, modulo the GPUs it sees (``srun --gpus-per-task``
    shows each task only its own GPU)."""
    return int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun (or ``srun``, see :func:`relkd.distributed.adopt_launcher_env`)
    describes in the environment (no-op otherwise)."""
    if D.is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend)


def autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A zero-argument callable returning the forward pass's autocast context for
    ``precision`` (``fp32``: none; ``bf16`` / ``fp16``: ``torch.autocast`` on ``device``)."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------ models
def probe_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Feature shapes (no batch dim) of the given taps, by one no-grad forward in eval mode."""
    tap = FeatureTap(model, names)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = tap(x)
    except RuntimeError as e:
        raise forward_failed(model, x, e) from e
    finally:
        model.train(was)
        tap.remove()
    shapes = {k: tuple(v.shape[1:]) for k, v in out.feats.items()}
    shapes["logits"] = tuple(out.logits.shape[1:])
    return shapes


def forward_failed(model: nn.Module, x: torch.Tensor, err: BaseException) -> RelkdError:
    """One line for the model's first forward (``x``: [B, C, H, W], the data set's shape) that
    raised: the model's own error, and what its first convolution takes only where that differs
    from C (:func:`relkd.models.input_check.channel_mismatch`, the test ``relkd profile``
    uses). Nothing else is said about shapes: the error may be the model's own code failing."""
    from relkd.models.input_check import channel_mismatch

    first = (str(err).strip().splitlines() or [""])[0][:200]
    mismatch = channel_mismatch(model, int(x.shape[1])) if x.dim() > 1 else None
    hint = f"{mismatch}; " if mismatch else ""
    return RelkdError(
        f"{type(model).__name__} failed on an input of shape {list(x.shape)} (the data set's "
        f"shape): {hint}{type(err).__name__}: {first}"
    )


def tappable(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The names a method may tap on ``model``: its stages and ``"pooled"`` when it has one."""
    names = [i.name for i in get_feature_info(model, example)]
    try:
        FeatureTap(model, [POOLED]).remove()
        names.append(POOLED)
    except RelkdError:
        pass
    return names


def model_kwargs(name: str, kwargs: Any, in_channels: int) -> dict[str, Any]:
    """The model's kwargs with ``in_chans`` = the data's channels where the factory takes it: a
    zoo name or import path whose signature has ``in_chans`` or ``**kwargs``
    (:func:`relkd.plugins.takes_argument`; the small CNNs default to 1 channel, the CIFAR zoo to
    3), or a ``torchvision:`` / ``timm:`` model when the data is not RGB (the adapter then
    adapts its stem). A factory that takes neither gets no ``in_chans``: it is built as it is,
    and a forward on the data's images says if its channels differ."""
    from relkd.plugins import takes_argument

    kw = dict(kwargs)
    if name.startswith(("torchvision:", "timm:")):
        takes = in_channels != 3
    else:
        takes = name in MODELS and takes_argument(MODELS.get(name), "in_chans")  # paths too
    if takes:
        kw.setdefault("in_chans", in_channels)
    return kw


def build_models(
    cfg: Config,
    info: Any,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[nn.Module | None, nn.Module]:
    """``(teacher or None, student)`` as configured (a model passed from Python is kept), each
    seeing inputs normalised as it was trained. With ``report``: ``report["inputs"][role]`` says
    the statistics each model sees and ``report["notes"]`` gets what relkd noticed about the
    teacher's input contract (:mod:`relkd.models.input_check`)."""
    report = report if report is not None else {}
    inputs, notes = report.setdefault("inputs", {}), report.setdefault("notes", [])
    kw = model_kwargs(cfg.student.name, cfg.student.kwargs, info.in_channels)
    if student is None:
        student = create_model(
            cfg.student.name, info.num_classes, weights=cfg.student.weights, **kw
        )
        if cfg.student.checkpoint:
            load_checkpoint(student, cfg.student.checkpoint)
    if teacher is None and cfg.teacher is not None:
        tc = cfg.teacher
        if not tc.checkpoint and not tc.weights:
            raise RelkdError(
                f"teacher {tc.name!r} has no checkpoint: set teacher.checkpoint=PATH or "
                "teacher.weights=NAME (a trained teacher; an untrained one teaches nothing)"
            )
        tkw = model_kwargs(tc.name, tc.kwargs, info.in_channels)
        teacher = create_model(tc.name, info.num_classes, weights=tc.weights, **tkw)
        if tc.checkpoint:
            load_checkpoint(teacher, tc.checkpoint)
        elif getattr(teacher, "new_classifier", False):
            raise RelkdError(
                f"teacher {tc.name!r} with weights={tc.weights!r} has a new, untrained classifier "
                f"for {info.num_classes} classes: fine-tune it first (relkd train with method ce) "
                "and pass that run's student.pt as teacher.checkpoint"
            )
    # Each model sees inputs normalised as it was trained (a no-op when they match the data's).
    sc = cfg.student
    attach_input_norm(student, info.mean, info.std, sc.mean, sc.std)
    inputs["student"] = describe_input_norm(
        student, info.mean, info.std, sc.mean, sc.std, "student.mean / student.std"
    )
    if teacher is not None:
        tc = cfg.teacher
        t_name = tc.name if tc else f"{type(teacher).__name__} (passed from Python)"
        (t_mean, t_std), t_notes = teacher_input(
            teacher, t_name, tc.checkpoint if tc else None, tc and tc.mean, tc and tc.std, info
        )
        attach_input_norm(teacher, info.mean, info.std, t_mean, t_std)
        given = tc is not None and tc.mean is not None
        how = "teacher.mean / teacher.std" if given else "recorded with its checkpoint"
        inputs["teacher"] = describe_input_norm(teacher, info.mean, info.std, t_mean, t_std, how)
        notes += t_notes
    return teacher, student


# ------------------------------------------------------------------------------------ method
@dataclass
class MethodParts:
    """What :func:`build_method_parts` returns."""

    context: MethodContext
    method: Method
    distiller: Distiller  # student + the method's trainable extras (on the student's device)
    teacher: Teacher | None  # the online teacher when the method reads one, else None
    ce_weight: float


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def build_method_parts(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None,
    example: torch.Tensor,
    *,
    method_args: Mapping[str, Any] | None = None,
    ce_weight: float | None = None,
    num_classes: int | None = None,
    num_train_samples: int = 0,
    seed: int = 0,
    data_name: str | None = None,
    teacher_hint: str = "set teacher.name and teacher.checkpoint",
) -> MethodParts:
    """Measure the models on ``example`` [B, C, H, W] (zeros; each model sees it on its own
    device), fill the method's context, build the method and wrap it with the student.

    Raises :class:`RelkdError` when the student does not predict ``num_classes`` classes (when
    given), the teacher and the student disagree on the classes, or the method needs a teacher
    and ``teacher`` is None (``teacher_hint`` says how to give one).
    """
    s_ex = example.to(_device_of(student))  # each model measured on its own device
    s_shapes = probe_shapes(student, tappable(student, s_ex), s_ex)
    if len(s_shapes["logits"]) != 1:
        raise RelkdError(
            f"the student must return logits [B, C]; got a per-sample shape {s_shapes['logits']}"
        )
    if num_classes is not None and s_shapes["logits"] != (num_classes,):
        k = s_shapes["logits"][0]
        raise RelkdError(
            f"student predicts {k} classes but data set {data_name!r} has {num_classes}"
            if data_name
            else f"num_classes={num_classes} but the student predicts {k}"
        )
    ctx = MethodContext(
        num_classes=int(s_shapes["logits"][0]),
        student_stages=get_feature_info(student, s_ex),
        student_shapes=s_shapes,
        num_train_samples=num_train_samples,
        seed=seed,
    )
    if teacher is not None:
        t_ex = example.to(_device_of(teacher))
        ctx.teacher_stages = get_feature_info(teacher, t_ex)
        ctx.teacher_shapes = probe_shapes(teacher, tappable(teacher, t_ex), t_ex)
        if ctx.teacher_shapes["logits"] != s_shapes["logits"]:
            raise RelkdError(
                f"teacher predicts {ctx.teacher_shapes['logits'][0]} classes but the student "
                f"{s_shapes['logits'][0]}; both must match the data set ({ctx.num_classes})"
            )
    built, default_ce = build_method(method, ctx, method_args)
    if built.requires_teacher and teacher is None:
        raise RelkdError(f"method {method!r} needs a teacher: {teacher_hint}")
    weight = float(default_ce if ce_weight is None else ce_weight)
    distiller = Distiller(student, built, weight).to(_device_of(student))
    # A teacher the method does not read is left alone (not frozen, no taps).
    tea = (
        Teacher(teacher, built.teacher_taps())
        if teacher is not None and built.requires_teacher
        else None
    )
    return MethodParts(ctx, built, distiller, tea, weight)


@dataclass
class Components:
    """Everything a training step needs, built from a config (also used by tests and benches)."""

    cfg: Config
    info: Any
    distiller: Distiller
    method: Method
    teacher: Teacher | None
    train_ds: Any
    test_ds: Any
    #: the images each model sees, for the plan line (size, channels, statistics per model)
    inputs: str = ""
    #: what relkd noticed about the models' inputs, said once before training
    input_notes: list[str] = field(default_factory=list)


def build_components(
    cfg: Config,
    device: torch.device,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
) -> Components:
    """Data sets, models, method and Distiller for a checked ``cfg``
    (:func:`relkd.preflight.check_config` ran: ``fit`` runs it first); every check that needs
    the data or the models (class counts, input shapes, the method's own argument checks)
    fails here, before anything is trained or written."""
    from relkd.data import build_datasets, take_subset

    train_ds, test_ds, info = build_datasets(
        cfg.data.name, cfg.data.root, download=cfg.data.download, augment=cfg.data.augment,
        image_size=cfg.data.image_size, val_split=cfg.data.val_split,
        val_seed=cfg.data.val_seed, test_subset=cfg.data.test_subset,
    )  # fmt: skip
    if cfg.data.train_subset:
        # Unlike data.test_subset (a cap), a training subset larger than the set is refused:
        # the run would train on fewer images than its config says (packaged Fashion-MNIST
        # configs set 10000, more than a small set at data.root holds).
        if cfg.data.train_subset > len(train_ds):
            raise RelkdError(
                f"data.train_subset={cfg.data.train_subset} is more than the {len(train_ds)} "
                f"training images of {cfg.data.name!r}: set data.train_subset=null (all of "
                f"them) or a value in 1..{len(train_ds)}"
            )
        train_ds = take_subset(train_ds, cfg.data.train_subset, seed=0)  # same for every seed
    report: dict[str, Any] = {"notes": list(getattr(info, "notes", ()) or ()), "inputs": {}}
    teacher_model, student_model = build_models(cfg, info, teacher, student, report=report)
    dummy = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    parts = build_method_parts(
        cfg.method.name, student_model, teacher_model, dummy, method_args=cfg.method.args,
        ce_weight=cfg.method.ce_weight, num_classes=info.num_classes,
        num_train_samples=len(train_ds), seed=cfg.train.seed,
        data_name=cfg.data.name,
    )  # fmt: skip
    distiller = parts.distiller.to(device)
    if cfg.train.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    tea = parts.teacher.to(device) if parts.teacher is not None else None
    # The plan line's part: image size, channels and the statistics each model sees.
    size = f"inputs {info.in_channels}x{info.image_size}x{info.image_size}"
    names = {"teacher": cfg.teacher.name if cfg.teacher else type(teacher_model).__name__,
             "student": cfg.student.name}  # fmt: skip
    roles = [r for r in ("teacher", "student") if r in report["inputs"]]
    roles = [r for r in roles if r == "student" or tea is not None]  # an unused teacher: no
    inputs = "; ".join([size, *(f"{r} {names[r]} sees {report['inputs'][r]}" for r in roles)])
    return Components(
        cfg, info, distiller, parts.method, tea, train_ds, test_ds, inputs, report["notes"]
    )


# -------------------------------------------------------------------------------------- step
def build_optimizer(
    optim: OptimConfig, params: list[torch.Tensor], lr: float
) -> torch.optim.Optimizer:
    """The configured optimizer (``optim.name``: sgd or adamw) over ``params`` at ``lr``."""
    if optim.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
            nesterov=optim.nesterov,
        )  # fmt: skip
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )


def build_step(
    model: Callable[..., Any],
    distiller: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    precision: str = "fp32",
    compile: bool = False,
    compile_mode: str = "default",
    teacher: Callable[..., Any] | None = None,
    drop_extras: Collection[str] = (),
    channels_last: bool = False,
    grad_clip: float | None = None,
    on_nonfinite: str = "stop",
    method_name: str = "",
    params: list[torch.Tensor] | None = None,
    accum_steps: int = 1,
) -> TrainStep:
    """The engine's :class:`TrainStep` over ``model`` (the Distiller, its DDP wrapper or any
    callable with its signature; compiled when ``compile``): a ``GradScaler`` enabled for fp16,
    the autocast of ``precision``, the method's batch hook (``distiller.method.prepare_batch``
    when it has a method), ``accum_steps`` micro-batches per optimizer step. The scaler is
    ``step.scaler``, the autocast ``step.amp``."""
    fn: Any = torch.compile(model, mode=compile_mode) if compile else model
    method = getattr(distiller, "method", None)
    return TrainStep(
        fn, optimizer, params=params, state_module=distiller,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        amp=autocast(precision, device), teacher=teacher, drop_extras=drop_extras,
        prepare_batch=method.prepare_batch if method is not None else None,
        channels_last=channels_last, grad_clip=grad_clip, on_nonfinite=on_nonfinite,
        method_name=method_name, accum_steps=accum_steps,
        ddp=model if isinstance(model, nn.parallel.DistributedDataParallel) else None,
    )  # fmt: skip
