"""On-device data loading for data sets that fit in memory (CIFAR, Fashion-MNIST, STL-10, ...).

The whole split lives on the device as one uint8 tensor [N, C, H, W]; each batch is gathered,
randomly cropped (zero padding) and flipped with a handful of batched tensor ops, then converted
with ``float / 255`` and ``(x - mean) / std`` exactly as ``ToTensor`` + ``Normalize`` do. No
worker processes, no per-sample Python, no host-to-device copies after construction except the
epoch's order and augmentation draws (from pinned memory on CUDA, so the host does not wait),
and no per-batch allocation of index tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from relkd.registry import RelkdError

Batch = (
    tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
)


def _base_dataset(ds: Any) -> Any:
    """Follow ``.dataset`` (Subset, IndexedDataset) down to the data set that holds the images."""
    seen = 0
    while not hasattr(ds, "as_tensors") and hasattr(ds, "dataset") and seen < 16:
        ds = ds.dataset
        seen += 1
    return ds


def supports_in_memory(ds: Dataset) -> bool:
    """True when :func:`to_tensors` works for ``ds`` (itself or under Subset / IndexedDataset)."""
    return hasattr(_base_dataset(ds), "as_tensors")


def to_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set as (images uint8 [N, C, H, W], targets int64 [N]).

    Works on data sets with an ``as_tensors()`` method and on ``Subset`` / ``IndexedDataset``
    wrappers around them (a Subset keeps its order, so index i of the result is item i of ``ds``).
    """
    if hasattr(ds, "as_tensors"):
        images, targets = ds.as_tensors()
        return images, targets.long()
    if isinstance(ds, Subset):
        images, targets = to_tensors(ds.dataset)
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return images[idx], targets[idx]
    inner = getattr(ds, "dataset", None)
    if inner is not None and len(inner) == len(ds):  # a pass-through wrapper (IndexedDataset)
        return to_tensors(inner)
    raise RelkdError(
        f"{type(ds).__name__} cannot be held in memory as tensors (no as_tensors()); use a "
        "DataLoader for it (in-memory data sets: cifar10, cifar100, fashion_mnist, stl10, folder_jpg)"
    )


def block_positions(total: int, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s positions in an order of ``total`` (a multiple of ``world_size``) items:
    the r-th block of every global batch of ``batch_size * world_size`` consecutive positions
    (the last global batch is split evenly too). int64 [total / world_size]."""
    gbs = batch_size * world_size
    starts = range(0, total, gbs)
    return torch.cat(
        [
            torch.arange(st + rank * b, st + (rank + 1) * b)
            for st in starts
            for b in [min(gbs, total - st) // world_size]
        ]
    )


def _mix_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (independent streams for shuffle and augmentation)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor | None,
    flips: torch.Tensor | None,
    padding: int,
    *,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Crop + flip of a batch [B, C, H, W] -> [B, C, H, W] in one gather.

    Output pixel (i, j) of sample b is padded[b, oy + i, ox + j], or
    padded[b, oy + i, ox + W - 1 - j] when flipped (crop first, then flip, as torchvision),
    where ``padded`` is the batch zero-padded by ``padding`` on every side and
    ``offsets[b] = (oy, ox)`` in [0, 2 * padding]. ``offsets=None``: no crop; ``flips=None``: no
    flip. ``grid``: ``(arange(H), arange(W))`` on ``x``'s device, made once by a caller that
    crops every step (no per-step index allocation).
    """
    b, c, h, w = x.shape
    p = padding if offsets is not None else 0
    dev = x.device
    ar_h, ar_w = (
        grid if grid is not None else (torch.arange(h, device=dev), torch.arange(w, device=dev))
    )
    rows = ar_h.expand(b, h)
    cols = ar_w.expand(b, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if offsets is not None:
        x = F.pad(x, (p, p, p, p))  # zero fill, like RandomCrop(padding=p, fill=0)
        rows = rows + offsets[:, :1]
        cols = cols + offsets[:, 1:]
    wp = w + 2 * p
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, -1), 2, lin).view(b, c, h, w)


class InMemoryLoader:
    """Batches ``(x float [B, C, H, W] normalised, y int64 [B])`` (``+ extras``) from device memory.

    Args:
        images_u8: the whole split, uint8 [N, C, H, W] (see :func:`to_tensors`).
        targets: int64 [N].
        batch_size: per-rank batch size B.
        shuffle: permute the order every epoch (a function of ``seed + epoch``, see
            :meth:`set_epoch`); else sequential order.
        augment: apply RandomCrop(H, padding, zero fill) + RandomHorizontalFlip per sample, with
            the same distribution as torchvision's transforms: each of the (2p+1)^2 offsets and
            each flip state equally likely.
        padding: zero padding p of the random crop (0: no crop).
        flip: random horizontal flip with probability 1/2.
        mean, std: per-channel normalisation (length C), as ``transforms.Normalize``.
        device: where the data lives and batches are produced.
        drop_last: drop the last incomplete batch of each rank.
        seed: base seed of the shuffle order and of the augmentation draws.
        rank, world_size: shard for DDP: the permutation is padded (by repeating its head) to a
            multiple of ``world_size``; each global batch of ``batch_size * world_size``
            positions is split into one block per rank (see :meth:`shard_positions`), so ranks
            get disjoint, equally long shards and together see one process's batches.
        return_index: also yield ``{"index": int64 [B]}`` (positions in the split) for
            memory-bank methods.
        return_aug: also yield the augmentation actually drawn, ``{"index": int64 [B],
            "aug_offsets": int64 [B, 2], "aug_flips": bool [B]}`` (crop offsets in [0, 2p] in the
            frame of :attr:`aug_padding`, see :func:`crop_flip`): what an exact teacher-output
            cache (:mod:`relkd.data.teacher_cache`) looks its entries up by. Zeros / ``False``
            where that augmentation is off (then ``aug_padding`` is 0 / ``aug_flip`` False, so
            zeros are the identity).
        even_shards: pad shards to equal length (needed for training under DDP); ``False``
            gives every sample exactly once over all ranks (exact distributed evaluation).

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``; without it every
    pass repeats epoch 0's order and augmentation.
    """

    def __init__(
        self,
        images_u8: torch.Tensor,
        targets: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        return_index: bool = False,
        even_shards: bool = True,
        return_aug: bool = False,
    ) -> None:
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise RelkdError(
                f"images must be uint8 [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
            )
        if targets.dim() != 1 or len(targets) != len(images_u8):
            raise RelkdError(f"targets must be [N={len(images_u8)}], got {tuple(targets.shape)}")
        c = images_u8.shape[1]
        if len(mean) != c or len(std) != c:
            raise RelkdError(
                f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}"
            )
        if batch_size <= 0:
            raise RelkdError(f"batch_size must be positive, got {batch_size}")
        if padding < 0:
            raise RelkdError(f"padding must be >= 0, got {padding}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise RelkdError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if len(images_u8) == 0:
            raise RelkdError("InMemoryLoader got an empty data set")
        self.device = torch.device(device)
        self.images = images_u8.to(self.device).contiguous()
        self.targets = targets.to(self.device, torch.long)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(
            1, -1, 1, 1
        )
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(
            1, -1, 1, 1
        )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment and (padding > 0 or flip)
        self.padding = padding
        self.flip = flip
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.return_index = return_index
        self.return_aug = return_aug
        self.even_shards = even_shards
        self.epoch = 0
        self._grid: tuple[torch.Tensor, torch.Tensor] | None = None  # crop_flip's aranges
        n = len(self.images)
        if even_shards:
            self.num_samples = math.ceil(n / world_size)
        else:
            self.num_samples = len(range(rank, n, world_size))

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> InMemoryLoader:
        """Loader over a data set with ``as_tensors`` (or a Subset / IndexedDataset of one).

        Normalisation and augmentation (``mean``, ``std``, ``padding``, ``flip``) are read from
        the data set (:class:`~relkd.data.base.ArrayImageDataset`), so the batches follow the
        same distribution as its ``__getitem__``; ``augment=None`` keeps the data set's choice.
        ``kwargs`` go to the constructor (``drop_last``, ``seed``, ``rank``, ...).
        """
        base = _base_dataset(ds)
        images, targets = to_tensors(ds)
        for attr in ("mean", "std"):
            if attr not in kwargs and not hasattr(base, attr):
                raise RelkdError(f"{type(base).__name__} has no `{attr}`; pass {attr}= explicitly")
        opts: dict[str, Any] = {
            "mean": getattr(base, "mean", None),
            "std": getattr(base, "std", None),
            "padding": getattr(base, "padding", 0),
            "flip": getattr(base, "flip", False),
        }
        opts.update(kwargs)
        if augment is None:
            augment = bool(getattr(base, "augment", False))
        return cls(
            images, targets, batch_size=batch_size, shuffle=shuffle, augment=augment,
            device=device, **opts,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the order is ``randperm(N)`` seeded with ``seed + epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def dataset_size(self) -> int:
        """N, the size of the whole split (all ranks)."""
        return len(self.images)

    @property
    def aug_padding(self) -> int:
        """Crop padding actually applied (0 when augmentation is off): the frame of
        ``aug_offsets``."""
        return self.padding if self.augment else 0

    @property
    def aug_flip(self) -> bool:
        """Whether random flips are actually applied."""
        return self.flip and self.augment

    def _order(self) -> torch.Tensor:
        """The epoch's permutation of the split (``randperm(N)`` seeded with seed + epoch, as
        ``DistributedSampler``), padded by repeating its head to ``num_samples * world_size``."""
        n = len(self.images)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if self.even_shards and total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order

    def shard_positions(self) -> torch.Tensor:
        """Positions in :meth:`_order` that this rank visits, int64 [num_samples].

        Training shards are *blocks of global batches*: global batch k is the run of
        ``batch_size * world_size`` consecutive positions, and rank r takes the r-th block of
        it. Concatenating the ranks' k-th batches therefore gives exactly the k-th batch of one
        process at batch ``batch_size * world_size`` — the same samples in the same order, so
        order-dependent and sampled terms match too. (``DistributedSampler`` interleaves
        instead; the set of samples per epoch and rank is the same size.) Evaluation shards
        (``even_shards=False``) interleave and cover every sample exactly once.
        """
        if not self.even_shards:
            return torch.arange(self.rank, len(self.images), self.world_size)
        total = self.num_samples * self.world_size
        return block_positions(total, self.batch_size, self.rank, self.world_size)

    def shard_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, int64 [num_samples] on the CPU."""
        return self._order()[self.shard_positions()]

    def _draw_augmentation(
        self, positions: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets int64 [n, 2] in [0, 2p] and flips bool [n] for the given positions.

        Drawn on the CPU for the whole (padded) epoch order from a generator seeded by
        (seed, epoch) and then indexed by position: the same seed gives the same augmentation
        on every device type *and* for every world size.
        """
        # One draw per position of the unpadded order (padding repeats the head, and so do its
        # draws): the stream does not depend on the world size.
        total = len(self.images)
        positions = positions % total
        g = torch.Generator()
        g.manual_seed(_mix_seed(self.seed, self.epoch, "augment"))
        offsets = flips = None
        if self.padding > 0:
            offsets = torch.randint(0, 2 * self.padding + 1, (total, 2), generator=g)[positions]
            offsets = self._to_device(offsets)
        if self.flip:
            flips = torch.randint(0, 2, (total,), generator=g)[positions].bool()
            flips = self._to_device(flips)
        return offsets, flips

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device without blocking the host: from pinned memory on CUDA (a copy from
        pageable memory is staged synchronously)."""
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def crop_flip(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Random crop + flip of a uint8 batch [B, C, H, W] -> [B, C, H, W] in one gather
        (:func:`crop_flip` with this loader's padding)."""
        h, w = x.shape[2:]
        if self._grid is None or self._grid[0].numel() != h or self._grid[1].numel() != w:
            self._grid = (torch.arange(h, device=x.device), torch.arange(w, device=x.device))
        return crop_flip(x, offsets, flips, self.padding, grid=self._grid)

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32, bit-identical to ToTensor() + Normalize(mean, std)."""
        return x_u8.float().div_(255).sub_(self.mean).div_(self.std)

    def __iter__(self) -> Iterator[Batch]:
        pos = self.shard_positions()
        idx = self._to_device(self._order()[pos])
        offsets = flips = None
        if self.augment:
            offsets, flips = self._draw_augmentation(pos)
        bs = self.batch_size
        if self.return_aug:  # "no augmentation" extras, made once and sliced per batch
            no_offsets = idx.new_zeros(min(bs, len(idx)), 2)
            no_flips = idx.new_zeros(min(bs, len(idx))).bool()
        for k in range(len(self)):
            sl = slice(k * bs, min((k + 1) * bs, len(idx)))
            i = idx[sl]
            x = self.images.index_select(0, i)
            if self.augment:
                x = self.crop_flip(
                    x,
                    offsets[sl] if offsets is not None else None,
                    flips[sl] if flips is not None else None,
                )
            x = self.normalize(x)
            y = self.targets.index_select(0, i)
            if self.return_aug:
                b = len(i)
                aug = {
                    "index": i,
                    "aug_offsets": offsets[sl] if offsets is not None else no_offsets[:b],
                    "aug_flips": flips[sl] if flips is not None else no_flips[:b],
                }
                yield x, y, aug
            elif self.return_index:
                yield x, y, {"index": i}
            else:
                yield x, y

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"InMemoryLoader(n={n}, shape=[{c}, {h}, {w}], batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment}, padding={self.padding}, "
            f"flip={self.flip}, rank={self.rank}/{self.world_size}, device={self.device})"
        )
