"""The data paths of ``relkd probe`` (:mod:`relkd.probe`).

Train batches come from the on-device :class:`~relkd.data.InMemoryLoader` where possible: for
in-memory data sets, and for file-based splits whose pipeline is exactly [Resize] + RandomCrop +
flip + ToTensor + Normalize (:func:`file_pipeline`), decoded and resized once
(:func:`materialize_file_split`); otherwise from a DataLoader. Evaluation batches are never
augmented, and :func:`extract_features` runs the frozen backbone over them once. These names
stay importable from :mod:`relkd.probe`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from relkd.probe_model import LinearProbe
from relkd.registry import RelkdError

#: Materialise a file-based train split in memory only below this many bytes (uint8 images).
_MAX_IN_MEMORY_BYTES = 4 << 30


def file_pipeline(ds: Dataset) -> dict[str, Any] | None:
    """Describe a FileImageDataset's transform when it is exactly
    ``[Resize((s, s))] + [RandomCrop(s, p)] + [RandomHorizontalFlip()] + ToTensor + Normalize``
    (zero fill, bilinear resize), else None. Such a split can be decoded + resized once and
    augmented on the device by :class:`relkd.data.InMemoryLoader` with the same distribution."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from relkd.data import FileImageDataset

    if not isinstance(ds, FileImageDataset) or not isinstance(ds.transform, T.Compose):
        return None
    ts = list(ds.transform.transforms)
    if len(ts) < 2 or not isinstance(ts[-2], T.ToTensor) or not isinstance(ts[-1], T.Normalize):
        return None
    out: dict[str, Any] = {
        "resize": None, "padding": 0, "flip": False, "crop": None,
        "mean": tuple(float(m) for m in ts[-1].mean), "std": tuple(float(s) for s in ts[-1].std),
    }  # fmt: skip
    order = 0  # each of resize, crop, flip at most once, in that order
    for t in ts[:-2]:
        if isinstance(t, T.Resize) and order == 0:
            size = t.size if isinstance(t.size, (list, tuple)) else ()
            if len(size) != 2 or size[0] != size[1] or t.max_size is not None:
                return None
            if t.interpolation != InterpolationMode.BILINEAR:
                return None
            out["resize"], order = int(size[0]), 1
        elif isinstance(t, T.RandomCrop) and order <= 1:
            pad = t.padding if isinstance(t.padding, (list, tuple)) else [t.padding]
            if len(set(pad)) != 1 or t.size[0] != t.size[1] or t.pad_if_needed:
                return None
            if t.fill != 0 or t.padding_mode != "constant":
                return None
            out["crop"], out["padding"], order = int(t.size[0]), int(pad[0] or 0), 2
        elif isinstance(t, T.RandomHorizontalFlip) and order <= 2 and t.p == 0.5:
            out["flip"], order = True, 3
        else:
            return None
    if out["resize"] and out["crop"] and out["crop"] != out["resize"]:
        return None
    return out


def _decode_resized(path: str, size: int | None) -> np.ndarray:
    from PIL import Image

    from relkd.data import load_image

    img = load_image(path)  # RGB, as FileImageDataset does
    if size is not None:
        img = img.resize((size, size), Image.Resampling.BILINEAR)  # == transforms.Resize((s, s))
    return np.asarray(img)


def materialize_file_split(
    ds: Dataset, pipeline: dict[str, Any], workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode (and resize) every image of a FileImageDataset once: (uint8 [N, C, H, W], int64 [N]),
    or None when the images do not share the size the pipeline crops (then use a DataLoader)."""
    samples: list[tuple[str, int]] = ds.samples  # type: ignore[attr-defined]
    size = pipeline["resize"]
    side = size or pipeline["crop"]
    if side is not None and len(samples) * side * side * 3 > _MAX_IN_MEMORY_BYTES:
        return None
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:  # Pillow releases the GIL while decoding
        arrays = list(ex.map(lambda s: _decode_resized(s[0], size), samples))
    if not arrays:
        return None
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays) or shape[0] != shape[1]:
        return None
    if pipeline["crop"] is not None and shape[0] != pipeline["crop"]:
        return None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor([t for _, t in samples], dtype=torch.long)
    return x, y


def train_loader_for(
    ds: Dataset, *, batch_size: int, seed: int, device: torch.device, num_workers: int,
    in_memory: str, log: Any,
) -> tuple[Any, str]:  # fmt: skip
    """Shuffled, augmented train batches: on-device when possible, else a DataLoader."""
    from relkd.data import InMemoryLoader, supports_in_memory
    from relkd.engine.plan import EpochLoader

    if in_memory != "false" and supports_in_memory(ds):
        loader = InMemoryLoader.from_dataset(
            ds, batch_size=batch_size, shuffle=True, device=device, seed=seed
        )
        return loader, "in_memory"
    if in_memory != "false":
        pipe = file_pipeline(ds)
        if pipe is not None:
            t0 = time.time()
            tensors = materialize_file_split(ds, pipe, workers=max(1, num_workers) * 2)
            if tensors is not None:
                log(f"decoded {len(tensors[1])} train images once in {time.time() - t0:.1f}s")
                loader = InMemoryLoader(
                    *tensors, batch_size=batch_size, shuffle=True,
                    augment=pipe["padding"] > 0 or pipe["flip"], padding=pipe["padding"],
                    flip=pipe["flip"], mean=pipe["mean"], std=pipe["std"], device=device,
                    seed=seed,
                )  # fmt: skip
                return loader, "in_memory_decoded"
    if in_memory == "true":
        raise RelkdError(
            "in_memory=true but the train split has no in-memory form (its images are files "
            "with a pipeline other than [Resize] + RandomCrop + flip); use auto or false"
        )
    return EpochLoader(ds, batch_size, num_workers, seed, None, device), "dataloader"


def eval_loader(
    ds: Dataset, *, batch_size: int, device: torch.device, num_workers: int, in_memory: str
) -> Any:
    """Unshuffled, unaugmented batches over ``ds`` (one pass, for feature extraction)."""
    from relkd.data import InMemoryLoader, supports_in_memory

    if in_memory != "false" and supports_in_memory(ds):
        return InMemoryLoader.from_dataset(
            ds, batch_size=batch_size, shuffle=False, augment=False, device=device
        )
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def extract_features(
    probe: LinearProbe, loader: Any, device: torch.device, *, progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Pooled features [N, D] and labels [N] of every batch of ``loader`` (on ``device``);
    ``progress``: a progress bar on stderr."""
    from relkd.engine.plan import unpack
    from relkd.progress import progress as _progress

    feats, labels = [], []
    for batch in _progress(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        x, y, _ = unpack(batch, device)
        feats.append(probe.features(x))
        labels.append(y)
    if not feats:
        raise RelkdError("the data split is empty: no features to probe")
    return torch.cat(feats), torch.cat(labels)
