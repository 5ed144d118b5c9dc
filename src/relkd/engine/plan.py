"""The planner: what a method *declares* -> the run's data pipeline and teacher source.

A method declares (class attributes of :class:`~relkd.methods.base.Method`, the union of the
parts for a composition):

- ``batch_extras``: per-sample extras the loader must deliver (``"index"`` for memory banks);
- ``wraps_train_set``: its ``wrap_train_dataset`` changes the training set (CORSD's triplets);
- ``changes_batch``: its ``prepare_batch`` changes the batch (then no per-sample lookup of
  teacher outputs matches the images);
- ``teacher_taps()``: the teacher features it reads (a cache / replay stores logits and
  ``pooled`` only).

:func:`make_plan` turns those and the config into a :class:`Plan`:

- pipeline ``in-memory`` (:class:`~relkd.data.memory.InMemoryLoader`, the whole split as one
  device tensor) when the data set has an in-memory form and the method neither wraps the set
  nor needs extras other than ``index``; ``replay`` (FKD-style, :mod:`relkd.data.replay`) when
  ``train.teacher_replay`` applies; else ``dataloader`` (torch DataLoader, block-sharded);
- teacher ``none`` (no teacher needed), ``cache`` (exact teacher-output cache,
  ``train.teacher_cache``, in-memory pipeline only), ``replay``, else ``online``.

Every fallback from what the config asked for has a reason in :attr:`Plan.notes`. The engine
prints the plan once and saves it as ``plan.json`` in the run folder.
No engine code looks at which hooks a method class overrides.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relkd import distributed as D
from relkd.models import POOLED
from relkd.registry import RelkdError

PIPELINES = ("in-memory", "dataloader", "replay")
TEACHER_SOURCES = ("none", "online", "cache", "replay")


def is_off(value: Any) -> bool:
    """``off`` and its YAML spellings (YAML reads a bare ``off`` as False)."""
    return str(value).strip().lower() in ("off", "false", "no", "none")


def is_auto(value: Any) -> bool:
    return str(value).strip().lower() in ("auto", "on", "true", "yes")


@dataclass
class Plan:
    """The data pipeline and teacher source of a run, with the reason for every fallback.

    Attributes:
        pipeline: ``in-memory | dataloader | replay``.
        teacher: ``none | online | cache | replay``.
        wrap_train_set: the method's ``wrap_train_dataset`` is applied (dataloader pipeline).
        index: the training loader yields ``"index"`` (the method needs it).
        notes: one sentence per fallback, in decision order.
    """

    pipeline: str
    teacher: str
    wrap_train_set: bool = False
    index: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the log (the notes follow, ``; ``-separated)."""
        s = f"plan: data pipeline {self.pipeline}, teacher {self.teacher}"
        if self.wrap_train_set:
            s += ", train set wrapped by the method"
        return s + "".join(f"; {n}" for n in self.notes)


def make_plan(
    *,
    method: Any,
    method_name: str,
    has_teacher: bool,
    train_ds: Any,
    in_memory: str = "auto",
    teacher_cache: Any = "off",
    teacher_replay: Any = "off",
    data_name: str = "",
) -> Plan:
    """Decide the pipeline and teacher source from the method's declarations (see the module
    docstring). ``has_teacher``: a teacher model is loaded and the method requires one.
    Raises :class:`RelkdError` when ``in_memory="true"`` cannot be honoured."""
    from relkd.data import supports_in_memory

    extras = set(method.batch_extras)
    taps = [t for t in method.teacher_taps() if t != POOLED]
    wraps, changes = bool(method.wraps_train_set), bool(method.changes_batch)
    notes: list[str] = []
    mem_capable = supports_in_memory(train_ds)
    # -- pipeline -----------------------------------------------------------------------------
    replay = False
    if has_teacher and not is_off(teacher_replay):
        if in_memory != "false" and mem_capable:
            why = "the data set runs on the in-memory pipeline (its exact cache is train.teacher_cache)"
        elif wraps:
            why = f"method {method_name!r} wraps the train set itself"
        elif not extras <= {"index"}:
            why = f"method {method_name!r} needs the batch extras {sorted(extras)}"
        elif taps:
            why = f"method {method_name!r} needs teacher features {taps}"
        elif changes:
            why = f"method {method_name!r} changes the batch (prepare_batch)"
        else:
            from relkd.data.replay import replay_unsupported

            why = replay_unsupported(train_ds)
        if why:
            notes.append(f"teacher replay: {why}; using the online teacher")
        replay = why is None
    pipeline = "dataloader"
    if in_memory != "false":
        if wraps:
            why = f"method {method_name!r} wraps the train set"
        elif not extras <= {"index"}:
            why = f"method {method_name!r} needs the batch extras {sorted(extras)}"
        elif not mem_capable:
            if in_memory == "true":
                raise RelkdError(
                    f"data.in_memory=true but data set {data_name!r} has no in-memory form"
                )
            why = None if replay else "the data set has no in-memory form"
        else:
            why = None
            pipeline = "in-memory"
        if why and in_memory == "true":
            notes.append(f"data.in_memory=true: {why}; using a DataLoader")
    if replay:
        pipeline = "replay"
    # -- teacher source -----------------------------------------------------------------------
    teacher = "none" if not has_teacher else ("replay" if replay else "online")
    if teacher == "online" and not is_off(teacher_cache):
        if pipeline != "in-memory":
            why = "it needs the in-memory data pipeline (data.in_memory)"
        elif taps:
            why = f"method {method_name!r} needs teacher features {taps}"
        elif changes:
            why = f"method {method_name!r} changes the batch (prepare_batch)"
        else:
            why = None
            teacher = "cache"
        if why:
            notes.append(f"teacher cache: {why}; using the online teacher")
    return Plan(
        pipeline=pipeline,
        teacher=teacher,
        wrap_train_set=pipeline == "dataloader" and wraps,
        index="index" in extras,
        notes=notes,
    )


def plan_for_config(cfg: Any, method: Any, has_teacher: bool, train_ds: Any) -> Plan:
    """:func:`make_plan` with the choices a config makes (``data.in_memory``,
    ``train.teacher_cache``, ``train.teacher_replay``)."""
    return make_plan(
        method=method, method_name=cfg.method.name, has_teacher=has_teacher, train_ds=train_ds,
        in_memory=cfg.data.in_memory, teacher_cache=cfg.train.teacher_cache,
        teacher_replay=cfg.train.teacher_replay, data_name=cfg.data.name,
    )  # fmt: skip


# -- building what the plan says ----------------------------------------------------------------


class BlockSampler(torch.utils.data.Sampler[int]):
    """Shuffle of (seed, epoch) padded like ``DistributedSampler``, sharded in blocks of each
    global batch (see :func:`relkd.data.memory.block_positions`): N ranks at batch b see the
    batches of one process at batch N*b."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.epoch = seed, 0
        self.num_samples = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        from relkd.data.memory import block_positions

        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        total = self.num_samples * self.world
        order = torch.cat([order, order.repeat(math.ceil(total / self.n))])[:total]
        yield from order[block_positions(total, self.batch_size, self.rank, self.world)].tolist()


class EpochLoader:
    """DataLoader whose shuffle order and sharding are a function of (seed, epoch) only, so a
    resumed run sees exactly the batches of an uninterrupted one."""

    def __init__(self, ds, batch_size, num_workers, seed, collate, device) -> None:
        self.ds, self.batch_size, self.num_workers = ds, batch_size, num_workers
        self.seed, self.collate, self.device = seed, collate, device
        self.sampler = BlockSampler(len(ds), batch_size, D.rank(), D.world_size(), seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch = epoch
        if hasattr(self.ds, "set_epoch"):  # e.g. triplets drawn per (seed, epoch, index)
            self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + getattr(self, "epoch", 0))
        loader = torch.utils.data.DataLoader(
            self.ds, batch_size=self.batch_size, sampler=self.sampler,
            num_workers=self.num_workers, collate_fn=self.collate, generator=g,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip
        yield from loader


def unpack(batch, device: torch.device):
    """``(x, y)`` or ``(x, y, extras)`` -> on ``device``. Host tensors are copied
    asynchronously on CUDA (the DataLoader pins them; an in-memory batch is already there)."""
    if len(batch) == 3:
        x, y, extras = batch
    else:
        (x, y), extras = batch, {}
    nb = device.type == "cuda"
    x = x.to(device, non_blocking=nb)
    y = y.to(device, non_blocking=nb)
    extras = {
        k: v.to(device, non_blocking=nb) if torch.is_tensor(v) else v for k, v in extras.items()
    }
    return x, y, extras


def build_loaders(plan: Plan, cfg: Any, method: Any, train_ds, test_ds, info, device):
    """The training loader the plan names and the (rank-sharded) test loader."""
    from relkd.data import InMemoryLoader, collate_with_extras, supports_in_memory, to_tensors
    from relkd.data.wrappers import IndexedDataset

    padding = getattr(info, "crop_padding", 4 if info.image_size >= 32 else 2)
    seed, bs, workers = cfg.train.seed, cfg.data.batch_size, cfg.data.num_workers
    if plan.pipeline == "in-memory":
        x, y = to_tensors(train_ds)
        train: Any = InMemoryLoader(
            x, y, batch_size=bs, shuffle=True, augment=cfg.data.augment,
            padding=padding, flip=True, mean=info.mean, std=info.std, device=device,
            drop_last=False, seed=seed, rank=D.rank(), world_size=D.world_size(),
            return_index=plan.index,
        )  # fmt: skip
    elif plan.pipeline == "replay":
        from relkd.data.replay import ReplayCropDataset

        ds = ReplayCropDataset(train_ds, seed=cfg.train.replay_seed)  # yields "index" too
        train = EpochLoader(ds, bs, workers, seed, collate_with_extras, device)
    else:
        ds = method.wrap_train_dataset(train_ds) if plan.wrap_train_set else train_ds
        if plan.index:
            ds = IndexedDataset(ds)
        train = EpochLoader(ds, bs, workers, seed, collate_with_extras, device)
    # Evaluation is sharded over ranks without padding (every test image exactly once in all);
    # evaluate() sums the counts over ranks.
    if cfg.data.in_memory != "false" and supports_in_memory(test_ds):
        xt, yt = to_tensors(test_ds)
        test: Any = InMemoryLoader(
            xt, yt, batch_size=cfg.data.eval_batch_size, shuffle=False, augment=False,
            padding=0, flip=False, mean=info.mean, std=info.std, device=device,
            rank=D.rank(), world_size=D.world_size(), even_shards=False,
        )  # fmt: skip
    else:
        shard = torch.utils.data.Subset(test_ds, range(D.rank(), len(test_ds), D.world_size()))
        test = torch.utils.data.DataLoader(
            shard, batch_size=cfg.data.eval_batch_size, shuffle=False,
            num_workers=workers, pin_memory=device.type == "cuda",
        )  # fmt: skip
    return train, test


def build_teacher_source(plan: Plan, cfg: Any, method: Any, tea, train_loader, device, log,
                         progress: bool):  # fmt: skip
    """The teacher to call as ``teacher(x, **extras)`` for the plan's source, and the batch
    extras only it reads (dropped before the method). ``tea``: the online
    :class:`~relkd.engine.teacher.Teacher` (None when the plan's teacher is ``none``)."""
    if plan.teacher == "cache":
        return _cached_teacher(cfg, method, tea, train_loader, device, log, progress)
    if plan.teacher == "replay":
        return _replay_teacher(cfg, method, tea, train_loader, log)
    return tea, ()


def _cached_teacher(cfg, method, tea, train_loader, device, log, progress: bool):
    """An exact teacher-output cache (:mod:`relkd.data.teacher_cache`) in place of ``tea``."""
    from relkd.data import cache_dir
    from relkd.data.teacher_cache import TeacherCache, cache_key
    from relkd.engine.teacher import CachedTeacher

    taps = list(method.teacher_taps())
    train_loader.return_aug = True
    images = train_loader.images
    kw = dict(
        padding=train_loader.aug_padding, flip=train_loader.aug_flip,
        mean=train_loader.mean.flatten().tolist(), std=train_loader.std.flatten().tolist(),
        taps=["logits", *taps], dtype=cfg.train.teacher_cache_dtype,
    )  # fmt: skip
    key = cache_key(tea.model, images, **kw)
    mode = str(cfg.train.teacher_cache).strip()
    auto = is_auto(mode)
    path = cache_dir() / "teacher" / key[0][:32] if auto else Path(mode).expanduser()
    if not D.is_dist() or int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one builder per node
        cache = TeacherCache.build(
            tea.model, images, **kw, path=path, rebuild="auto" if auto else "missing",
            batch_size=cfg.data.eval_batch_size, device=device, progress=progress, log=log,
            key=key,
        )  # fmt: skip
    else:  # wait for this node's builder (torchrun stops every rank if it fails)
        while not (path / "manifest.json").exists():
            time.sleep(2)
        cache = TeacherCache.open(path, key=key[0], device=device)
    if device.type == "cuda" and cache.nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]:
        cache = TeacherCache.open(path, key=key[0], device=device, preload=True)
    log(f"teacher cache: {cache}; no teacher forward pass while training")
    drop = ("aug_offsets", "aug_flips") + (() if train_loader.return_index else ("index",))
    return CachedTeacher(cache, tea.model), drop


def _replay_teacher(cfg, method, tea, train_loader, log):
    """The :class:`~relkd.engine.teacher.ReplayTeacher` for a replay loader."""
    from relkd.data import cache_dir
    from relkd.data.replay import ReplayStore, replay_key
    from relkd.data.teacher_cache import teacher_fingerprint
    from relkd.engine.teacher import ReplayTeacher

    ds = train_loader.ds
    taps = list(dict.fromkeys(["logits", *method.teacher_taps()]))
    key = replay_key(teacher_fingerprint(tea.model), ds.fingerprint(), taps,
                     cfg.train.teacher_cache_dtype)  # fmt: skip
    mode = str(cfg.train.teacher_replay).strip()
    path = (
        cache_dir() / "teacher-replay" / key[0][:32] if is_auto(mode) else Path(mode).expanduser()
    )
    store = ReplayStore.open(path, key, len(ds))
    write = D.world_size() == 1
    # Disk per epoch: ImageNet logits in fp16 are ~2.4 GiB an epoch (FKD keeps only the top-k).
    shapes = method.ctx.teacher_shapes or {}
    width = sum(int(np.prod(shapes[t])) for t in taps if t in shapes)
    per_epoch = len(ds) * (width * (2 if store.dtype == "fp16" else 4) + 40)
    size = f"{per_epoch / 2**30:.1f} GiB" if per_epoch >= 2**30 else f"{per_epoch / 2**20:.1f} MiB"
    log(f"teacher replay: {store}; ~{size} per stored epoch")
    drop = ("aug_params",) + (() if "index" in method.batch_extras else ("index",))
    return ReplayTeacher(tea, store, write=write, log=log), drop
