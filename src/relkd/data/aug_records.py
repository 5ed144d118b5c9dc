"""FKD-style augmentation records: one epoch of RandomResizedCrop (+ flip) parameters.

Continuous transforms (RandomResizedCrop on ImageNet) have no finite outcome set, so the exact
cache of :mod:`relkd.data.teacher_cache` cannot hold them; the record-and-replay of
:mod:`relkd.data.replay` (``train.teacher_replay``) instead stores the teacher's outputs per
(epoch, sample) for crops drawn reproducibly from a replay seed.
:func:`draw_resized_crop_params` draws the parameters (it is what the replay data set uses per
sample), :func:`save_aug_record` / :func:`load_aug_record` keep a whole epoch of them in a file
and :func:`apply_resized_crop` replays one. These names stay importable from
:mod:`relkd.data.teacher_cache`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relkd.data.memory import _mix_seed
from relkd.registry import RelkdError


def draw_resized_crop_params(
    heights: torch.Tensor | Sequence[int],
    widths: torch.Tensor | Sequence[int],
    *,
    seed: int,
    epoch: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    attempts: int = 10,
) -> torch.Tensor:
    """One epoch of RandomResizedCrop (+ flip) parameters, int64 [N, 5] = (top, left, h, w, flip),
    for images of sizes ``heights[i] x widths[i]``, reproducible from ``(seed, epoch)`` alone.

    The distribution is torchvision's ``RandomResizedCrop.get_params`` (area uniform in
    ``scale``, log-ratio uniform in ``ratio``, the first of ``attempts`` draws that fits, else
    the central crop of the clamped ratio) -- the draw stream is not torchvision's. Record the
    result with :func:`save_aug_record` and replay it with :func:`apply_resized_crop`, so the
    teacher's outputs for an epoch can be computed once (FKD-style) and matched by sample.
    """
    hs = torch.as_tensor(heights, dtype=torch.float64)
    ws = torch.as_tensor(widths, dtype=torch.float64)
    n = hs.numel()
    g = torch.Generator().manual_seed(_mix_seed(seed, epoch, "resized_crop"))
    area = hs * ws
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = torch.rand(n, attempts, 4, generator=g, dtype=torch.float64)
    target = area[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ar = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
    cw = torch.round(torch.sqrt(target * ar))
    ch = torch.round(torch.sqrt(target / ar))
    ok = (cw > 0) & (ch > 0) & (cw <= ws[:, None]) & (ch <= hs[:, None])
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    h_sel, w_sel = ch[rows, pick], cw[rows, pick]
    top = torch.floor(u[rows, pick, 2] * (hs - h_sel + 1))
    left = torch.floor(u[rows, pick, 3] * (ws - w_sel + 1))
    # Fallback (no attempt fitted): torchvision's central crop.
    in_ratio = ws / hs
    fb_w = torch.where(
        in_ratio < ratio[0], ws, torch.where(in_ratio > ratio[1], torch.round(hs * ratio[1]), ws)
    )
    fb_h = torch.where(
        in_ratio < ratio[0], torch.round(ws / ratio[0]), torch.where(in_ratio > ratio[1], hs, hs)
    )
    fb = first < 0
    h_sel = torch.where(fb, fb_h, h_sel)
    w_sel = torch.where(fb, fb_w, w_sel)
    top = torch.where(fb, torch.div(hs - fb_h, 2, rounding_mode="floor"), top)
    left = torch.where(fb, torch.div(ws - fb_w, 2, rounding_mode="floor"), left)
    flips = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.long)
    return torch.stack([top.long(), left.long(), h_sel.long(), w_sel.long(), flips], 1)


def save_aug_record(folder: str | os.PathLike, epoch: int, params: torch.Tensor) -> Path:
    """Write one epoch's drawn parameters [N, P] atomically to ``folder/aug_epoch{epoch}.npy``."""
    from relkd._fs import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, params.detach().cpu().numpy())
    path = folder / f"aug_epoch{int(epoch)}.npy"
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_aug_record(folder: str | os.PathLike, epoch: int) -> torch.Tensor:
    """The parameters :func:`save_aug_record` wrote for ``epoch``."""
    path = Path(folder) / f"aug_epoch{int(epoch)}.npy"
    if not path.is_file():
        raise RelkdError(f"no augmentation record for epoch {epoch} in {str(folder)!r}")
    return torch.from_numpy(np.load(path))


def apply_resized_crop(img: Any, params: torch.Tensor | Sequence[int], size: int) -> Any:
    """Replay one recorded (top, left, h, w, flip) on a PIL image or tensor [C, H, W]:
    ``resized_crop`` to ``size x size`` (bilinear, antialiased, as RandomResizedCrop), then a
    horizontal flip when recorded."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    top, left, h, w, f = (int(v) for v in params)
    out = TF.resized_crop(
        img, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True
    )
    return TF.hflip(out) if f else out
