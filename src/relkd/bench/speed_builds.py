"""The configurations :mod:`relkd.bench.speed` measures, each as a *build*: a callable that
makes the parts (models, method, optimizer, the engine's ``TrainStep``, a data pipeline) and
returns the step function ``step(i)`` that :class:`~relkd.bench.speed_measure._Run` times.

:class:`_Spec` holds what is fixed for one ``run_speed`` call; :func:`_train_step`,
:func:`_teacher_forward` and :func:`_data` are the builds; :class:`_CacheFiles` writes the
synthetic teacher-output caches the cached steps read. Everything here builds its parts as the
engine does (see the docstring of :mod:`relkd.bench.speed`); only the data are synthetic.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from relkd._fs import remove_dead_temp_dirs
from relkd.bench.speed_measure import _evict_pages
from relkd.registry import RelkdError


class _Spec:
    """Everything fixed for one run_speed call."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def create(self, name: str) -> nn.Module:
        """The model as the engine creates it (``in_chans`` as its ``model_kwargs`` decides)."""
        from relkd.engine.build import model_kwargs
        from relkd.models import create_model

        torch.manual_seed(self.seed)
        return create_model(name, self.num_classes, **model_kwargs(name, {}, self.in_chans))

    def shape(self, b: int) -> tuple[int, int, int, int]:
        return (b, self.in_chans, self.image_size, self.image_size)


class _SyntheticSet(Dataset):
    """``batch`` random float images with labels (``targets`` for triplet samplers)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets.numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held in memory as tensors, as CIFAR is (the engine's planner asks for this)."""
        return self.images, torch.from_numpy(self.targets)


def _parts(spec: _Spec, method_name: str, with_teacher: bool) -> Any:
    """The engine's :class:`~relkd.engine.build.MethodParts` (context, method, Distiller, online
    teacher) for the spec's models, random init, measured on a CPU dummy batch."""
    from relkd.engine.build import build_method_parts

    student = spec.create(spec.student)
    teacher = spec.create(spec.teacher) if with_teacher else None
    return build_method_parts(
        method_name, student, teacher, torch.zeros(spec.shape(2)), num_classes=spec.num_classes,
        num_train_samples=spec.num_train_samples, seed=spec.seed,
    )  # fmt: skip


def _synthetic_batch(spec: _Spec, method) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One batch as the engine's loader would deliver it to this method (on the device):
    through the method's ``wrap_train_dataset`` (e.g. triplets) and ``IndexedDataset`` when it
    wants sample indices, collated with ``collate_with_extras``."""
    from relkd.data import IndexedDataset, collate_with_extras

    g = torch.Generator().manual_seed(spec.seed)
    images = torch.randn(spec.shape(spec.batch), generator=g)
    targets = torch.randint(0, spec.num_classes, (spec.batch,), generator=g)
    ds: Dataset = _SyntheticSet(images, targets)
    ds = method.wrap_train_dataset(ds)
    if "index" in method.batch_extras:
        ds = IndexedDataset(ds)
    batch = collate_with_extras([ds[i] for i in range(spec.batch)])
    x, y, extras = batch if len(batch) == 3 else (*batch, {})
    dev = spec.device
    extras = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in extras.items()}
    return x.to(dev), y.to(dev), extras


def _index_pool(spec: _Spec, n_steps: int, per_step: int) -> torch.Tensor:
    """Distinct random sample indices in [0, num_train_samples) for every step, [steps, n]."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    n = spec.num_train_samples
    rows = [torch.randperm(n, generator=g)[:per_step] for _ in range(n_steps)]
    if per_step > n:
        rows = [torch.randint(0, n, (per_step,), generator=g) for _ in range(n_steps)]
    return torch.stack(rows).to(spec.device)


class _CacheFiles:
    """Teacher-output caches in the format of :mod:`relkd.data.teacher_cache` (one per set of
    taps, written once per run into a temporary folder, removed at the end).

    The entries are synthetic (a random block tiled over the images): building a real cache runs
    the teacher on every (image, outcome) pair -- 8.1M forward passes for CIFAR -- and the
    lookup cost does not depend on the values. Files, shapes, dtype and the manifest are those
    :meth:`TeacherCache.build` writes, and they are opened with :meth:`TeacherCache.open`.
    """

    def __init__(self, spec: _Spec, dtype: str, root: str | None) -> None:
        self.spec, self.dtype, self.root_arg = spec, dtype, root
        self.root: Path | None = None
        self.paths: dict[tuple[tuple[str, ...], str], Path] = {}
        self.loaded: dict[tuple[str, ...], Any] = {}

    def nbytes(self, taps: Sequence[str], dims: dict[str, int]) -> int:
        from relkd.data.teacher_cache import num_outcomes

        k = num_outcomes(_padding(self.spec.image_size), True)
        esize = 2 if self.dtype == "fp16" else 4
        return self.spec.num_train_samples * k * sum(dims[t] for t in taps) * esize

    def path(self, taps: tuple[str, ...], dims: dict[str, int], copy: str = "") -> Path:
        """The cache files of ``taps``; a non-empty ``copy`` names a separate set of files (the
        cold variant needs its own: page-cache pages that another configuration's memory map
        still maps cannot be dropped)."""
        if (taps, copy) not in self.paths:
            self.paths[taps, copy] = self._write(taps, dims, copy)
        return self.paths[taps, copy]

    def _write(self, taps: tuple[str, ...], dims: dict[str, int], copy: str = "") -> Path:
        import json
        import tempfile
        import uuid

        from relkd.data import teacher_cache as tc
        from relkd.data.teacher_cache import CACHE_VERSION, FORMAT, MANIFEST, num_outcomes

        spec = self.spec
        if self.root is None:
            # Named after this pid, so a later run removes the GiBs a killed run left behind.
            parent = Path(self.root_arg or tempfile.gettempdir())
            remove_dead_temp_dirs(parent, "relkd_speed_cache_")
            prefix = f"relkd_speed_cache_{os.getpid()}_"
            self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        path = self.root / ("_".join(taps) + (f"_{copy}" if copy else ""))
        path.mkdir()
        p = _padding(spec.image_size)
        n, k = spec.num_train_samples, num_outcomes(p, True)
        np_dtype = np.float16 if self.dtype == "fp16" else np.float32
        rng = np.random.default_rng(spec.seed)
        for tap in taps:
            arr = np.lib.format.open_memmap(
                path / f"{tap}.npy", mode="w+", dtype=np_dtype, shape=(n, k, dims[tap])
            )
            block = rng.standard_normal((min(n, 256), k, dims[tap])).astype(np_dtype)
            for a in range(0, n, len(block)):
                m = min(len(block), n - a)
                arr[a : a + m] = block[:m]
            arr.flush()
            del arr
        mean, std = _norm_stats(spec.in_chans)
        manifest = {
            "format": FORMAT,
            "version": CACHE_VERSION,
            "key": f"relkd-bench-speed-synthetic-{uuid.uuid4().hex}",
            "parts": {
                "version": CACHE_VERSION, "teacher": "synthetic", "data": "synthetic",
                "padding": p, "flip": True, "mean": list(mean), "std": list(std),
                "taps": list(taps), "dtype": self.dtype,
            },
            "num_images": n,
            "num_outcomes": k,
            "num_classes": dims["logits"],
            "pooled_dim": dims.get("pooled"),
            "checksums": {f"{t}.npy": tc.file_sha256(path / f"{t}.npy") for t in taps},
        }  # fmt: skip
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return path

    def preloaded(self, taps: tuple[str, ...], dims: dict[str, int]):
        """The cache of ``taps`` read into memory on the device (``preload=True``), one copy
        shared by every configuration of the run."""
        from relkd.data.teacher_cache import TeacherCache

        if taps not in self.loaded:
            path = self.path(taps, dims)
            self.loaded[taps] = TeacherCache.open(path, device=self.spec.device, preload=True)
        return self.loaded[taps]

    def close(self) -> None:
        self.loaded.clear()
        import shutil

        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _engine_preloads(nbytes: int, device: torch.device) -> bool:
    """The engine's choice (relkd.engine.plan._cached_teacher): memory-mapped on the host,
    preloaded onto a GPU when the cache takes under 40% of the free GPU memory."""
    return device.type == "cuda" and nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]


def _open_cache(path: Path, device: torch.device):
    """Open the cache as the engine does (see :func:`_engine_preloads`)."""
    from relkd.data.teacher_cache import TeacherCache

    cache = TeacherCache.open(path, device=device)
    if _engine_preloads(cache.nbytes, device):
        cache = TeacherCache.open(path, device=device, preload=True)
    return cache


def _train_step(
    spec: _Spec,
    method_name: str,
    *,
    precision: str,
    channels_last: bool,
    compile_: bool,
    teacher: str = "none",  # "none" | "online" | "cached"
    cache: Callable[[], Any] | None = None,
    cold: bool = False,
) -> Callable[[], Callable[[int], Any]]:
    """A build of the engine's :class:`~relkd.engine.step.TrainStep` on the synthetic batch;
    step ``i`` gets its own sample indices (and, cached, its own drawn crop / flip)."""

    def build() -> Callable[[int], Any]:
        from relkd.config import OptimConfig, TrainConfig
        from relkd.engine.build import build_optimizer, build_step
        from relkd.engine.teacher import CachedTeacher

        device = spec.device
        parts = _parts(spec, method_name, teacher != "none")
        method, distiller = parts.method, parts.distiller.to(device)
        if channels_last:
            distiller = distiller.to(memory_format=torch.channels_last)
        tea: Any = None
        drop: tuple[str, ...] = ()
        if teacher == "online" and parts.teacher is not None:
            tea = parts.teacher.to(device)
        elif teacher == "cached":
            # As the engine: the cached teacher reads index + the drawn augmentation, which are
            # dropped before the method (index kept when the method wants it).
            tea = CachedTeacher(cache())
            drop = ("aug_offsets", "aug_flips")
            drop += () if "index" in method.batch_extras else ("index",)
        del parts
        oc = OptimConfig()
        params = [p for p in distiller.parameters() if p.requires_grad]
        opt = build_optimizer(oc, params, oc.lr)
        tc = TrainConfig  # the defaults of train.*
        train_step = build_step(
            distiller, distiller, opt, device=device, precision=precision, compile=compile_,
            compile_mode=tc.compile_mode, teacher=tea, drop_extras=drop,
            channels_last=channels_last, method_name=method_name, params=params,
        )  # fmt: skip
        method.set_phase("main")
        method.set_epoch(0)
        distiller.train()
        x0, y0, extras0 = _synthetic_batch(spec, method)
        n = spec.warmup + spec.steps
        per_step: dict[str, torch.Tensor] = {}  # [steps, B, ...] per-step extras
        if "index" in method.batch_extras or teacher == "cached":
            per_step["index"] = _index_pool(spec, n, len(x0))
        if teacher == "cached":
            p = _padding(spec.image_size)
            g = torch.Generator().manual_seed(spec.seed + 2)
            per_step["aug_offsets"] = torch.randint(0, 2 * p + 1, (n, len(x0), 2), generator=g)
            per_step["aug_flips"] = torch.randint(0, 2, (n, len(x0)), generator=g).bool()
        per_step = {k: v.to(device) for k, v in per_step.items()}

        def step(i: int) -> None:
            train_step(x0, y0, {**extras0, **{k: v[i] for k, v in per_step.items()}})
            if (i + 1) % tc.log_every == 0:  # fit's read point (the one host read)
                with contextlib.suppress(RelkdError):  # non-finite: counted by _Run.finish
                    train_step.read()

        # _Run reads the on-device sums once more after the timed steps (untimed): the number
        # of non-finite steps; with on_nonfinite "stop" the read raises instead.
        step.stats = train_step.read  # type: ignore[attr-defined]
        if cold:  # _Run calls this untimed before every step
            step.before = functools.partial(_evict_pages, tea.cache)  # type: ignore[attr-defined]
        return step

    return build


def _teacher_forward(spec: _Spec, channels_last: bool) -> Callable[[], Callable[[int], Any]]:
    def build() -> Callable[[int], Any]:
        from relkd.engine.teacher import Teacher

        # As in the engine's step: no taps for a logit method, the model not converted to
        # channels-last (only the input is), and no autocast (the engine calls the teacher
        # outside amp_ctx).
        tea = Teacher(spec.create(spec.teacher)).to(spec.device)
        g = torch.Generator().manual_seed(spec.seed)
        x = torch.randn(spec.shape(spec.batch), generator=g).to(spec.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def step(i: int) -> None:
            tea(x)

        return step

    return build


def _norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from relkd.data import transforms as T

    if in_chans == 3:
        return T.CIFAR100_MEAN, T.CIFAR100_STD
    if in_chans == 1:
        return T.FASHION_MNIST_MEAN, T.FASHION_MNIST_STD
    return (0.5,) * in_chans, (0.25,) * in_chans


def _fake_split(spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 [N, H, W, C] array of random pixels and int64 labels (a CIFAR-shaped split)."""
    rng = np.random.default_rng(spec.seed)
    s, c, n = spec.image_size, spec.in_chans, spec.num_train_samples
    data = rng.integers(0, 256, size=(n, s, s, c), dtype=np.uint8)
    return data, rng.integers(0, spec.num_classes, size=n).astype(np.int64)


def _padding(image_size: int) -> int:
    return 4 if image_size >= 32 else 2  # as the engine's default crop padding


def _cycling(make_iter: Callable[[int], Iterable[Any]]) -> Callable[[int], Any]:
    """A step that takes the next batch, starting a new epoch when one runs out."""
    state: dict[str, Any] = {"epoch": 0}
    state["it"] = iter(make_iter(0))

    def step(i: int) -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["epoch"] += 1
            state["it"] = iter(make_iter(state["epoch"]))
            return next(state["it"])

    return step


def _data(spec: _Spec, workers: int | None) -> Callable[[], Callable[[int], Any]]:
    """The input pipeline over a fake uint8 split: ``InMemoryLoader`` (``workers`` None) or a
    ``DataLoader`` over ``ArrayImageDataset`` with ``workers`` workers, batches to the device
    (as the engine's loaders deliver them)."""

    def build() -> Callable[[int], Any]:
        from relkd.data import ArrayImageDataset, InMemoryLoader
        from relkd.data.transforms import crop_flip_transforms

        data, targets = _fake_split(spec)
        mean, std = _norm_stats(spec.in_chans)
        pad, dev, cuda = _padding(spec.image_size), spec.device, spec.device.type == "cuda"
        if workers is None:
            loader = InMemoryLoader(
                torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(targets), batch_size=spec.batch, shuffle=True, augment=True,
                padding=pad, flip=True, mean=mean, std=std, device=dev, seed=spec.seed,
            )  # fmt: skip
            del data
        else:
            train_tf, _ = crop_flip_transforms(spec.image_size, pad, mean, std)
            ds = ArrayImageDataset(data, targets, transform=train_tf, mean=mean, std=std)

        def epoch(e: int) -> Iterable[Any]:
            if workers is None:
                loader.set_epoch(e)
                return loader
            batches = torch.utils.data.DataLoader(
                ds, batch_size=spec.batch, shuffle=True, num_workers=workers, pin_memory=cuda,
                generator=torch.Generator().manual_seed(spec.seed + e), persistent_workers=False,
            )  # fmt: skip
            return ((x.to(dev, non_blocking=cuda), y.to(dev)) for x, y in batches)

        return _cycling(epoch)

    return build
