"""What a run's checkpoint holds and what its summary says: :class:`TrainState`.

The live objects (the Distiller, the optimizer, the ``GradScaler`` and any further stateful
part a loop feature adds, e.g. an EMA of the weights, under ``extras``) and the loop's counters
(last finished epoch slot, optimizer step, the metrics history and the best top-1 so far). The
run folder (:class:`relkd.engine.rundir.RunFolder`) saves :meth:`TrainState.state_dict` at the
end of every epoch and loads a resumed checkpoint with :meth:`TrainState.load`; a feature that
needs its own state registers it in ``extras`` and nothing else changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.registry import RelkdError

#: The keys of a checkpoint every relkd version writes, in this order.
CORE_KEYS = ("distiller", "optimizer", "scaler", "epoch", "step", "history", "best")


def _no_best() -> dict[str, Any]:
    return {"top1": -1.0, "epoch": -1}


@dataclass
class TrainState:
    """The state of a training run (see the module docstring).

    Attributes:
        distiller / optimizer / scaler: the live objects (restored in place on resume).
        extras: further stateful objects by checkpoint key (``state_dict`` /
            ``load_state_dict``), saved after the core keys.
        epoch: the last finished epoch slot (-1: none; pre-training phases count).
        step: optimizer steps taken.
        history: one metrics record per finished epoch slot.
        best: ``{"top1", "epoch"}`` of the best evaluated main epoch so far.
    """

    distiller: Any
    optimizer: Any
    scaler: Any
    extras: dict[str, Any] = field(default_factory=dict)
    epoch: int = -1
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=_no_best)

    @property
    def start_epoch(self) -> int:
        """The epoch slot to run next."""
        return self.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: the core keys (:data:`CORE_KEYS`) then one per extra."""
        sd = {
            "distiller": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "history": self.history, "best": self.best,
        }  # fmt: skip
        sd.update({k: v.state_dict() for k, v in self.extras.items()})
        return sd

    def load(self, loaded: dict[str, Any], path: Path) -> None:
        """Continue from the checkpoint ``loaded`` (read from ``path``): the live objects in
        place, then the counters. A checkpoint of another model or class count is one line
        naming the first mismatches."""
        try:
            self.distiller.load_state_dict(loaded["distiller"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RelkdError(
                f"checkpoint {str(path)!r} does not fit this run's model (another "
                f"student, method or class count?): {_first_mismatches(e)}"
            ) from None
        try:
            self.optimizer.load_state_dict(loaded["optimizer"])
            self.scaler.load_state_dict(loaded["scaler"])
            for k, v in self.extras.items():
                if k not in loaded:
                    raise KeyError(f"the checkpoint has no {k!r}")
                v.load_state_dict(loaded[k])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RelkdError(
                f"checkpoint {str(path)!r} does not fit this run's optimizer: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None
        self.epoch = int(loaded["epoch"])
        self.step = int(loaded["step"])
        self.history = list(loaded.get("history", []))
        self.best = dict(loaded.get("best", _no_best()))

    def summary(self, cfg: Any, t_start: float, run_dir: Path) -> dict[str, Any]:
        """``summary.json`` of the run: best / last top-1, what ran, the times."""
        last = next((r for r in reversed(self.history) if "top1" in r), {})
        return {
            "best_top1": self.best["top1"],
            "best_epoch": self.best["epoch"],
            "last_top1": last.get("top1", float("nan")),
            "last_top5": last.get("top5", float("nan")),
            "epochs": cfg.train.epochs,
            "method": cfg.method.name,
            "student": cfg.student.name,
            "teacher": cfg.teacher.name if cfg.teacher else None,
            "seed": cfg.train.seed,
            # Training time of every epoch of the run, earlier sessions included (a resumed
            # run's history holds them); evaluation excluded.
            "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in self.history),
            "session_time_s": time.time() - t_start,
            "run_dir": str(run_dir),
        }


def _first_mismatches(e: BaseException, n: int = 2) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    detail = [x if len(x) <= 240 else x[:237] + "..." for x in lines]
    detail = [x for x in detail if not x.startswith("Error(s) in loading")]
    out = "; ".join(detail[:n]) + (f"; ... ({len(detail) - n} more)" if len(detail) > n else "")
    return out or type(e).__name__
