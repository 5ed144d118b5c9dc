"""The engine's one training step, shared by :func:`relkd.engine.trainer.fit`, ``relkd bench
speed`` and the linear probe.

One call of a :class:`TrainStep` does, in this order::

    [skip mode: snapshot the state]
    forward half (forward_loss, also relkd.Distillation's and the registry tests'):
      prepare_batch(x, y, extras)        the method's batch hook (e.g. CORSD's triplets -> 3B)
      x -> channels_last                 if asked
      t_out = teacher(x, **extras)       online teacher, exact cache or replay (no autocast)
      drop the teacher-only extras       (index / aug_offsets / aug_flips of a cached teacher)
      with amp(): _, terms = model(x, y, t_out, **extras)
      loss = sum(terms)                  fp32
    update half (TrainStep.update):
      non-finite handling                on the device (see below)
      zero_grad; backward: scaler.scale(loss).backward()
      optimizer_step: [unscale_; clip_grad_norm_]; scaler.step; scaler.update
      after_update hooks                 (e.g. the EMA of the weights)

With ``accum_steps`` k (``train.grad_accum_steps``) the calls form groups of k micro-batches:
the gradient is zeroed at a group's first, each loss divided by the group's size, the optimizer
steps at its last (``TrainStep.stepped``), and under DDP the others run under ``no_sync``.

No host-device synchronisation happens in the step (fp32 / bf16): the loss terms are summed on
the device into one float64 vector and only :meth:`TrainStep.read` copies them to the host (one
``tolist`` per call; the engine reads every ``train.log_every`` steps and at the epoch end).
Summing in float64 on the device gives bit-identical sums to adding the Python floats of the
fp32 terms one by one (both are IEEE double additions of exactly representable values).

Non-finite losses (``on_nonfinite``):

- ``"stop"``: the step records the first bad step of the window and its terms on the device;
  :meth:`TrainStep.read` raises a :class:`~relkd.registry.RelkdError` naming the epoch, step,
  method and terms. The model may have taken bad steps between the bad batch and the read; the
  engine reads before any evaluation or checkpoint of that epoch, so nothing of them is kept.
- ``"skip"``: before the forward pass the step copies the parameters, buffers (BatchNorm
  running statistics, memory banks) and optimizer state of ``state_module`` / the optimizer
  (foreach copies on the device, so skip mode costs one extra copy of the model and optimizer
  state in memory and time); after the optimizer step it restores them with ``torch.where``
  under the on-device bad flag. The model is then exactly as before the bad batch.
  Optimizer state that did not exist before the step (the first step) is restored to zeros,
  which is what SGD (dampening 0) and Adam / AdamW start from. Under DDP the bad flag is
  reduced over ranks (one all-reduce, no host read), so all ranks skip together.

fp16 with an enabled ``GradScaler``: the scaler itself reads its ``found_inf`` flag on the host
in ``scaler.step`` (a sync per step that torch's AMP design needs), so there the step checks the
loss on the host as well (no extra cost) and a skipped batch runs no backward and no scaler
update; its forward pass's buffer writes (BatchNorm statistics) are undone from the snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from relkd import distributed as D
from relkd.registry import RelkdError

#: ``on_nonfinite`` values.
NONFINITE = ("stop", "skip")


class ForwardOutput(NamedTuple):
    """What the forward half of a step returns.

    Attributes:
        logits: the student's logits [B', C] (B' = the batch after ``prepare_batch``: 3B for
            CORSD's triplets, B otherwise).
        targets: the labels [B'] matching ``logits``.
        terms: name -> already-weighted scalar loss (``"ce"``: cross-entropy with the labels).
        loss: fp32 scalar, the sum of ``terms`` in their order.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    terms: dict[str, torch.Tensor]
    loss: torch.Tensor


def forward_loss(
    model: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
    x: torch.Tensor,
    y: torch.Tensor,
    extras: dict[str, Any] | None = None,
    *,
    teacher: Callable[..., Any] | None = None,
    prepare_batch: Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] | None = None,
    channels_last: bool = False,
    drop_extras: Collection[str] = (),
    amp: Callable[[], AbstractContextManager[Any]] = nullcontext,
    method_name: str = "",
) -> ForwardOutput:
    """The forward half of the engine's step, shared by :class:`TrainStep`,
    :class:`relkd.Distillation` and the method registry's tests::

        x, y, extras = prepare_batch(x, y, extras)      the method's batch hook
        x -> channels_last                              if asked
        t_out = teacher(x, **extras)                    no autocast (a teacher source)
        drop the teacher-only extras
        with amp(): logits, terms = model(x, y, t_out, **extras)
        loss = sum of the terms in fp32

    ``model``: the :class:`~relkd.engine.distiller.Distiller` (or its DDP / compiled wrapper).
    Raises :class:`~relkd.registry.RelkdError` when the method returned no terms.
    """
    extras = dict(extras or {})
    if prepare_batch is not None:
        x, y, extras = prepare_batch(x, y, extras)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t_out = teacher(x, **extras) if teacher is not None else None
    if drop_extras:
        extras = {k: v for k, v in extras.items() if k not in drop_extras}
    with amp():
        logits, terms = model(x, y, t_out, **extras)
    loss = sum(t.float() for t in terms.values())
    if not torch.is_tensor(loss):  # no terms at all
        raise RelkdError(f"method {method_name!r} returned no loss terms")
    return ForwardOutput(logits, y, terms, loss)


@dataclass
class StepStats:
    """What :meth:`TrainStep.read` returns: the host copy of the on-device sums.

    ``sums`` maps every term name and ``"loss"`` (their fp32 sum) to the sum over the good
    steps since :meth:`TrainStep.start_epoch`; ``steps`` is the number of good steps, ``skipped``
    the number of skipped (non-finite, ``on_nonfinite="skip"``) steps.
    """

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0

    def means(self) -> dict[str, float]:
        """Per-step means of the sums (``sum / max(1, steps)``)."""
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


class TrainStep:
    """One optimizer step: teacher -> method -> loss -> non-finite handling -> backward ->
    optimizer. Plain objects in, no config.

    Args:
        model: ``model(x, y, teacher_out, **extras) -> (logits, terms)``: the
            :class:`~relkd.engine.distiller.Distiller`, its DDP wrapper or a compiled one.
        optimizer: stepped once per call.
        params: the parameters whose gradients ``grad_clip`` clips (default: the optimizer's).
        state_module: the module whose parameters and buffers ``on_nonfinite="skip"`` restores
            (the Distiller, not its DDP / compiled wrapper; default: ``model``).
        scaler: a ``torch.amp.GradScaler`` (enabled for fp16 only); None: no scaling.
        amp: a zero-argument callable returning the autocast context of the forward pass.
        teacher: ``teacher(x, **extras) -> ModelOutput`` (online, cached or replayed), or None.
        drop_extras: batch extras only the teacher reads, removed before the method.
        prepare_batch: the method's ``prepare_batch(x, y, extras) -> (x, y, extras)``, or None.
        channels_last: convert the input to channels-last memory format.
        grad_clip: clip the gradient norm to this value (None / 0: no clipping).
        on_nonfinite: ``"stop"`` or ``"skip"`` (see the module docstring).
        method_name: the method's name for error messages.

    Use::

        step = TrainStep(distiller, opt, scaler=scaler, teacher=tea, ...)
        step.start_epoch(epoch, global_step)       # resets the sums
        for x, y, extras in batches:
            step(x, y, extras)                     # no host read
        stats = step.read()                        # one host read; raises for "stop"
    """

    def __init__(
        self,
        model: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]],
        optimizer: torch.optim.Optimizer,
        *,
        params: Sequence[torch.Tensor] | None = None,
        state_module: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        amp: Callable[[], AbstractContextManager[Any]] = nullcontext,
        teacher: Callable[..., Any] | None = None,
        drop_extras: Collection[str] = (),
        prepare_batch: Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
        | None = None,
        channels_last: bool = False,
        grad_clip: float | None = None,
        on_nonfinite: str = "stop",
        method_name: str = "",
        accum_steps: int = 1,
        ddp: Any = None,
    ) -> None:
        if on_nonfinite not in NONFINITE:
            raise RelkdError(
                f"train.on_nonfinite={on_nonfinite!r} is unknown; valid: {', '.join(NONFINITE)}"
            )
        if grad_clip is not None and grad_clip < 0:
            raise RelkdError(f"train.grad_clip={grad_clip} must be positive (or unset)")
        if accum_steps < 1:
            raise RelkdError(f"train.grad_accum_steps={accum_steps} must be >= 1")
        if accum_steps > 1 and on_nonfinite == "skip":
            raise RelkdError(
                f"train.grad_accum_steps={accum_steps} with train.on_nonfinite=skip is not "
                "supported (a skipped micro-batch would leave a partial gradient): use stop"
            )
        self.model = model
        self.optimizer = optimizer
        self.params = (
            list(params)
            if params is not None
            else [p for g in optimizer.param_groups for p in g["params"]]
        )
        if state_module is None and isinstance(model, nn.Module):
            state_module = model
        self.state_module = state_module
        self.scaler = scaler
        self.amp = amp
        self.teacher = teacher
        self.drop_extras = frozenset(drop_extras)
        self.prepare_batch = prepare_batch
        self.channels_last = channels_last
        self.grad_clip = grad_clip
        self.on_nonfinite = on_nonfinite
        self.method_name = method_name
        self._host_check = scaler is not None and scaler.is_enabled()
        if on_nonfinite == "skip" and not self._host_check and state_module is None:
            raise RelkdError("on_nonfinite='skip' needs the state_module to restore")
        self._snap: list[torch.Tensor] | None = None
        #: micro-batches per optimizer step (gradient accumulation); ``ddp``: the
        #: DistributedDataParallel wrapper whose gradient all-reduce the first k-1 skip.
        self.accum_steps, self.ddp = int(accum_steps), ddp
        #: named seam: called after every optimizer step (e.g. an EMA of the weights).
        self.after_update: list[Callable[[], None]] = []
        #: whether the last call ended an accumulation group (took an optimizer step).
        self.stepped = False
        self.start_epoch(0, 0)

    # -- window bookkeeping -------------------------------------------------------------------

    def start_epoch(self, epoch: int, global_step: int, batches: int | None = None) -> None:
        """Reset the sums; ``epoch`` (0-based) and ``global_step`` (of the next call) label a
        non-finite error. ``batches``: the calls this epoch will make, so that with gradient
        accumulation the last group of the epoch is sized right (default: full groups)."""
        self.epoch, self.global_step0 = int(epoch), int(global_step)
        self.batches = batches
        self.calls = 0  # steps since start_epoch (a host counter, no sync)
        self._keys: list[str] = []
        self._acc: torch.Tensor | None = None  # float64 [len(keys) + 1]: sums..., good steps
        self._first_bad: torch.Tensor | None = None  # int64 []: first bad call, -1 none
        self._bad_vals: torch.Tensor | None = None  # float64 [len(keys) + 1] at that call
        self._host_skipped = 0
        self._host_bad: tuple[int, dict[str, float]] | None = None

    def _grow(self, names: list[str], device: torch.device) -> None:
        # Term names are Python-side: a new name (first step, or a term appearing later) grows
        # the accumulators without a host read.
        new = [k for k in names if k not in self._keys]
        if self._acc is None:
            self._consts = (
                torch.zeros((), dtype=torch.float64, device=device),
                torch.ones((), dtype=torch.float64, device=device),
            )
            self._acc = torch.zeros(1, dtype=torch.float64, device=device)
            self._bad_vals = torch.zeros(1, dtype=torch.float64, device=device)
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        if new:
            z = torch.zeros(len(new), dtype=torch.float64, device=device)
            k = len(self._keys)
            self._acc = torch.cat([self._acc[:k], z, self._acc[k:]])
            self._bad_vals = torch.cat([self._bad_vals[:k], z, self._bad_vals[k:]])
            self._keys += new

    # -- the step -----------------------------------------------------------------------------

    def _state_tensors(self) -> list[torch.Tensor]:
        mod = self.state_module
        assert mod is not None
        ts = [t for t in mod.parameters()] + [b for b in mod.buffers()]
        for p in self.params:
            st = self.optimizer.state.get(p)
            if st:
                ts += [v for v in st.values() if torch.is_tensor(v)]
        return ts

    def _snapshot(self) -> list[torch.Tensor]:
        ts = self._state_tensors()
        snap = self._snap
        if (
            snap is None
            or len(snap) != len(ts)
            or any(
                s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
                for s, t in zip(snap, ts)
            )
        ):
            snap = [torch.empty_like(t) for t in ts]
        with torch.no_grad():
            torch._foreach_copy_(snap, [t.detach() for t in ts])
        self._snap = snap
        return ts

    def _restore(self, before: list[torch.Tensor], bad: torch.Tensor) -> None:
        snap = self._snap
        assert snap is not None
        now = self._state_tensors()
        saved = {id(t): s for t, s in zip(before, snap)}
        with torch.no_grad():
            for t in now:
                s = saved.get(id(t))
                # State the optimizer created in this step had no "before": fresh state is zeros.
                old = s if s is not None else torch.zeros_like(t)
                t.copy_(torch.where(bad, old, t))

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, extras: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """One optimizer step on the batch ``x`` [B, ...], ``y`` [B] (on the device). Returns the
        detached fp32 loss (a device scalar; reading it is a host sync)."""
        try:
            return self._step(x, y, extras)
        except RelkdError:
            raise
        except Exception as e:
            # A step after an unread non-finite one may fail on the NaNs it inherited (e.g. a
            # sampler given NaN weights): name the first bad step rather than the symptom.
            if self._first_bad is not None and int(self._first_bad) >= 0:
                self.read()
            raise e

    def _step(
        self, x: torch.Tensor, y: torch.Tensor, extras: dict[str, Any] | None
    ) -> torch.Tensor:
        skip = self.on_nonfinite == "skip"
        # Skip mode: the state before this step (nothing of the forward half writes the student,
        # the method or the optimizer before the model's own forward pass).
        before = self._snapshot() if skip else None
        first, last, size = self._group(self.calls)
        # Gradient accumulation under DDP: no all-reduce until the group's last micro-batch.
        sync = nullcontext() if last or self.ddp is None else self.ddp.no_sync()
        with sync:
            out = self.forward(x, y, extras)
            return self.update(out.terms, out.loss, before, first=first, last=last, size=size)

    def _group(self, call: int) -> tuple[bool, bool, int]:
        """``(first, last, size)`` of the accumulation group of call ``call`` of the epoch."""
        k = self.accum_steps
        if k == 1:
            return True, True, 1
        start = call - call % k
        size = k if self.batches is None else max(1, min(k, self.batches - start))
        return call % k == 0, call % k == size - 1, size

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, extras: dict[str, Any] | None = None
    ) -> ForwardOutput:
        """The forward half of the step (no gradient step): see :func:`forward_loss`."""
        return forward_loss(
            self.model, x, y, extras, teacher=self.teacher, prepare_batch=self.prepare_batch,
            channels_last=self.channels_last, drop_extras=self.drop_extras, amp=self.amp,
            method_name=self.method_name,
        )  # fmt: skip

    def update(
        self,
        terms: dict[str, torch.Tensor],
        loss: torch.Tensor,
        before: list[torch.Tensor] | None = None,
        *,
        first: bool = True,
        last: bool = True,
        size: int = 1,
    ) -> torch.Tensor:
        """The update half: the non-finite policy, ``zero_grad``, backward (scaled), clipping,
        the optimizer step, the ``after_update`` hooks and the on-device bookkeeping of
        ``terms`` / ``loss``. ``before``: the skip-mode snapshot taken before the forward half.
        Gradient accumulation: ``first`` / ``last`` micro-batch of a group of ``size`` (the
        gradient is zeroed at the first, each loss divided by ``size``, the optimizer steps at
        the last). Returns the detached loss."""
        skip = before is not None
        call = self.calls
        self.calls += 1
        self.stepped = last
        if self._host_check and not torch.isfinite(loss):  # fp16: the scaler syncs anyway
            if skip:
                self._host_skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                assert before is not None  # the forward pass wrote BN statistics: undo them
                self._restore(before, torch.ones((), dtype=torch.bool, device=loss.device))
                return loss.detach()
            if self._host_bad is None:
                self._host_bad = (call, {k: float(v.detach()) for k, v in terms.items()})
            self._raise(*self._host_bad)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss if size == 1 else loss / size)
        if last:
            self.optimizer_step()
        self._account(call, terms, loss, before)
        if last:
            for hook in self.after_update:
                hook()
        return loss.detach()

    # Named seams of the update half (what loops add: accumulation, EMA) ------------------------

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (scaled by the ``GradScaler`` when there is one)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        """Unscale and clip (``grad_clip``), step the optimizer, update the scaler."""
        scaler = self.scaler
        if self.grad_clip:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def _account(
        self,
        call: int,
        terms: dict[str, torch.Tensor],
        loss: torch.Tensor,
        before: list[torch.Tensor] | None,
    ) -> None:
        """Add this step's terms to the on-device sums; flag / undo a non-finite step."""
        with torch.no_grad():
            self._grow([*terms, "loss"], loss.device)
            acc = self._acc
            assert acc is not None and self._bad_vals is not None
            assert self._first_bad is not None
            zero, one = self._consts
            vals = [terms[k].detach().double() if k in terms else zero for k in self._keys]
            vals[self._keys.index("loss")] = loss.detach().double()
            v = torch.stack([*vals, one])
            good = torch.isfinite(loss)
            if before is not None and D.is_dist() and not self._host_check:
                # All ranks skip together: DDP has averaged the bad rank's gradients into all.
                g = good.to(torch.int32)
                torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.MIN)
                good = g.bool()
            if self._host_check:
                acc.add_(v)  # bad steps never get here
                return
            acc.add_(torch.where(good, v, torch.zeros_like(v)))
            if before is not None:  # skip
                self._restore(before, ~good)
            else:
                first = (~good) & (self._first_bad < 0)
                self._first_bad = torch.where(first, call, self._first_bad)
                self._bad_vals = torch.where(first, v, self._bad_vals)

    # -- the read point -----------------------------------------------------------------------

    def read(self) -> StepStats:
        """The sums since :meth:`start_epoch`, read to the host in one copy. With
        ``on_nonfinite="stop"`` raises if a step of the window had a non-finite loss."""
        if self._host_bad is not None:
            self._raise(*self._host_bad)
        if self._acc is None:
            return StepStats(skipped=self._host_skipped)
        assert self._first_bad is not None and self._bad_vals is not None
        vec = torch.cat([self._acc, self._bad_vals, self._first_bad.double().view(1)]).tolist()
        n = len(self._keys)
        acc, bad_vals, first_bad = vec[: n + 1], vec[n + 1 : 2 * n + 2], int(vec[-1])
        if first_bad >= 0:
            names = [k for k in self._keys if k != "loss"]
            self._raise(first_bad, {k: bad_vals[self._keys.index(k)] for k in names})
        steps = int(acc[n])
        return StepStats(
            sums=dict(zip(self._keys, acc[:n])),
            steps=steps,
            skipped=self.calls - steps if not self._host_check else self._host_skipped,
        )

    def _raise(self, call: int, terms: dict[str, float]) -> None:
        detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise RelkdError(
            f"non-finite loss at epoch {self.epoch + 1} step {call} (global step "
            f"{self.global_step0 + call}) with method {self.method_name!r}: {detail}. Lower the "
            "lr, use fp32, or set train.on_nonfinite=skip"
        )
