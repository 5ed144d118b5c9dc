"""Stopping a run early, on request, at a point where its checkpoint is whole (preemption and
time limits under a scheduler).

A scheduler warns a job before it stops it: Slurm sends the signal of ``--signal`` (relkd's batch
scripts ask for ``B:USR1@90``: SIGUSR1 90 s before the time limit). :func:`install` turns that
signal into a request; the training loop then ends at the next *safe point*:

- the end of the current epoch, whose checkpoint is written as usual, when the rest of the
  epoch is expected to take less than ``RELKD_PREEMPT_FINISH_S`` seconds (the batch scripts set
  half the warning time; default 0), so little work is lost;
- otherwise right after the current step: the checkpoint of the last finished epoch is the one
  the run resumes from (the partial epoch is trained again, with the same data order and
  random draws, so the resumed run ends with the same bytes).

Either way :class:`Preempted` is raised (a KeyboardInterrupt, so nothing records the run as
failed); the CLI exits with :data:`EXIT_REQUEUE` (75), which the batch script answers with
``scontrol requeue``. With several processes (DDP) the request is agreed on at the end of each
epoch (one all-reduce), so every rank stops after the same epoch.
"""

from __future__ import annotations

import os
import signal
import time

#: Exit status of a relkd command stopped by a preemption request: "requeue me" (EX_TEMPFAIL).
EXIT_REQUEUE = 75

_requested_at: float | None = None


class Preempted(KeyboardInterrupt):
    """The run stopped on a preemption request; its checkpoint is whole."""

    signum = signal.SIGUSR1
    exit_code = EXIT_REQUEUE


def request(*_: object) -> None:
    """Ask the running training loop to stop at its next safe point (the signal handler)."""
    global _requested_at
    if _requested_at is None:
        _requested_at = time.monotonic()


def clear() -> None:
    global _requested_at
    _requested_at = None


def requested() -> bool:
    return _requested_at is not None


def install(signum: int = signal.SIGUSR1) -> None:
    """Make ``signum`` (default SIGUSR1) a preemption request in this process."""
    signal.signal(signum, request)


def finish_window_s() -> float:
    """Seconds the rest of an epoch may take and still be finished after a request."""
    try:
        return max(0.0, float(os.environ.get("RELKD_PREEMPT_FINISH_S") or 0.0))
    except ValueError:
        return 0.0


def stop_mid_epoch(steps_done: int, steps_total: int, elapsed_s: float) -> bool:
    """After a step: stop now (True) rather than finish the epoch, given the progress so far."""
    if _requested_at is None:
        return False
    left = (steps_total - steps_done) * elapsed_s / max(1, steps_done)
    return left > finish_window_s()
