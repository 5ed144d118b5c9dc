"""Data set wrappers: per-sample extras (the sample index for memory banks), collation, subsets
and the stratified validation hold-out (:func:`split_train_val`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset
from torch.utils.data._utils.collate import default_collate

from relkd.registry import RelkdError

Sample = tuple[Any, Any] | tuple[Any, Any, dict[str, Any]]


class IndexedDataset(Dataset):
    """Wraps ``ds`` so item i is ``(img, target, {"index": i})``.

    Extras the wrapped data set already returns (a third dict element) are kept and ``"index"``
    is added. Memory-bank methods (CRD, RRD) receive the collated ``index`` [B] as a keyword
    argument of ``distill_loss``.
    """

    def __init__(self, ds: Dataset) -> None:
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, dict[str, Any]]:
        item = self.dataset[i]
        extras: dict[str, Any] = dict(item[2]) if len(item) > 2 else {}
        extras["index"] = i
        return item[0], item[1], extras

    def __getattr__(self, name: str) -> Any:
        # Forward attributes (classes, targets, mean, ...) to the wrapped data set.
        # Never dunders: DataLoader looks for ``__getitems__`` and would fetch the *inner*
        # items (a Subset has one), silently dropping this wrapper's extras.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_with_extras(batch: Sequence[Sample]) -> Any:
    """Collate ``(img, target)`` or ``(img, target, dict)`` samples.

    Returns ``(x [B, ...], y [B])`` or ``(x, y, {key: stacked [B, ...]})``; each extras value is
    collated with torch's ``default_collate`` (ints -> int64 [B], tensors -> stacked).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = {len(s) for s in batch}
    if len(lengths) != 1:
        raise ValueError(f"samples of mixed lengths {sorted(lengths)} in one batch")
    x = default_collate([s[0] for s in batch])
    y = default_collate([s[1] for s in batch])
    if lengths == {2}:
        return x, y
    keys = set(batch[0][2])
    if any(set(s[2]) != keys for s in batch):
        raise ValueError("samples of one batch carry different extras keys")
    extras = {k: default_collate([s[2][k] for s in batch]) for k in sorted(keys)}
    return x, y, extras


def get_targets(ds: Dataset) -> np.ndarray:
    """The labels of every sample as int64 [N], without decoding images when possible."""
    targets = getattr(ds, "targets", None)
    if targets is not None and not isinstance(ds, Subset):
        return np.asarray(targets, dtype=np.int64)
    if isinstance(ds, Subset):
        return get_targets(ds.dataset)[np.asarray(list(ds.indices), dtype=np.int64)]
    inner = getattr(ds, "dataset", None)
    if inner is not None and len(inner) == len(ds):  # pass-through wrapper
        return get_targets(inner)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)  # slow path


def take_subset(ds: Dataset, n: int, seed: int = 0, *, stratified: bool = True) -> Subset:
    """``n`` samples of ``ds`` chosen reproducibly from ``seed``.

    stratified: each class keeps its share of ``n`` (floor of n * count / N, the remainder going
    to the classes with the largest fractional parts), so class balance is preserved. Otherwise a
    uniformly random subset. The returned indices are sorted.
    """
    total = len(ds)  # type: ignore[arg-type]
    if not 0 < n <= total:
        raise RelkdError(f"take_subset: n must be in 1..{total} (the data set size), got {n}")
    rng = np.random.default_rng(seed)
    if not stratified:
        idx = rng.choice(total, size=n, replace=False)
        return Subset(ds, sorted(int(i) for i in idx))
    targets = get_targets(ds)
    classes, counts = np.unique(targets, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    rest = n - int(take.sum())
    if rest:
        order = np.argsort(-(quota - take), kind="stable")[:rest]
        take[order] += 1
    chosen: list[int] = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(targets == c)
        chosen.extend(int(i) for i in rng.choice(members, size=int(k), replace=False))
    return Subset(ds, sorted(chosen))


def _eval_view(train: Dataset, test: Dataset) -> Dataset:
    """A shallow copy of ``train`` that serves its images as ``test`` does: the test transform,
    no augmentation (the data are shared, not copied)."""
    if not hasattr(train, "transform") or not hasattr(test, "transform"):
        raise RelkdError(
            f"data.val_split needs data sets with a 'transform' attribute; "
            f"{type(train).__name__} has none"
        )
    view = copy.copy(train)
    view.transform = test.transform
    for attr, off in (("augment", False), ("padding", 0), ("flip", False)):
        if hasattr(view, attr):
            setattr(view, attr, off)
    return view


def split_train_val(
    train: Dataset, test: Dataset, fraction: float, seed: int = 0
) -> tuple[Subset, Subset]:
    """``(train minus held-out, held-out)``: a stratified hold-out of ``fraction`` of ``train``.

    Each class gives its share of ``round(fraction * N)`` samples (largest remainders first, as
    :func:`~relkd.data.wrappers.take_subset`), drawn from ``seed`` alone, so the split is the
    same for every training seed and method. The held-out samples are served with ``test``'s
    transform (no augmentation); ``test`` itself is not used otherwise.
    """
    n = len(train)  # type: ignore[arg-type]
    if not 0 < fraction < 1:
        raise RelkdError(f"val_split={fraction!r} must be a fraction in (0, 1)")
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise RelkdError(
            f"val_split={fraction} of {n} training samples holds out {n_val}: choose a "
            "fraction that leaves samples on both sides"
        )
    held = list(take_subset(train, n_val, seed=seed).indices)
    keep = np.setdiff1d(np.arange(n), held).tolist()
    return Subset(train, keep), Subset(_eval_view(train, test), held)


def cap_subset(ds: Dataset, n: int) -> Dataset:
    """At most ``n`` samples of an evaluation set: a stratified subset fixed by seed 0 (all of
    it when it is not larger)."""
    if n < 1:
        raise RelkdError(f"test_subset={n} must be >= 1")
    return ds if n >= len(ds) else take_subset(ds, n, seed=0)  # type: ignore[arg-type]
