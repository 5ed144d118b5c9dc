"""The frozen teacher: eval mode, no gradients, never wrapped in DDP, never checkpointed.

:class:`Teacher` runs the model online; :class:`CachedTeacher` answers from an exact
teacher-output cache (:mod:`relkd.data.teacher_cache`) by the augmentation the loader drew. Both
are called as ``teacher(images, **extras) -> ModelOutput``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from relkd.models.base import FeatureTap, ModelOutput
from relkd.registry import RelkdError

#: Batch extras a :class:`CachedTeacher` reads (``InMemoryLoader(return_aug=True)`` yields them).
CACHE_EXTRAS = ("index", "aug_offsets", "aug_flips")


class Teacher:
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


class CachedTeacher:
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
        missing = [k for k in CACHE_EXTRAS if extras.get(k) is None]
        if missing:
            raise RelkdError(
                f"the cached teacher needs the batch extras {list(CACHE_EXTRAS)} (missing "
                f"{missing}): use InMemoryLoader(return_aug=True)"
            )
        index = extras["index"]
        if index.shape[0] != images.shape[0]:
            raise RelkdError(
                f"cached teacher: {index.shape[0]} indices for a batch of {images.shape[0]} "
                "images (a method that changes the batch needs the online teacher)"
            )
        return self.cache.lookup(index, extras["aug_offsets"], extras["aug_flips"])
