"""The one training loop: CPU, one GPU or N GPUs under torchrun, same code path.

``fit(cfg)`` builds everything from a :class:`relkd.config.Config` (or takes the user's own
``nn.Module`` teacher / student), trains, evaluates each epoch, writes the run folder and returns
a summary dict. Layout of a run folder::

    config.yaml          the resolved config
    metrics.jsonl        one record per epoch (losses, lr, top-1/top-5, best so far)
    checkpoint.pt        the latest epoch (atomic, checksummed; checkpoint.prev.pt the one before)
    student.pt           the student's weights alone at the end (also student.safetensors)
    student_best.pt      the student's weights at the best top-1 epoch
    summary.json         best / last top-1, run time
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from relkd import distributed as D
from relkd.config import Config, load_config
from relkd.engine.distiller import Distiller
from relkd.engine.logger import RunLogger
from relkd.engine.rundir import RunFolder, run_path, sigterm_as_interrupt, student_metadata
from relkd.engine.schedule import lr_factor
from relkd.engine.teacher import Teacher
from relkd.methods import MethodContext, build_method
from relkd.methods.base import Method
from relkd.models import POOLED, FeatureTap, create_model, get_feature_info, load_checkpoint
from relkd.registry import RelkdError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise RelkdError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RelkdError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (no-op otherwise)."""
    if D.is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend)


def probe_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Feature shapes (no batch dim) of the given taps, by one no-grad forward in eval mode."""
    tap = FeatureTap(model, names)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = tap(x)
    except RuntimeError as e:
        raise RelkdError(
            f"{type(model).__name__} cannot run on an input of shape {list(x.shape)} "
            f"(the data set's shape): {str(e).splitlines()[0]}"
        ) from e
    finally:
        model.train(was)
        tap.remove()
    shapes = {k: tuple(v.shape[1:]) for k, v in out.feats.items()}
    shapes["logits"] = tuple(out.logits.shape[1:])
    return shapes


def _tappable(model: nn.Module) -> list[str]:
    names = [i.name for i in get_feature_info(model)]
    try:
        FeatureTap(model, [POOLED]).remove()
        names.append(POOLED)
    except RelkdError:
        pass
    return names


def _chans_kwargs(name: str, kwargs: Any, in_channels: int) -> dict[str, Any]:
    """The model's kwargs with ``in_chans`` = the data's channels when the factory takes it (the
    small CNNs default to 1 channel, the CIFAR zoo to 3) or the data is not RGB."""
    import inspect

    from relkd.models.registry import MODELS

    kw = dict(kwargs)
    takes = False
    if ":" not in name and name in MODELS.names():
        takes = "in_chans" in inspect.signature(MODELS.get(name)).parameters
    if takes or in_channels != 3:
        kw.setdefault("in_chans", in_channels)
    return kw


def _build_models(cfg: Config, info: Any, teacher: nn.Module | None, student: nn.Module | None):
    kw = _chans_kwargs(cfg.student.name, cfg.student.kwargs, info.in_channels)
    if student is None:
        student = create_model(cfg.student.name, info.num_classes, **kw)
        if cfg.student.checkpoint:
            load_checkpoint(student, cfg.student.checkpoint)
    if teacher is None and cfg.teacher is not None:
        tkw = _chans_kwargs(cfg.teacher.name, cfg.teacher.kwargs, info.in_channels)
        teacher = create_model(cfg.teacher.name, info.num_classes, **tkw)
        if not cfg.teacher.checkpoint:
            raise RelkdError(
                f"teacher {cfg.teacher.name!r} has no checkpoint: set teacher.checkpoint=PATH "
                "(a trained teacher; an untrained one teaches nothing)"
            )
        load_checkpoint(teacher, cfg.teacher.checkpoint)
    return teacher, student


def _make_loaders(cfg: Config, method: Method, train_ds, test_ds, info, device, replay=False):
    """In-memory batched pipeline where possible, else a DataLoader (DistributedSampler);
    ``replay``: the train set wrapped for FKD-style replay (see :func:`_replay_plan`)."""
    from relkd.data import InMemoryLoader, collate_with_extras, supports_in_memory, to_tensors
    from relkd.data.wrappers import IndexedDataset

    overrides_wrap = type(method).wrap_train_dataset is not Method.wrap_train_dataset
    if hasattr(method, "parts"):
        overrides_wrap = any(
            type(p).wrap_train_dataset is not Method.wrap_train_dataset
            for p in method.parts.values()
        )
    extras = set(method.batch_extras)
    want_mem = cfg.data.in_memory
    tensors = None
    if want_mem != "false" and not overrides_wrap and extras <= {"index"}:
        tensors = to_tensors(train_ds) if supports_in_memory(train_ds) else None
        if tensors is None and want_mem == "true":
            raise RelkdError(
                f"data.in_memory=true but data set {cfg.data.name!r} has no in-memory form"
            )
    padding = getattr(info, "crop_padding", 4 if info.image_size >= 32 else 2)
    seed = cfg.train.seed
    if tensors is not None:
        x, y = tensors
        train = InMemoryLoader(
            x, y, batch_size=cfg.data.batch_size, shuffle=True, augment=cfg.data.augment,
            padding=padding, flip=True, mean=info.mean, std=info.std, device=device,
            drop_last=False, seed=seed, rank=D.rank(), world_size=D.world_size(),
            return_index="index" in extras,
        )  # fmt: skip
    elif replay:
        from relkd.data.replay import ReplayCropDataset

        ds = ReplayCropDataset(train_ds, seed=cfg.train.replay_seed)  # yields "index" too
        train = _EpochLoader(
            ds, cfg.data.batch_size, cfg.data.num_workers, seed, collate_with_extras, device
        )
    else:
        ds = method.wrap_train_dataset(train_ds)
        if "index" in extras:
            ds = IndexedDataset(ds)
        train = _EpochLoader(
            ds, cfg.data.batch_size, cfg.data.num_workers, seed, collate_with_extras, device
        )
    # Evaluation is sharded over ranks without padding (every test image exactly once in all);
    # evaluate() sums the counts over ranks.
    if cfg.data.in_memory != "false" and supports_in_memory(test_ds):
        xt, yt = to_tensors(test_ds)
        test = InMemoryLoader(
            xt, yt, batch_size=cfg.data.eval_batch_size, shuffle=False, augment=False,
            padding=0, flip=False, mean=info.mean, std=info.std, device=device,
            rank=D.rank(), world_size=D.world_size(), even_shards=False,
        )  # fmt: skip
    else:
        shard = torch.utils.data.Subset(test_ds, range(D.rank(), len(test_ds), D.world_size()))
        test = torch.utils.data.DataLoader(
            shard, batch_size=cfg.data.eval_batch_size, shuffle=False,
            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        )  # fmt: skip
    return train, test


def _teacher_cache(cfg: Config, method: Method, tea, train_loader, device, log, progress: bool):
    """``train.teacher_cache``: swap the online teacher for an exact teacher-output cache
    (:mod:`relkd.data.teacher_cache`) when the run allows one. Returns ``(teacher, keys)``:
    the teacher to call as ``teacher(x, **extras)`` and the batch extras only it reads (the
    engine drops them before the method). Falls back to the online teacher, saying why once."""
    mode = str(cfg.train.teacher_cache).strip()
    if tea is None or _off(mode):
        return tea, ()
    from relkd.data import InMemoryLoader, cache_dir
    from relkd.data.teacher_cache import TeacherCache, cache_key
    from relkd.engine.teacher import CachedTeacher

    taps = list(method.teacher_taps())
    parts = list(method.parts.values()) if hasattr(method, "parts") else [method]
    why = None
    if not isinstance(train_loader, InMemoryLoader):
        why = "it needs the in-memory data pipeline (data.in_memory)"
    elif not set(taps) <= {POOLED}:
        why = (
            f"method {cfg.method.name!r} needs teacher features {[t for t in taps if t != POOLED]}"
        )
    elif any(type(p).prepare_batch is not Method.prepare_batch for p in parts):
        why = f"method {cfg.method.name!r} changes the batch (prepare_batch)"
    if why:
        log(f"teacher cache: {why}; using the online teacher")
        return tea, ()
    train_loader.return_aug = True
    images = train_loader.images
    kw = dict(
        padding=train_loader.aug_padding, flip=train_loader.aug_flip,
        mean=train_loader.mean.flatten().tolist(), std=train_loader.std.flatten().tolist(),
        taps=["logits", *taps], dtype=cfg.train.teacher_cache_dtype,
    )  # fmt: skip
    key = cache_key(tea.model, images, **kw)
    auto = mode.lower() in ("auto", "on", "true", "yes")
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


def _off(value: Any) -> bool:
    return str(value).strip().lower() in ("off", "false", "no", "none")  # YAML reads off as False


def _replay_plan(cfg: Config, method: Method, tea, train_ds, log) -> bool:
    """Whether ``train.teacher_replay`` applies to this run; says why not, once, when asked for."""
    if _off(cfg.train.teacher_replay) or tea is None:
        return False
    from relkd.data import supports_in_memory
    from relkd.data.replay import replay_unsupported

    parts = list(method.parts.values()) if hasattr(method, "parts") else [method]
    taps = list(method.teacher_taps())
    if cfg.data.in_memory != "false" and supports_in_memory(train_ds):
        why = "the data set runs on the in-memory pipeline (its exact cache is train.teacher_cache)"
    elif any(type(p).wrap_train_dataset is not Method.wrap_train_dataset for p in parts):
        why = f"method {cfg.method.name!r} wraps the train set itself"
    elif not set(method.batch_extras) <= {"index"}:
        why = f"method {cfg.method.name!r} needs the batch extras {sorted(method.batch_extras)}"
    elif not set(taps) <= {POOLED}:
        why = (
            f"method {cfg.method.name!r} needs teacher features {[t for t in taps if t != POOLED]}"
        )
    elif any(type(p).prepare_batch is not Method.prepare_batch for p in parts):
        why = f"method {cfg.method.name!r} changes the batch (prepare_batch)"
    else:
        why = replay_unsupported(train_ds)
    if why:
        log(f"teacher replay: {why}; using the online teacher")
    return why is None


def _teacher_replay(cfg: Config, method: Method, tea, train_loader, log):
    """The :class:`~relkd.data.replay.ReplayTeacher` for a replay loader, and the extras only
    it reads."""
    from relkd.data import cache_dir
    from relkd.data.replay import ReplayStore, ReplayTeacher, replay_key
    from relkd.data.teacher_cache import teacher_fingerprint

    ds = train_loader.ds
    taps = list(dict.fromkeys(["logits", *method.teacher_taps()]))
    key = replay_key(teacher_fingerprint(tea.model), ds.fingerprint(), taps,
                     cfg.train.teacher_cache_dtype)  # fmt: skip
    mode = str(cfg.train.teacher_replay).strip()
    auto = mode.lower() in ("auto", "on", "true", "yes")
    path = cache_dir() / "teacher-replay" / key[0][:32] if auto else Path(mode).expanduser()
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


class _EpochLoader:
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


def _unpack(batch, device):
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


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, amp_ctx=nullcontext
) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean CE of ``model`` on ``loader`` (summed over ranks)."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, ce sum
    for batch in loader:
        x, y, _ = _unpack(batch, device)
        with amp_ctx():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        stats[0] += y.numel()
        stats[1] += hit[:, 0].sum()
        stats[2] += hit.any(dim=1).sum()
        stats[3] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    model.train(was)
    stats = D.all_reduce_sum(stats)
    n = max(1.0, float(stats[0]))
    return {
        "top1": 100.0 * float(stats[1]) / n,
        "top5": 100.0 * float(stats[2]) / n,
        "test_loss": float(stats[3]) / n,
    }


def _amp(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Components:
    """Everything a training step needs, built from a config (also used by tests and benches)."""

    cfg: Config
    info: Any
    distiller: Distiller
    method: Method
    teacher: Teacher | None
    train_ds: Any
    test_ds: Any


def build_components(
    cfg: Config,
    device: torch.device,
    teacher: nn.Module | None = None,
    student: nn.Module | None = None,
) -> Components:
    """Data sets, models, method and Distiller for ``cfg``; every check that can fail before
    training (unknown names, class counts, missing teacher) fails here."""
    from relkd.data import build_datasets

    train_ds, test_ds, info = build_datasets(
        cfg.data.name, cfg.data.root, download=cfg.data.download, augment=cfg.data.augment,
        image_size=cfg.data.image_size,
    )  # fmt: skip
    if cfg.data.train_subset:
        from relkd.data import take_subset

        train_ds = take_subset(
            train_ds, cfg.data.train_subset, seed=0
        )  # same subset for every seed
    teacher_model, student_model = _build_models(cfg, info, teacher, student)
    dummy = torch.zeros(2, info.in_channels, info.image_size, info.image_size)
    s_shapes = probe_shapes(student_model, _tappable(student_model), dummy)
    if s_shapes["logits"] != (info.num_classes,):
        raise RelkdError(
            f"student predicts {s_shapes['logits'][0]} classes but data set {cfg.data.name!r} "
            f"has {info.num_classes}"
        )
    ctx = MethodContext(
        num_classes=info.num_classes,
        student_stages=get_feature_info(student_model),
        student_shapes=s_shapes,
        epochs=cfg.train.epochs,
        num_train_samples=len(train_ds),
        seed=cfg.train.seed,
    )
    if teacher_model is not None:
        ctx.teacher_stages = get_feature_info(teacher_model)
        ctx.teacher_shapes = probe_shapes(teacher_model, _tappable(teacher_model), dummy)
        if ctx.teacher_shapes["logits"] != s_shapes["logits"]:
            raise RelkdError(
                f"teacher predicts {ctx.teacher_shapes['logits'][0]} classes but the student "
                f"{s_shapes['logits'][0]}; both must match the data set ({info.num_classes})"
            )
    method, default_ce = build_method(cfg.method.name, ctx, cfg.method.args)
    if method.requires_teacher and teacher_model is None:
        raise RelkdError(
            f"method {cfg.method.name!r} needs a teacher: set teacher.name and teacher.checkpoint"
        )
    ce_weight = default_ce if cfg.method.ce_weight is None else cfg.method.ce_weight
    distiller = Distiller(student_model, method, ce_weight).to(device)
    if cfg.train.channels_last:
        distiller = distiller.to(memory_format=torch.channels_last)
    tea = None
    if teacher_model is not None and method.requires_teacher:
        tea = Teacher(teacher_model, method.teacher_taps()).to(device)
    return Components(cfg, info, distiller, method, tea, train_ds, test_ds)


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
            the recorded one (see :mod:`relkd.engine.rundir`).
        allow_change: config keys (or key prefixes) allowed to differ on resume, recorded in
            the folder's ``run.json``.
    """
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    run_dir = run_path(cfg)
    log = RunLogger(run_dir, tensorboard=cfg.train.tensorboard, quiet=quiet)
    run = RunFolder(run_dir, log)
    # Every rank checks (the same folder on a shared file system), so none waits on a failed
    # one; nothing is written before the components are built.
    run.check(cfg, resume=resume, allow_change=allow_change)
    with sigterm_as_interrupt(), run:
        return _fit(cfg, device, run, teacher, student, resume, allow_change, quiet)


def _fit(cfg, device, run, teacher, student, resume, allow_change, quiet) -> dict[str, Any]:
    run_dir, log = run.path, run.log
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    comp = build_components(cfg, device, teacher, student)
    distiller, method, tea, info = comp.distiller, comp.method, comp.teacher, comp.info
    train_ds, test_ds = comp.train_ds, comp.test_ds
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
    step_fn = model
    if cfg.train.compile:
        step_fn = torch.compile(model)

    lr = cfg.optim.lr_by_student.get(cfg.student.name, cfg.optim.lr)
    params = [p for p in distiller.parameters() if p.requires_grad]
    if cfg.optim.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
            nesterov=cfg.optim.nesterov,
        )  # fmt: skip
    else:
        opt = torch.optim.AdamW(
            params, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    amp_ctx = _amp(cfg.train.precision, device)
    replay = _replay_plan(cfg, method, tea, train_ds, log.info)
    train_loader, test_loader = _make_loaders(
        cfg, method, train_ds, test_ds, info, device, replay=replay
    )
    progress = cfg.train.progress and D.is_main() and not quiet
    if replay:
        tea, cache_only = _teacher_replay(cfg, method, tea, train_loader, log.info)
    else:
        tea, cache_only = _teacher_cache(cfg, method, tea, train_loader, device, log.info, progress)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    start_epoch, step, history, best = 0, 0, [], {"top1": -1.0, "epoch": -1}
    resumed = run.open(
        cfg, resume=resume, allow_change=allow_change, device=device, world_size=D.world_size(),
        into=(distiller, opt, scaler),
    )  # fmt: skip
    if resumed is not None:
        start_epoch, step = resumed.start_epoch, resumed.step
        history, best = resumed.history, resumed.best
    meta = student_metadata(cfg, info, student)

    sched_kw = dict(
        name=cfg.schedule.name, milestones=list(cfg.schedule.milestones), gamma=cfg.schedule.gamma,
        warmup_epochs=cfg.schedule.warmup_epochs, min_lr_ratio=cfg.schedule.min_lr / lr,
        pct_start=cfg.schedule.pct_start,
    )  # fmt: skip
    # Pre-training phases (multi-stage methods) come first; epoch slots are numbered over all.
    phase_of = [name for name, n in method.phases() for _ in range(n)]
    pre = len(phase_of)
    total_epochs = pre + cfg.train.epochs
    t_start = time.time()
    for epoch in range(start_epoch, total_epochs):
        # Re-seed from (seed, epoch): augmentation and dropout randomness of an epoch do not
        # depend on what ran before, which makes --resume continue exactly.
        seed_everything(cfg.train.seed * 1_000_003 + epoch)
        train_loader.set_epoch(epoch)
        if hasattr(tea, "set_epoch"):  # teacher replay: this epoch's stored outputs
            tea.set_epoch(epoch)
        phase = phase_of[epoch] if epoch < pre else "main"
        main_epoch = epoch - pre
        method.set_phase(phase)
        method.set_epoch(max(0, main_epoch))
        distiller.train()
        sums: dict[str, float] = {}
        n_steps, skipped, t0 = 0, 0, time.time()
        bar = None
        if cfg.train.progress and D.is_main() and not quiet:
            from tqdm.auto import tqdm

            desc = f"{phase} {epoch + 1}/{pre}" if phase != "main" else f"epoch {main_epoch + 1}"
            bar = tqdm(total=steps_per_epoch, desc=f"{desc}/{cfg.train.epochs}", leave=False)
        for i, batch in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            x, y, extras = _unpack(batch, device)
            x, y, extras = method.prepare_batch(x, y, extras)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            main_step = step - pre * steps_per_epoch
            f = (
                1.0
                if phase != "main"
                else lr_factor(main_step, steps_per_epoch, cfg.train.epochs, **sched_kw)
            )
            for g in opt.param_groups:
                g["lr"] = lr * f
            t_out = tea(x, **extras) if tea is not None else None
            if cache_only:  # extras only the cached teacher reads
                extras = {k: v for k, v in extras.items() if k not in cache_only}
            with amp_ctx():
                _, terms = step_fn(x, y, t_out, **extras)
            loss = sum(t.float() for t in terms.values())
            if not torch.isfinite(loss):
                detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                if cfg.train.on_nonfinite == "skip":
                    skipped += 1
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    continue
                raise RelkdError(
                    f"non-finite loss at epoch {epoch + 1} step {i} (global step {step}) with "
                    f"method {cfg.method.name!r}: {detail}. Lower the lr, use fp32, or set "
                    "train.on_nonfinite=skip"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            n_steps += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.close()
        if hasattr(tea, "end_epoch"):
            tea.end_epoch()
        # Metrics: per-rank means averaged over ranks.
        keys = sorted(sums)
        vec = torch.tensor(
            [sums[k] / max(1, n_steps) for k in keys] + [float(skipped)],
            dtype=torch.float64,
            device=device,
        )
        vec = D.all_reduce_sum(vec)
        ws = D.world_size()
        record: dict[str, Any] = {"epoch": main_epoch + 1, "step": step}
        if phase != "main":
            record["phase"] = phase
        record.update({f"train/{k}": float(vec[j]) / ws for j, k in enumerate(keys)})
        if skipped or vec[-1] > 0:
            record["skipped_steps"] = int(vec[-1])
        record["lr"] = opt.param_groups[0]["lr"]
        record["epoch_time_s"] = time.time() - t0
        is_eval = (main_epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == total_epochs
        if phase == "main" and is_eval:
            shard = test_loader
            ev = evaluate(distiller.student, shard, device, amp_ctx)
            record.update(ev)
            if ev["top1"] > best["top1"]:
                best = {"top1": ev["top1"], "epoch": main_epoch + 1}
                run.save_best(distiller.student, meta)
            record["best_top1"] = best["top1"]
        history.append(record)
        log.info(
            f"{phase} epoch {main_epoch + 1 if phase == 'main' else epoch + 1}/"
            f"{cfg.train.epochs if phase == 'main' else pre} loss {record.get('train/loss', float('nan')):.4f}"
            + (f" top1 {record['top1']:.2f} best {best['top1']:.2f}" if "top1" in record else "")
        )
        run.end_epoch(
            record,
            {
                "distiller": distiller.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step": step,
                "history": history,
                "best": best,
            },
        )
        if D.is_dist():
            torch.distributed.barrier()

    last = next((r for r in reversed(history) if "top1" in r), {})
    summary = {
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "last_top1": last.get("top1", float("nan")),
        "last_top5": last.get("top5", float("nan")),
        "epochs": cfg.train.epochs,
        "method": cfg.method.name,
        "student": cfg.student.name,
        "teacher": cfg.teacher.name if cfg.teacher else None,
        "seed": cfg.train.seed,
        "train_time_s": time.time() - t_start,
        "run_dir": str(run_dir),
    }
    run.finish(distiller.student, summary, meta)
    distiller.tap.remove()
    return summary
