"""The teacher sources: where the step gets the teacher's outputs from. Frozen: eval mode, no
gradients, never wrapped in DDP, never checkpointed.

Every source is a :class:`TeacherSource`, called as ``teacher(images, **extras) -> ModelOutput``,
told the epoch before it (:meth:`~TeacherSource.set_epoch`) and its end
(:meth:`~TeacherSource.end_epoch`), with the underlying model (or None) as ``model``:

- :class:`Teacher` runs the model online;
- :class:`CachedTeacher` answers from an exact teacher-output cache
  (:mod:`relkd.data.teacher_cache`) by the augmentation the loader drew;
- :class:`ReplayTeacher` answers from a replay store (:mod:`relkd.data.replay`) for the epochs
  it holds and runs (and records) the online teacher for the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from relkd.data.replay import REPLAY_EXTRAS
from relkd.models.base import FeatureTap, ModelOutput
from relkd.registry import RelkdError

if TYPE_CHECKING:
    from relkd.data.replay import EpochWriter, ReplayStore

#: Batch extras a :class:`CachedTeacher` reads (``InMemoryLoader(return_aug=True)`` yields them).
CACHE_EXTRAS = ("index", "aug_offsets", "aug_flips")


def _require_extras(extras: dict[str, Any], names: Sequence[str], kind: str, how: str) -> None:
    """One line when a stored-output teacher is called without the batch extras that key it."""
    missing = [k for k in names if extras.get(k) is None]
    if missing:
        raise RelkdError(
            f"the {kind} teacher needs the batch extras {list(names)} (missing {missing}): {how}"
        )


class TeacherSource:
    """The interface of a teacher source (the engine's loop calls nothing else).

    Attributes:
        model: the teacher model behind the source, or None (e.g. a cache built elsewhere).
    """

    model: nn.Module | None = None

    def __call__(self, images: torch.Tensor, **extras: Any) -> ModelOutput:
        """The teacher's outputs for the batch ``images`` [B, C, H, W] (logits [B, classes] and
        the tapped features), given the batch's extras."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch slot (0-based, pre-training phases included)."""

    def end_epoch(self) -> None:
        """Called after each epoch slot, once its last batch was stepped."""

    def to(self, *args: Any, **kwargs: Any) -> TeacherSource:
        return self


class Teacher(TeacherSource):
    """Frozen by construction. Deliberately *not* an ``nn.Module``: it cannot end up in the
    Distiller's parameters, state dict, optimizer or DDP wrapper by accident.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str] = ()) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tap = FeatureTap(self.model, taps)

    def to(self, *args, **kwargs) -> Teacher:
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, **extras: Any) -> ModelOutput:
        """The teacher's outputs on ``images``; batch ``extras`` are accepted and ignored."""
        # eval() again: a user's model.train() call elsewhere must not switch BN to batch stats.
        self.model.eval()
        return self.tap(images)


class CachedTeacher(TeacherSource):
    """The teacher's outputs looked up in a :class:`~relkd.data.teacher_cache.TeacherCache`.

    ``cached(images, index=, aug_offsets=, aug_flips=, **other) -> ModelOutput`` with logits
    fp32 [B, C] (and ``feats["pooled"]`` if cached) for the images the loader produced from
    split images ``index`` with that crop / flip. ``images`` is only used to check the batch
    size: no teacher forward pass runs. ``model`` (optional) is kept for reference only.
    """

    def __init__(self, cache: Any, model: nn.Module | None = None) -> None:
        self.cache = cache
        self.model = model

    def to(self, *args, **kwargs) -> CachedTeacher:
        return self

    def __call__(self, images: torch.Tensor, **extras: Any) -> ModelOutput:
        _require_extras(extras, CACHE_EXTRAS, "cached", "use InMemoryLoader(return_aug=True)")
        index = extras["index"]
        if index.shape[0] != images.shape[0]:
            raise RelkdError(
                f"cached teacher: {index.shape[0]} indices for a batch of {images.shape[0]} "
                "images (a method that changes the batch needs the online teacher)"
            )
        return self.cache.lookup(index, extras["aug_offsets"], extras["aug_flips"])


class ReplayTeacher(TeacherSource):
    """``teacher(images, index=, aug_params=, **other) -> ModelOutput`` from a :class:`~relkd.data.replay.ReplayStore`
    for stored epochs, else from the online ``teacher`` (written through when ``write``).

    Call :meth:`set_epoch` before and :meth:`end_epoch` after each epoch (the engine does).
    """

    def __init__(
        self,
        teacher: Callable[..., ModelOutput],
        store: ReplayStore,
        *,
        write: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.teacher, self.store, self.write = teacher, store, write
        self.model = getattr(teacher, "model", None)
        self.log = log or (lambda s: None)
        self.epoch = -1
        self._stored: dict[str, np.ndarray] | None = None
        self._writer: EpochWriter | None = None
        self.online_batches = 0  # teacher forward passes run (for logs and tests)

    def to(self, *args: Any, **kwargs: Any) -> ReplayTeacher:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.close()
        self.epoch = int(epoch)
        damaged = self.store.incomplete_epoch(epoch, remove=self.write)  # the writer rebuilds it
        if damaged is not None:
            self.log(f"teacher replay: {damaged}; recomputing the epoch online")
        if self.store.has_epoch(epoch):
            self._stored = self.store.read(epoch)
            self.log(f"teacher replay: epoch {epoch + 1} from the store, no teacher forward pass")
        else:
            self._stored = None
            self._writer = self.store.writer(epoch) if self.write else None
            what = (
                "writing it"
                if self._writer is not None
                else "not writing it (only one process writes)"
                if not self.write
                else "not writing it (another process is writing it)"
            )
            self.log(f"teacher replay: epoch {epoch + 1} not stored yet: online teacher, {what}")

    def _round(self, out: ModelOutput) -> ModelOutput:
        if self.store.dtype == "fp32":
            return out
        feats = {k: v.half().float() for k, v in out.feats.items()}
        return ModelOutput(out.logits.half().float(), feats)

    def __call__(self, images: torch.Tensor, **extras: Any) -> ModelOutput:
        _require_extras(extras, REPLAY_EXTRAS, "replay", "wrap the train set in ReplayCropDataset")
        index, params = extras["index"], extras["aug_params"]
        if self._stored is not None:
            idx = index.detach().cpu().numpy()
            rec = self._stored["params"][idx]
            if not np.array_equal(rec, params.detach().cpu().numpy()):
                bad = int(idx[np.flatnonzero((rec != params.cpu().numpy()).any(1))[0]])
                raise RelkdError(
                    f"teacher replay store {str(self.store.path)!r}, epoch {self.epoch + 1}: "
                    f"sample {bad} was recorded with another crop than the one drawn now (did "
                    "its image change?). Delete the store or point train.teacher_replay elsewhere"
                )
            dev = images.device
            logits = torch.from_numpy(self._stored["logits"][idx].astype(np.float32)).to(dev)
            feats = {
                t: torch.from_numpy(self._stored[t][idx].astype(np.float32)).to(dev)
                for t in self.store.taps
                if t != "logits"
            }
            return ModelOutput(logits, feats)
        out = self._round(self.teacher(images))
        self.online_batches += 1
        if self._writer is not None:
            self._writer.put(index, params, out)
        return out

    def end_epoch(self) -> None:
        """Commit the epoch being written (if every sample was seen), else discard it."""
        if self._writer is None:
            return
        w, self._writer = self._writer, None
        complete = bool(w.filled.all())
        if w.commit():
            self.log(f"teacher replay: stored epoch {self.epoch + 1} in {self.store.path}")
        elif complete:
            self.log(
                f"teacher replay: epoch {self.epoch + 1} not stored ("
                f"{self.store.epoch_dir(self.epoch)} could not be replaced)"
            )
        else:
            self.log(
                f"teacher replay: epoch {self.epoch + 1} not stored (not every sample was seen, "
                "e.g. train.max_steps_per_epoch)"
            )

    def close(self) -> None:
        """Discard an unfinished epoch (e.g. on an error)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
