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

Every file is written atomically; the rules (names, claims, resume) are in
:mod:`relkd.engine.rundir`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from relkd import distributed as D
from relkd.config import Config, load_run_config
from relkd.engine import preempt
from relkd.engine.build import (
    Components,
    build_components,
    build_optimizer,
    build_step,
    init_distributed,
    resolve_device,
    seed_everything,
)
from relkd.engine.ema import EMA
from relkd.engine.evaluation import evaluate
from relkd.engine.logger import RunLogger, warn_no_tensorboard
from relkd.engine.plan import (
    Plan,
    build_loaders,
    build_teacher_source,
    plan_for_config,
    unpack,
)
from relkd.engine.rundir import RunFolder, run_path, sigterm_as_interrupt, student_metadata
from relkd.engine.schedule import Schedule
from relkd.engine.state import TrainState
from relkd.engine.step import TrainStep
from relkd.engine.teacher import TeacherSource
from relkd.preflight import check_config
from relkd.progress import format_eta

__all__ = ["fit"]


def _say(quiet: bool):
    """Messages of the run (rank 0, not quiet) on stderr; nothing is written to the run folder."""

    def say(msg: str) -> None:
        if D.is_main() and not quiet:
            print(msg, file=sys.stderr, flush=True)

    return say


@dataclass
class _Loop:
    """What the epoch loop needs, built by :func:`_build_loop`."""

    cfg: Config
    comp: Components
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Any
    step: TrainStep
    teacher: TeacherSource | None  # what the step calls (online, cached or replayed)
    sched: Schedule
    lr: float
    train_loader: Any
    test_loader: Any
    phase_of: list[str]  # the pre-training phase of each leading epoch slot
    steps_per_epoch: int  # batches (micro-batches with train.grad_accum_steps > 1)
    device: torch.device
    progress: bool
    ema: EMA | None = None  # train.ema_decay: the averaged weights (evaluated and exported)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.cfg.train.grad_accum_steps)

    def averaged(self) -> AbstractContextManager[Any]:
        """The student with the weights that are evaluated and exported inside the block (the
        EMA when ``train.ema_decay`` is on)."""
        return (
            self.ema.swapped() if self.ema is not None else nullcontext(self.comp.distiller.student)
        )

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
    lr = cfg.optim.lr_by_student.get(cfg.student.name, cfg.optim.lr)
    params = [p for p in distiller.parameters() if p.requires_grad]
    opt = build_optimizer(cfg.optim, params, lr)
    train_loader, test_loader = build_loaders(
        plan, cfg, method, comp.train_ds, comp.test_ds, comp.info, device
    )
    tea, drop = build_teacher_source(
        plan, cfg, method, comp.teacher, train_loader, device, say, progress
    )
    sc, k = cfg.schedule, cfg.train.grad_accum_steps
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        # The cap counts optimizer steps: k micro-batches each (k = 1: batches, as before).
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch * k)
    sched = Schedule(  # counts optimizer steps
        name=sc.name, base_lr=lr, steps_per_epoch=math.ceil(steps_per_epoch / k),
        epochs=cfg.train.epochs,
        milestones=tuple(sc.milestones), gamma=sc.gamma, warmup_epochs=sc.warmup_epochs,
        min_lr=sc.min_lr, pct_start=sc.pct_start, div_factor=sc.div_factor,
        final_div_factor=sc.final_div_factor, cycle_momentum=sc.cycle_momentum,
        base_momentum=sc.base_momentum, max_momentum=sc.max_momentum,
    )  # fmt: skip
    step = build_step(
        model, distiller, opt, device=device, precision=cfg.train.precision,
        compile=cfg.train.compile, compile_mode=cfg.train.compile_mode, teacher=tea,
        drop_extras=drop, channels_last=cfg.train.channels_last, grad_clip=cfg.train.grad_clip,
        on_nonfinite=cfg.train.on_nonfinite, method_name=cfg.method.name, params=params,
        accum_steps=k,
    )  # fmt: skip
    ema = EMA(distiller.student, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema is not None:
        step.after_update.append(ema.update)
    # Pre-training phases (multi-stage methods) come first; epoch slots are numbered over all.
    phase_of = [name for name, n in method.phases() for _ in range(n)]
    return _Loop(
        cfg, comp, opt, step.scaler, step.amp, step, tea, sched, lr, train_loader, test_loader,
        phase_of, steps_per_epoch, device, progress, ema,
    )  # fmt: skip


def _train_epoch(loop: _Loop, epoch: int, step: int) -> tuple[dict[str, Any], int]:
    """One epoch slot (a pre-training phase or a main epoch): returns its metrics record
    (losses, lr, time; no evaluation) and the global optimizer step after it (with
    ``train.grad_accum_steps`` k, k batches make one optimizer step). Host reads happen only
    every ``train.log_every`` steps and at the end, which raises on a non-finite loss
    (``on_nonfinite=stop``) before anything of the epoch is evaluated or saved."""
    cfg, method, device = loop.cfg, loop.comp.method, loop.device
    pre, n = len(loop.phase_of), loop.steps_per_epoch
    # Re-seed from (seed, epoch): augmentation and dropout randomness of an epoch do not
    # depend on what ran before, which makes --resume continue exactly.
    seed_everything(cfg.train.seed * 1_000_003 + epoch)
    loop.train_loader.set_epoch(epoch)
    if loop.teacher is not None:  # e.g. teacher replay: this epoch's stored outputs
        loop.teacher.set_epoch(epoch)
    phase = loop.phase_of[epoch] if epoch < pre else "main"
    main_epoch = epoch - pre
    method.set_phase(phase)
    method.set_epoch(max(0, main_epoch))
    loop.comp.distiller.train()
    loop.step.start_epoch(epoch, step, n)
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
            loop.sched.apply(loop.opt, step - pre * loop.optimizer_steps_per_epoch)
        else:  # pre-training phases run at the base lr
            for g in loop.opt.param_groups:
                g["lr"] = loop.lr
        loop.step(x, y, extras)
        step += loop.step.stepped  # an accumulation group ended: one optimizer step
        if D.world_size() == 1 and preempt.stop_mid_epoch(i + 1, n, time.time() - t0):
            # The last epoch's checkpoint is whole: the run resumes from it, exactly.
            where = _slot_name(phase, epoch, pre, cfg.train.epochs)
            raise preempt.Preempted(f"stopped in {where} at step {i + 1}/{n}")
        if (i + 1) % cfg.train.log_every == 0 and i + 1 < n:
            stats = loop.step.read()  # the read point: progress and the non-finite check
            if bar is not None:
                bar.set_postfix(loss=f"{stats.means().get('loss', float('nan')):.3f}")
        if bar is not None:
            bar.update(1)
    stats = loop.step.read()
    if bar is not None:
        bar.close()
    if loop.teacher is not None:
        loop.teacher.end_epoch()
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
    # 1. Set up: the config (loaded and checked once, in the order of relkd.preflight), the
    # device, the run folder (checked on every rank, so none waits on a failed one).
    cfg = load_run_config(config, overrides, student, teacher)
    check_config(cfg, teacher=teacher, student=student)
    if cfg.train.tensorboard:
        warn_no_tensorboard()
    D.adopt_launcher_env()  # an `srun` task of a multi-task step: Slurm describes the group
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    run_dir = run_path(cfg)
    run = RunFolder(run_dir, RunLogger(run_dir, tensorboard=cfg.train.tensorboard, quiet=quiet))
    run.check(cfg, resume=resume, allow_change=allow_change)
    with sigterm_as_interrupt(), run:
        say = _say(quiet)
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # 2. Build every part (every check that needs data or models fails here); the run
        # folder is first written after this.
        comp = build_components(cfg, device, teacher, student)
        plan = plan_for_config(cfg, comp.method, comp.teacher is not None, comp.train_ds)
        progress = cfg.train.progress and D.is_main() and not quiet
        loop = _build_loop(cfg, comp, plan, device, say, progress)
        state = TrainState(comp.distiller, loop.opt, loop.scaler)
        if loop.ema is not None:
            state.extras["ema"] = loop.ema
        given = {
            k: _describe_module(m) for k, m in (("teacher", teacher), ("student", student)) if m
        }
        run.open(
            cfg, resume=resume, allow_change=allow_change, device=device,
            world_size=D.world_size(), into=state,
            extra={"modules_from_python": given} if given else None,
        )  # fmt: skip
        if state.epoch >= 0 and state.start_epoch >= loop.total_epochs:
            n = cfg.train.epochs
            say(
                f"{run.path} is already complete ({n} epoch{'' if n == 1 else 's'}): nothing to train"
            )
        run.write_json("plan.json", {**plan.to_dict(), "inputs": comp.inputs,
                                     "input_notes": comp.input_notes})  # fmt: skip
        for note in comp.input_notes:  # what relkd noticed about the models' inputs, once
            say(f"note: {note}")
        say(f"{plan.describe()}; {comp.inputs}")
        meta = student_metadata(cfg, comp.info, student)
        # The statistics the student itself saw when its own differ from the data's (a
        # pretrained model's, student.mean / std): a later run using it as a teacher applies them.
        hook = getattr(comp.distiller.student, "_relkd_input_norm", None)
        if hook is not None:
            meta["model_mean"], meta["model_std"] = (list(v) for v in hook[0].model)
        # A teacher passed from Python has no config or summary of its own: measure its top-1
        # once here so the run (and `relkd report`) can show it beside the student's.
        teacher_top1 = _python_teacher_top1(teacher, comp, loop, device, say)

        # 3. The loop: train an epoch slot, evaluate, checkpoint.
        t_start, first = time.time(), state.start_epoch
        for epoch in range(first, loop.total_epochs):
            record, state.step = _train_epoch(loop, epoch, state.step)
            _evaluate_epoch(loop, run, state, record, epoch, meta)
            state.epoch = epoch
            state.history.append(record)
            here = time.time() - t_start  # this session's epochs: the rate of what is left
            left = here / (epoch - first + 1) * (loop.total_epochs - epoch - 1)
            dt = record["epoch_time_s"]
            rate = f"{loop.steps_per_epoch / dt:.1f} step/s" if dt > 0 else "-"
            say(
                _epoch_line(record, epoch, len(loop.phase_of), cfg.train.epochs, state.best)
                + f" ({dt:.1f} s, {rate}, {format_eta(left)})"
            )
            run.end_epoch(record, state)  # the checkpoint first, then the metrics line
            if D.is_dist():
                torch.distributed.barrier()
            if epoch + 1 < loop.total_epochs and _stop_requested(device):
                pre = len(loop.phase_of)
                where = _slot_name(record.get("phase", "main"), epoch, pre, cfg.train.epochs)
                raise preempt.Preempted(f"stopped after {where} (checkpoint written)")

        # 4. Finish: the student's files and summary.json (last: the run finished).
        extra = eval_set(cfg, comp.test_ds)  # what every top-1 was measured on
        if teacher_top1 is not None:
            extra["teacher_top1"] = teacher_top1
        with loop.averaged() as student:
            summary = run.finish(student, cfg, state, t_start=t_start, metadata=meta, extra=extra)
        comp.distiller.tap.remove()
        return summary


def _stop_requested(device: torch.device) -> bool:
    """A preemption request (:mod:`relkd.engine.preempt`) seen by any rank, agreed by all."""
    if not D.is_dist():
        return preempt.requested()
    flag = torch.tensor([float(preempt.requested())], device=device)
    return bool(D.all_reduce_sum(flag).item() > 0)


def _evaluate_epoch(loop: _Loop, run: RunFolder, state: TrainState, record, epoch, meta) -> None:
    """Evaluate a main epoch slot when ``train.eval_every`` (or the last slot) says so: its
    top-1 / top-5 / test loss into ``record``; a new best is saved as ``student_best.pt``."""
    main_epoch = epoch - len(loop.phase_of)
    is_eval = (main_epoch + 1) % loop.cfg.train.eval_every == 0 or epoch + 1 == loop.total_epochs
    if "phase" in record or not is_eval:
        return
    with loop.averaged():
        student = loop.comp.distiller.student
        ev = evaluate(student, loop.test_loader, loop.device, loop.amp)
        record.update(ev)
        if ev["top1"] > state.best["top1"]:
            state.best = {"top1": ev["top1"], "epoch": main_epoch + 1}
            run.save_best(student, meta)
    record["best_top1"] = state.best["top1"]


def eval_set(cfg: Config, test_ds) -> dict[str, Any]:
    """``{"eval_split", "test_subset", "eval_images"}``: the split a run's top-1 is measured on
    (``"validation"`` with ``data.val_split``, else ``"test"``), its ``data.test_subset`` cap and
    the number of images evaluated."""
    return {
        "eval_split": "validation" if cfg.data.val_split else "test",
        "test_subset": cfg.data.test_subset,
        "eval_images": len(test_ds),
    }


def _describe_module(m: nn.Module) -> dict[str, Any]:
    """What run.json records of a model passed from Python (it has no config entry)."""
    return {
        "class": f"{type(m).__module__}.{type(m).__qualname__}",
        "parameters": sum(p.numel() for p in m.parameters()),
    }


def _python_teacher_top1(teacher, comp: Components, loop, device, say) -> float | None:
    """Top-1 (%) on the evaluation split of a teacher passed from Python, or None (no such
    teacher, or a cached teacher whose model is not on ``device``)."""
    model = comp.teacher.model if comp.teacher is not None else None
    if teacher is None or model is None:
        return None
    p = next(model.parameters(), None)
    if p is None or p.device.type != device.type:
        return None
    top1 = evaluate(model, loop.test_loader, device, loop.amp)["top1"]
    say(f"teacher passed from Python: top-1 {top1:.2f} on the evaluation split")
    return top1


def _slot_name(phase: str, epoch: int, pre: int, epochs: int) -> str:
    """How the progress lines and messages name epoch slot ``epoch`` (0-based, the ``pre``
    pre-training epochs first): ``main epoch E/EPOCHS`` or ``PHASE epoch k/PRE``."""
    num = f"{epoch - pre + 1}/{epochs}" if phase == "main" else f"{epoch + 1}/{pre}"
    return f"{phase} epoch {num}"


def _epoch_line(record: dict[str, Any], epoch: int, pre: int, epochs: int, best) -> str:
    phase = record.get("phase", "main")
    loss = record.get("train/loss", float("nan"))
    line = f"{_slot_name(phase, epoch, pre, epochs)} loss {loss:.4f}"
    if "top1" in record:
        line += f" top1 {record['top1']:.2f} best {best['top1']:.2f}"
    return line


def build_teacher_cache(config: Any, overrides=(), quiet: bool = False) -> None:
    """Build (or find) the teacher-output cache the run ``config`` would read, and stop: nothing
    is trained and the run folder is not written. The Slurm launcher runs this once per cache
    group before the group's runs (:mod:`relkd.bench.slurm`)."""
    cfg = load_run_config(config, overrides, None, None)
    check_config(cfg)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    comp = build_components(cfg, device, None, None)
    plan = plan_for_config(cfg, comp.method, comp.teacher is not None, comp.train_ds)
    _build_loop(cfg, comp, plan, device, _say(quiet), cfg.train.progress and not quiet)
