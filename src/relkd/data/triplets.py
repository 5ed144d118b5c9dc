"""Triplet sampling for CORSD (Yu et al., arXiv 2305.00918): anchor, positive, negative."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from relkd.data.wrappers import get_targets
from relkd.registry import RelkdError


class TripletDataset(Dataset):
    """Wraps a labelled data set so item i is ``(x_i, y_i, extras)`` with extras
    ``{"pos": x_p, "neg": x_n, "pos_target": y_p, "neg_target": y_n}``.

    x_p is a random other sample of class y_i (x_i itself only when it is alone in its class);
    x_n a random sample of a uniformly random other class present in the data set (the official
    CORSD sampler: a random class != y_i, then a random member). Extras the wrapped data set
    returns for the anchor (a third dict element) are kept.

    Randomness: with ``seed=None`` (what the engine uses) torch's global RNG, which the engine
    reseeds every epoch and a DataLoader seeds per worker from its generator, so runs are
    reproducible. With an int ``seed`` the draw for item i is a function of (seed, epoch, i) only
    (call :meth:`set_epoch` to get new triplets each epoch), independent of workers and order.

    Labels are read once (``ds.targets`` when present, see :func:`relkd.data.get_targets`).
    ``len`` is the wrapped set's: one epoch = one triplet per sample, anchors in loader order.
    """

    def __init__(self, ds: Dataset, seed: int | None = None) -> None:
        self.dataset, self.seed, self.epoch = ds, seed, 0
        targets = get_targets(ds)
        self.labels = torch.as_tensor(targets, dtype=torch.long)
        self.classes_present, counts = np.unique(targets, return_counts=True)
        if len(self.classes_present) < 2:
            raise RelkdError(
                f"TripletDataset needs >= 2 classes for negatives; the data set has "
                f"{len(self.classes_present)} ({self.classes_present.tolist()})"
            )
        # Members of each present class, grouped: class j owns order[start[j] : start[j] + count[j]].
        self._order = torch.as_tensor(np.argsort(targets, kind="stable"), dtype=torch.long)
        self._count = torch.as_tensor(counts, dtype=torch.long)
        self._start = torch.cumsum(self._count, 0) - self._count
        self._class_pos = {int(c): j for j, c in enumerate(self.classes_present)}
        # Position of each sample inside its class group (to skip the anchor itself).
        self._rank = torch.empty_like(self._order)
        self._rank[self._order] = torch.arange(len(targets)) - self._start.repeat_interleave(
            self._count
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _member(self, j: int, r: int) -> int:
        return int(self._order[int(self._start[j]) + r])

    def sample_indices(self, i: int) -> tuple[int, int]:
        """Random (positive, negative) sample indices for anchor i."""
        g = None
        if self.seed is not None:
            key = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**63
            g = torch.Generator().manual_seed(key)
        j = self._class_pos[int(self.labels[i])]
        n = int(self._count[j])
        if n > 1:
            r = int(torch.randint(n - 1, (), generator=g))
            r += int(r >= int(self._rank[i]))  # skip the anchor itself
        else:
            r = 0
        pos = self._member(j, r)
        k = int(torch.randint(len(self.classes_present) - 1, (), generator=g))
        k += int(k >= j)  # skip the anchor's class
        neg = self._member(k, int(torch.randint(int(self._count[k]), (), generator=g)))
        return pos, neg

    def __getitem__(self, i: int) -> tuple[Any, Any, dict[str, Any]]:
        pos, neg = self.sample_indices(i)
        item = self.dataset[i]
        xp, yp = self.dataset[pos][:2]
        xn, yn = self.dataset[neg][:2]
        extras: dict[str, Any] = dict(item[2]) if len(item) > 2 else {}
        extras.update(pos=xp, neg=xn, pos_target=yp, neg_target=yn)
        return item[0], item[1], extras

    def __getattr__(self, name: str) -> Any:
        # Forward attributes (classes, mean, ...) to the wrapped data set.
        # Never dunders: DataLoader looks for ``__getitems__`` and would fetch the *inner*
        # items (a Subset has one), silently dropping this wrapper's extras.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
