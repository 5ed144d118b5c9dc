"""The one training loop: CPU, one GPU or N GPUs under torchrun, same code path.

``fit(cfg)`` builds everything from a :class:`relkd.config.Config` (or takes the user's own
``nn.Module`` teacher / student), trains, evaluates each epoch, writes the run folder and returns
a summary dict. Layout of a run folder::

    run.json             what produced the run: versions, git commit, command, host, device,
                         world size, global batch; every resume and allowed config change
    config.yaml          the resolved config (the one the run continues with)
    plan.json            the data pipeline and teacher source, with the reason for each fallback
    metrics.jsonl        one record per epoch (losses, lr, top-1/top-5, best so far)
    checkpoint.pt        the latest epoch (checkpoint.prev.pt the one before; checkpoint.json
                         their checksums)
    student.pt           the student's weights alone at the end (also student.safetensors)
    student_best.pt      the student's weights at the best top-1 epoch
    summary.json         best / last top-1, run time (written last: the run finished)

Every file is written atomically; the rules (names, locks, resume) are in
:mod:`relkd.engine.rundir`.
"""

from __future__ import annotations

import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd import distributed as D
from relkd.config import CHOICES, Config, load_config
from relkd.engine import preempt
from relkd.engine.distiller import Distiller
from relkd.engine.logger import RunLogger
from relkd.engine.plan import (
    BlockSampler,
    EpochLoader,
    Plan,
    build_loaders,
    build_teacher_source,
    make_plan,
    unpack,
)
from relkd.engine.rundir import RunFolder, run_path, sigterm_as_interrupt, student_metadata
from relkd.engine.schedule import Schedule
from relkd.engine.step import TrainStep
from relkd.engine.teacher import Teacher
from relkd.methods import MethodContext, build_method
from relkd.methods.base import Method
from relkd.models import POOLED, FeatureTap, create_model, get_feature_info, load_checkpoint
from relkd.models.normalization import attach_input_norm
from relkd.progress import format_eta
from relkd.registry import RelkdError

__all__ = ["BlockSampler", "Components", "build_components", "evaluate", "fit"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _local_gpu())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RelkdError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RelkdError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
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


def probe_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Feature shapes (no batch dim) of the given taps, by one no-grad forward in eval mode."""
    tap = FeatureTap(model, names)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = tap(x)
    except RuntimeError as e:
        raise RelkdError(
            f"{type(model).__name__} cannot run on an input of shape {list(x.shape)} "
            f"(the data set's shape): {str(e).splitlines()[0]}"
        ) from e
    finally:
        model.train(was)
        tap.remove()
    shapes = {k: tuple(v.shape[1:]) for k, v in out.feats.items()}
    shapes["logits"] = tuple(out.logits.shape[1:])
    return shapes


def _tappable(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    names = [i.name for i in get_feature_info(model, example)]
    try:
        FeatureTap(model, [POOLED]).remove()
        names.append(POOLED)
    except RelkdError:
        pass
    return names


def _chans_kwargs(name: str, kwargs: Any, in_channels: int) -> dict[str, Any]:
    """The model's kwargs with ``in_chans`` = the data's channels when the factory takes it (the
    small CNNs default to 1 channel, the CIFAR zoo to 3) or the data is not RGB."""
    import inspect

    from relkd.models.registry import MODELS

    kw = dict(kwargs)
    takes = False
    if ":" not in name and name in MODELS.names():
        takes = "in_chans" in inspect.signature(MODELS.get(name)).parameters
    if takes or in_channels != 3:
        kw.setdefault("in_chans", in_channels)
    return kw


def _build_models(cfg: Config, info: Any, teacher: nn.Module | None, student: nn.Module | None):
    kw = _chans_kwargs(cfg.student.name, cfg.student.kwargs, info.in_channels)
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
        tkw = _chans_kwargs(tc.name, tc.kwargs, info.in_channels)
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
    attach_input_norm(student, info.mean, info.std, cfg.student.mean, cfg.student.std)
    if teacher is not None:
        tc = cfg.teacher
        attach_input_norm(teacher, info.mean, info.std, tc and tc.mean, tc and tc.std)
    return teacher, student


def _make_loaders(cfg: Config, method: Method, train_ds, test_ds, info, device, replay=False):
    """The train / test loaders the planner chooses for ``method`` (kept for ``relkd eval`` and
    tests; ``fit`` goes through :func:`relkd.engine.plan.make_plan` itself)."""
    plan = _plan(cfg, method, False, train_ds)
    if replay:
        plan.pipeline = "replay"
    return build_loaders(plan, cfg, method, train_ds, test_ds, info, device)


def _plan(cfg: Config, method: Method, has_teacher: bool, train_ds) -> Plan:
    return make_plan(
        method=method, method_name=cfg.method.name, has_teacher=has_teacher, train_ds=train_ds,
        in_memory=cfg.data.in_memory, teacher_cache=cfg.train.teacher_cache,
        teacher_replay=cfg.train.teacher_replay, data_name=cfg.data.name,
    )  # fmt: skip


_unpack = unpack  # the old private name (probe, tests)
_EpochLoader = EpochLoader


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp_ctx=nullcontext
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean CE of ``model`` on ``loader`` (summed over ranks)."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, ce sum
    for batch in loader:
        x, y, _ = _unpack(batch, device)
        with amp_ctx():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        stats[0] += y.numel()
        stats[1] += hit[:, 0].sum()
        stats[2] += hit.any(dim=1).sum()
        stats[3] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    model.train(was)
    stats = D.all_reduce_sum(stats)
    n = max(1.0, float(stats[0]))
    return {
        "top1": 100.0 * float(stats[1]) / n,
        "top5": 100.0 * float(stats[2]) / n,
        "test_loss": float(stats[3]) / n,
    }


def _amp(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _run_dir(cfg: Config) -> Path:
    """The run folder (see :func:`relkd.engine.rundir.run_path`)."""
    return run_path(cfg)


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


def build_components(
    cfg: Config,
    device: torch.device,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
) -> Components:
    """Data sets, models, method and Distiller for ``cfg``; every check that can fail before
    training (unknown names, class counts, missing teacher) fails here."""
    from relkd.data import build_datasets
    from relkd.preflight import check_config

    # Config-only checks first, in the order a user fixes them (a method typo before a missing
    # teacher checkpoint or data folder).
    check_config(cfg, teacher=teacher, student=student)
    train_ds, test_ds, info = build_datasets(
        cfg.data.name, cfg.data.root, download=cfg.data.download, augment=cfg.data.augment,
        image_size=cfg.data.image_size, val_split=cfg.data.val_split,
        val_seed=cfg.data.val_seed, test_subset=cfg.data.test_subset,
    )  # fmt: skip
    if cfg.data.train_subset:
        from relkd.data import take_subset

        train_ds = take_subset(
            train_ds, cfg.data.train_subset, seed=0
        )  # same subset for every seed
    teacher_model, student_model = _build_models(cfg, info, teacher, student)
    dummy = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    s_shapes = probe_shapes(student_model, _tappable(student_model, dummy), dummy)
    if s_shapes["logits"] != (info.num_classes,):
        raise RelkdError(
            f"student predicts {s_shapes['logits'][0]} classes but data set {cfg.data.name!r} "
            f"has {info.num_classes}"
        )
    ctx = MethodContext(
        num_classes=info.num_classes,
        student_stages=get_feature_info(student_model, dummy),
        student_shapes=s_shapes,
        epochs=cfg.train.epochs,
        num_train_samples=len(train_ds),
        seed=cfg.train.seed,
    )
    if teacher_model is not None:
        ctx.teacher_stages = get_feature_info(teacher_model, dummy)
        ctx.teacher_shapes = probe_shapes(teacher_model, _tappable(teacher_model, dummy), dummy)
        if ctx.teacher_shapes["logits"] != s_shapes["logits"]:
            raise RelkdError(
                f"teacher predicts {ctx.teacher_shapes['logits'][0]} classes but the student "
                f"{s_shapes['logits'][0]}; both must match the data set ({info.num_classes})"
            )
    method, default_ce = build_method(cfg.method.name, ctx, cfg.method.args)
    if method.requires_teacher and teacher_model is None:
        raise RelkdError(
            f"method {cfg.method.name!r} needs a teacher: set teacher.name and teacher.checkpoint"
        )
    ce_weight = default_ce if cfg.method.ce_weight is None else cfg.method.ce_weight
    distiller = Distiller(student_model, method, ce_weight).to(device)
    if cfg.train.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    tea = None
    if teacher_model is not None and method.requires_teacher:
        tea = Teacher(teacher_model, method.teacher_taps()).to(device)
    return Components(cfg, info, distiller, method, tea, train_ds, test_ds)


def _say(quiet: bool):
    """Messages of the run (rank 0, not quiet) on stderr; nothing is written to the run folder."""

    def say(msg: str) -> None:
        if D.is_main() and not quiet:
            print(msg, file=sys.stderr, flush=True)

    return say


COMPILE_MODES = CHOICES["train.compile_mode"]


@dataclass
class _Loop:
    """What the epoch loop needs, built by :func:`_build_loop`."""

    cfg: Config
    comp: Components
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Any
    step: TrainStep
    sched: Schedule
    lr: float
    train_loader: Any
    test_loader: Any
    phase_of: list[str]  # the pre-training phase of each leading epoch slot
    steps_per_epoch: int
    device: torch.device
    progress: bool

    @property
    def total_epochs(self) -> int:
        return len(self.phase_of) + self.cfg.train.epochs


def _build_loop(cfg: Config, comp: Components, plan: Plan, device, say, progress) -> _Loop:
    """Wrappers (SyncBN, DDP, compile), optimizer, scaler, loaders, teacher source, schedule
    and the :class:`TrainStep`, as the plan says."""
    distiller, method = comp.distiller, comp.method
    model: nn.Module = distiller
    if D.world_size() > 1 and cfg.train.sync_bn:
        from relkd.engine.syncbn import convert_sync_bn

        convert_sync_bn(distiller, device)
    if D.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            distiller,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Multi-stage methods leave parts idle in a phase (the classifier during a hint
            # stage, init-only connectors afterwards); DDP must not wait for their gradients.
            find_unused_parameters=bool(method.phases()),
        )
    step_fn: Any = torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model
    lr = cfg.optim.lr_by_student.get(cfg.student.name, cfg.optim.lr)
    params = [p for p in distiller.parameters() if p.requires_grad]
    if cfg.optim.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(
            params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    amp_ctx = _amp(cfg.train.precision, device)
    train_loader, test_loader = build_loaders(
        plan, cfg, method, comp.train_ds, comp.test_ds, comp.info, device
    )
    tea, drop = build_teacher_source(
        plan, cfg, method, comp.teacher, train_loader, device, say, progress
    )
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    sc = cfg.schedule
    sched = Schedule(
        sc.name, lr, steps_per_epoch, cfg.train.epochs, tuple(sc.milestones), sc.gamma,
        sc.warmup_epochs, sc.min_lr, sc.pct_start, sc.div_factor, sc.final_div_factor,
        sc.cycle_momentum, sc.base_momentum, sc.max_momentum,
    )  # fmt: skip
    step = TrainStep(
        step_fn, opt, params=params, state_module=distiller, scaler=scaler, amp=amp_ctx,
        teacher=tea, drop_extras=drop, prepare_batch=method.prepare_batch,
        channels_last=cfg.train.channels_last, grad_clip=cfg.train.grad_clip,
        on_nonfinite=cfg.train.on_nonfinite, method_name=cfg.method.name,
    )  # fmt: skip
    # Pre-training phases (multi-stage methods) come first; epoch slots are numbered over all.
    phase_of = [name for name, n in method.phases() for _ in range(n)]
    return _Loop(
        cfg, comp, opt, scaler, amp_ctx, step, sched, lr, train_loader, test_loader, phase_of,
        steps_per_epoch, device, progress,
    )  # fmt: skip


def _check_train(cfg: Config) -> None:
    """Build-time checks of the engine's own options."""
    if cfg.train.compile_mode not in COMPILE_MODES:
        raise RelkdError(
            f"train.compile_mode={cfg.train.compile_mode!r} is unknown; valid: "
            f"{', '.join(COMPILE_MODES)}"
        )
    if not isinstance(cfg.train.log_every, int) or cfg.train.log_every < 1:
        raise RelkdError(f"train.log_every={cfg.train.log_every!r} must be a positive integer")


def _train_epoch(loop: _Loop, epoch: int, step: int) -> tuple[dict[str, Any], int]:
    """One epoch slot (a pre-training phase or a main epoch): returns its metrics record
    (losses, lr, time; no evaluation) and the global step after it. Host reads happen only
    every ``train.log_every`` steps and at the end, which raises on a non-finite loss
    (``on_nonfinite=stop``) before anything of the epoch is evaluated or saved."""
    cfg, method, device = loop.cfg, loop.comp.method, loop.device
    pre, n = len(loop.phase_of), loop.steps_per_epoch
    # Re-seed from (seed, epoch): augmentation and dropout randomness of an epoch do not
    # depend on what ran before, which makes --resume continue exactly.
    seed_everything(cfg.train.seed * 1_000_003 + epoch)
    loop.train_loader.set_epoch(epoch)
    tea = loop.step.teacher
    if hasattr(tea, "set_epoch"):  # teacher replay: this epoch's stored outputs
        tea.set_epoch(epoch)
    phase = loop.phase_of[epoch] if epoch < pre else "main"
    main_epoch = epoch - pre
    method.set_phase(phase)
    method.set_epoch(max(0, main_epoch))
    loop.comp.distiller.train()
    loop.step.start_epoch(epoch, step)
    t0, bar = time.time(), None
    if loop.progress:
        from relkd.progress import progress

        desc = f"{phase} {epoch + 1}/{pre}" if phase != "main" else f"epoch {main_epoch + 1}"
        bar = progress(total=n, desc=f"{desc}/{cfg.train.epochs}", unit="step", leave=False)
    for i, batch in enumerate(loop.train_loader):
        if i >= n:
            break
        x, y, extras = unpack(batch, device)
        if phase == "main":
            loop.sched.apply(loop.opt, step - pre * n)
        else:  # pre-training phases run at the base lr
            for g in loop.opt.param_groups:
                g["lr"] = loop.lr
        loop.step(x, y, extras)
        step += 1
        if D.world_size() == 1 and preempt.stop_mid_epoch(i + 1, n, time.time() - t0):
            # The last epoch's checkpoint is whole: the run resumes from it, exactly.
            raise preempt.Preempted(f"stopped in epoch slot {epoch + 1} at step {i + 1}/{n}")
        if (i + 1) % cfg.train.log_every == 0 and i + 1 < n:
            stats = loop.step.read()  # the read point: progress and the non-finite check
            if bar is not None:
                bar.set_postfix(loss=f"{stats.means().get('loss', float('nan')):.3f}")
        if bar is not None:
            bar.update(1)
    stats = loop.step.read()
    if bar is not None:
        bar.close()
    if hasattr(tea, "end_epoch"):
        tea.end_epoch()
    # Metrics: per-rank means averaged over ranks.
    means = stats.means() if stats.steps else {}
    keys = sorted(means)
    vec = torch.tensor(
        [means[k] for k in keys] + [float(stats.skipped)], dtype=torch.float64, device=device
    )
    vals = D.all_reduce_sum(vec).tolist()
    ws = D.world_size()
    record: dict[str, Any] = {"epoch": main_epoch + 1, "step": step}
    if phase != "main":
        record["phase"] = phase
    record.update({f"train/{k}": vals[j] / ws for j, k in enumerate(keys)})
    if stats.skipped or vals[-1] > 0:
        record["skipped_steps"] = int(vals[-1])
    record["lr"] = loop.opt.param_groups[0]["lr"]
    record["epoch_time_s"] = time.time() - t0
    return record, step


def load_with_module_name(config: Any, overrides, student: nn.Module | None) -> Config:
    """``load_config``; a student passed from Python needs no ``student.name`` in the config
    (its class name is used for the run record and the checkpoint metadata)."""
    try:
        return load_config(config, overrides)
    except RelkdError as e:
        # Missing name: OmegaConf's "missing mandatory value" or our "student.name is required".
        if student is None or "student.name" not in str(e):
            raise
        try:
            return load_config(config, [*overrides, f"student.name={type(student).__name__}"])
        except RelkdError:
            raise e from None


def fit(
    config: Any,
    *,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
    resume: bool = False,
    overrides: tuple[str, ...] | list[str] = (),
    quiet: bool = False,
    allow_change: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Train as configured; returns ``{"best_top1", "last_top1", "run_dir", ...}``.

    Args:
        config: a YAML path, dict, :class:`Config` or DictConfig.
        teacher / student: optional user ``nn.Module`` s replacing ``cfg.teacher`` / ``cfg.student``
            (features are tapped by module name; ``"pooled"`` = input of the last ``nn.Linear``).
        resume: continue from the run folder's checkpoint; without it an existing run folder
            with a checkpoint is an error, never silently overwritten. The config must equal
            the recorded one (rules: :mod:`relkd.engine.rundir`).
        allow_change: config keys (or sections) that may differ on resume; each change is
            recorded in the folder's ``run.json``.
    """
    cfg = load_with_module_name(config, overrides, student)
    _check_train(cfg)
    D.adopt_launcher_env()  # an `srun` task of a multi-task step: Slurm describes the group
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    run_dir = run_path(cfg)
    run = RunFolder(run_dir, RunLogger(run_dir, tensorboard=cfg.train.tensorboard, quiet=quiet))
    # Every rank checks (the same folder on a shared file system), so none waits on a failed one.
    run.check(cfg, resume=resume, allow_change=allow_change)
    with sigterm_as_interrupt(), run:
        return _fit(cfg, device, run, teacher, student, resume, allow_change, quiet)


def _fit(cfg, device, run: RunFolder, teacher, student, resume, allow_change, quiet) -> dict:
    say = _say(quiet)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Build and check everything; the run folder is first written after this.
    comp = build_components(cfg, device, teacher, student)
    distiller = comp.distiller
    plan = _plan(cfg, comp.method, comp.teacher is not None, comp.train_ds)
    progress = cfg.train.progress and D.is_main() and not quiet
    loop = _build_loop(cfg, comp, plan, device, say, progress)
    start_epoch, step, history, best = 0, 0, [], {"top1": -1.0, "epoch": -1}
    given = {k: _describe_module(m) for k, m in (("teacher", teacher), ("student", student)) if m}
    resumed = run.open(
        cfg, resume=resume, allow_change=allow_change, device=device, world_size=D.world_size(),
        into=(distiller, loop.opt, loop.scaler),
        extra={"modules_from_python": given} if given else None,
    )  # fmt: skip
    if resumed is not None:
        start_epoch, step = resumed.start_epoch, resumed.step
        history, best = resumed.history, resumed.best
        if start_epoch >= loop.total_epochs:
            n = cfg.train.epochs
            say(
                f"{run.path} is already complete ({n} epoch{'' if n == 1 else 's'}): nothing to train"
            )
    run.write_json("plan.json", plan.to_dict())
    say(plan.describe())
    meta = student_metadata(cfg, comp.info, student)

    # A teacher passed from Python has no config or summary of its own: measure its top-1 once
    # here so the run (and `relkd report`) can show it beside the student's.
    teacher_top1 = _python_teacher_top1(teacher, comp, loop, device, say)
    pre = len(loop.phase_of)
    t_start = time.time()
    for epoch in range(start_epoch, loop.total_epochs):
        record, step = _train_epoch(loop, epoch, step)
        main_epoch = epoch - pre
        is_eval = (main_epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == loop.total_epochs
        if "phase" not in record and is_eval:
            ev = evaluate(distiller.student, loop.test_loader, device, loop.amp)
            record.update(ev)
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "epoch": main_epoch + 1}
                run.save_best(distiller.student, meta)
            record["best_top1"] = best["top1"]
        history.append(record)
        here = time.time() - t_start  # this session's epochs: the rate of what is left
        left = here / (epoch - start_epoch + 1) * (loop.total_epochs - epoch - 1)
        dt = record["epoch_time_s"]
        rate = f"{loop.steps_per_epoch / dt:.1f} step/s" if dt > 0 else "-"
        say(
            _epoch_line(record, epoch, pre, cfg.train.epochs, best)
            + f" ({dt:.1f} s, {rate}, {format_eta(left)})"
        )
        state = {
            "distiller": distiller.state_dict(), "optimizer": loop.opt.state_dict(),
            "scaler": loop.scaler.state_dict(), "epoch": epoch, "step": step,
            "history": history, "best": best,
        }  # fmt: skip
        run.end_epoch(record, state)  # the checkpoint first, then the metrics line
        if D.is_dist():
            torch.distributed.barrier()
        if epoch + 1 < loop.total_epochs and _stop_requested(device):
            raise preempt.Preempted(f"stopped after epoch slot {epoch + 1} (checkpoint written)")

    last = next((r for r in reversed(history) if "top1" in r), {})
    summary = {
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "last_top1": last.get("top1", float("nan")),
        "last_top5": last.get("top5", float("nan")),
        "epochs": cfg.train.epochs,
        "method": cfg.method.name,
        "student": cfg.student.name,
        "teacher": cfg.teacher.name if cfg.teacher else None,
        "seed": cfg.train.seed,
        # Training time of every epoch of the run, earlier sessions included (a resumed run's
        # history holds them); evaluation excluded.
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in history),
        "session_time_s": time.time() - t_start,
        "run_dir": str(run.path),
    }
    if teacher_top1 is not None:
        summary["teacher_top1"] = teacher_top1
    run.finish(distiller.student, summary, meta)
    distiller.tap.remove()
    return summary


def _stop_requested(device: torch.device) -> bool:
    """A preemption request (:mod:`relkd.engine.preempt`) seen by any rank, agreed by all."""
    if not D.is_dist():
        return preempt.requested()
    flag = torch.tensor([float(preempt.requested())], device=device)
    return bool(D.all_reduce_sum(flag).item() > 0)


def _describe_module(m: nn.Module) -> dict[str, Any]:
    """What run.json records of a model passed from Python (it has no config entry)."""
    return {
        "class": f"{type(m).__module__}.{type(m).__qualname__}",
        "parameters": sum(p.numel() for p in m.parameters()),
    }


def _python_teacher_top1(teacher, comp: Components, loop, device, say) -> float | None:
    """Top-1 (%) on the evaluation split of a teacher passed from Python, or None (no such
    teacher, or a cached teacher whose model is not on ``device``)."""
    model = getattr(comp.teacher, "model", None)
    if teacher is None or model is None:
        return None
    p = next(model.parameters(), None)
    if p is None or p.device.type != device.type:
        return None
    top1 = evaluate(model, loop.test_loader, device, loop.amp)["top1"]
    say(f"teacher passed from Python: top-1 {top1:.2f} on the evaluation split")
    return top1


def _epoch_line(record: dict[str, Any], epoch: int, pre: int, epochs: int, best) -> str:
    phase = record.get("phase", "main")
    num = f"{record['epoch']}/{epochs}" if phase == "main" else f"{epoch + 1}/{pre}"
    line = f"{phase} epoch {num} loss {record.get('train/loss', float('nan')):.4f}"
    if "top1" in record:
        line += f" top1 {record['top1']:.2f} best {best['top1']:.2f}"
    return line


def build_teacher_cache(config: Any, overrides=(), quiet: bool = False) -> None:
    """Build (or find) the teacher-output cache the run ``config`` would read, and stop: nothing
    is trained and the run folder is not written. The Slurm launcher runs this once per cache
    group before the group's runs (:mod:`relkd.bench.slurm`)."""
    cfg = load_config(config, overrides)
    _check_train(cfg)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    comp = build_components(cfg, device, None, None)
    plan = _plan(cfg, comp.method, comp.teacher is not None, comp.train_ds)
    _build_loop(cfg, comp, plan, device, _say(quiet), cfg.train.progress and not quiet)
