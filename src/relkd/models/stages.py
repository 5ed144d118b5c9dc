"""Stages of a model that declares none, derived from one dummy forward pass.

relkd taps features with forward hooks on modules (:class:`relkd.models.base.FeatureTap`), so a
stage is a module name. ``torchvision.models.feature_extraction`` names FX graph nodes instead
(functional ops included) and cannot trace every model (data-dependent control flow), and timm's
``features_only`` machinery needs the model's own ``feature_info``; both serve as the reference
the rule below follows (the one timm's ``feature_info`` and torchvision's extractors encode):

*the output of the last module to finish at each new spatial reduction, shallow to deep.*

One eval-mode, no-grad forward pass records, in completion order, the output shape of every
module (a parent finishes after its children, so the outermost module at a resolution wins,
e.g. ``layer1`` rather than ``layer1.1``). Then:

- ``[B, C, H, W]`` outputs are feature maps; ``[B, H, W, C]`` ones (Swin) are recognised as NHWC
  by which pair of dims is a downscaled copy of the input's (ties keep the previous layout);
  ``[B, L, C]`` token outputs (ViT) count when ``L`` is a few prefix tokens (class /
  distillation / register tokens, at most 8) plus the patch grid of the last map seen;
- reductions are nominal powers of two (``2 ** round(log2(H_in / H))``: a valid 3x3 conv that
  takes 149 to 147 pixels stays in its stage);
- modules called more than once are not candidates (a tap would see only the last call), nor
  are modules inside a block that takes their resolution to a smaller one (the first 1x1 conv
  of a bottleneck whose 3x3 conv has the stride: the block's input is the stage output);
- ``1 x 1`` outputs followed by larger maps are side branches (squeeze-and-excitation) and are
  skipped; among the trailing ``1 x 1`` outputs, the last pooling module (the global pool), when
  only its containers finish after it, and everything after it is the head.

FeatureTap hands NHWC and token stages over as ``[B, C, H, W]`` (permuted; tokens without their
prefix, reshaped to the square grid, as timm's ``forward_intermediates`` does), so every
feature method sees NCHW maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from relkd.models.info import FeatureInfo
from relkd.registry import RelkdError

_MAX_PREFIX = 8


@dataclass
class _Event:
    name: str
    shape: tuple[int, ...] | None
    in_shape: tuple[int, ...] | None
    is_pool: bool


def trace(model: nn.Module, example: torch.Tensor) -> tuple[list[_Event], dict[str, int]]:
    """Output (and first input) shapes of every named submodule in completion order, and each
    one's call count."""
    events: list[_Event] = []
    calls: dict[str, int] = {}
    inputs: dict[str, tuple[int, ...] | None] = {}
    handles = []

    def make(name: str, module: nn.Module):
        is_pool = "pool" in type(module).__name__.lower()

        def pre(_m, args) -> None:
            a = args[0] if args else None
            inputs[name] = tuple(a.shape) if torch.is_tensor(a) else None

        def hook(_m, _a, out) -> None:
            calls[name] = calls.get(name, 0) + 1
            shape = tuple(out.shape) if torch.is_tensor(out) else None
            events.append(_Event(name, shape, inputs.get(name), is_pool))

        return pre, hook

    for name, module in model.named_modules():
        if name:
            pre, hook = make(name, module)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        # fork_rng: a model drawing random numbers in forward leaves the global stream as it was.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return events, calls


def _plausible(h: int, w: int, H: int, W: int) -> bool:
    """(h, w) is a downscaled copy of (H, W): within bounds and of the same aspect (+-1 px)."""
    if not (1 <= h <= H and 1 <= w <= W):
        return False
    return abs(h * W - w * H) <= max(H, W)


def _nominal(H: int, h: int) -> int:
    return 2 ** max(0, round(math.log2(H / h)))


def _spatial(shape: tuple[int, ...] | None, H: int, W: int) -> tuple[int, int] | None:
    """(h, w) of a [B, C, H, W] or [B, H, W, C] map (NCHW preferred), else None."""
    if shape is None or len(shape) != 4:
        return None
    if _plausible(shape[2], shape[3], H, W):
        return shape[2], shape[3]
    if _plausible(shape[1], shape[2], H, W):
        return shape[1], shape[2]
    return None


def _transitions(events: list[_Event], H: int, W: int) -> dict[str, tuple[int, int]]:
    """Modules that take a map of one size to the next smaller one (no map of a size in between
    inside them: a block, not a whole trunk): name -> their input (h, w)."""
    sizes = {ev.name: _spatial(ev.shape, H, W) for ev in events}
    out = {}
    for ev in events:
        i, o = _spatial(ev.in_shape, H, W), sizes.get(ev.name)
        if i is None or o is None or o[0] * o[1] >= i[0] * i[1]:
            continue
        lo, hi, pre = o[0] * o[1], i[0] * i[1], ev.name + "."
        if not any(
            n.startswith(pre) and sp is not None and lo < sp[0] * sp[1] < hi
            for n, sp in sizes.items()
        ):
            out[ev.name] = i
    return out


def derive_feature_info(model: nn.Module, example: torch.Tensor) -> list[FeatureInfo]:
    """Stages of ``model`` by the rule of the module docstring, from one forward of ``example``
    ([1, C, H, W] is enough). ``[]`` when no module outputs a feature map."""
    H, W = int(example.shape[-2]), int(example.shape[-1])
    events, calls = trace(model, example)
    trans = _transitions(events, H, W)
    layout = "NCHW"
    grid: tuple[int, int] | None = None
    # (name, channels, reduction, layout, prefix, h * w, is_pool, usable)
    cands: list[tuple[str, int, int, str, int, int, bool, bool]] = []
    for ev in events:
        s = ev.shape
        if s is None:
            continue
        if len(s) == 4:
            a, b, c = s[1], s[2], s[3]
            nchw, nhwc = _plausible(b, c, H, W), _plausible(a, b, H, W)
            if nchw and nhwc:
                lay = layout
            elif nchw or nhwc:
                lay = "NCHW" if nchw else "NHWC"
            else:
                continue
            layout = lay
            ch, h, w = (a, b, c) if lay == "NCHW" else (c, a, b)
            grid = (h, w)
            prefix = 0
        elif len(s) == 3 and grid is not None and 0 <= s[1] - grid[0] * grid[1] <= _MAX_PREFIX:
            lay, ch, (h, w), prefix = "NLC", s[2], grid, s[1] - grid[0] * grid[1]
        else:
            continue
        # Inside a block that takes this resolution to a smaller one (the first 1x1 conv of a
        # bottleneck whose 3x3 conv has the stride): that block's input is the stage output.
        parts = ev.name.split(".")
        inner = any(trans.get(".".join(parts[:k])) == (h, w) for k in range(1, len(parts)))
        usable = calls.get(ev.name, 0) == 1 and not inner
        cands.append((ev.name, ch, _nominal(H, h), lay, prefix, h * w, ev.is_pool, usable))
    # The head: trailing 1x1 outputs from the last pooling module on.
    tail = len(cands)
    while tail > 0 and cands[tail - 1][5] == 1:
        tail -= 1
    pools = [i for i in range(tail, len(cands)) if cands[i][6]]
    end = len(cands)
    # The global pool: the last trailing pool after which only its own containers finish (a
    # stride-2 pool of a 2x2 map, followed by more blocks, is not the head).
    if pools and all(cands[pools[-1]][0].startswith(c[0] + ".") for c in cands[pools[-1] + 1 :]):
        end = pools[-1]
    stages: list[FeatureInfo] = []
    for i, (name, ch, red, lay, prefix, area, _pool, usable) in enumerate(cands[:end]):
        if area == 1 and i < tail:  # a 1x1 side branch (squeeze-and-excitation)
            continue
        if stages and red < stages[-1].reduction:
            continue  # not a new (deeper) resolution: an inner branch finishing late
        if not usable:
            continue
        info = FeatureInfo(name, int(ch), int(red), lay, int(prefix))
        if stages and stages[-1].reduction == red:
            stages[-1] = info
        else:
            stages.append(info)
    return stages


def example_inputs(model: nn.Module, example: torch.Tensor | None) -> Iterable[torch.Tensor]:
    """``example`` itself, or [1, C, S, S] zeros for the sizes a model may need: its declared
    image size (torchvision ViT ``image_size``, timm ``patch_embed.img_size`` /
    ``pretrained_cfg``), then 224, 64, 32, 28."""
    if example is not None:
        yield example[:1]
        return
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    sizes: list[int] = []
    for s in (
        getattr(model, "image_size", None),
        getattr(getattr(model, "patch_embed", None), "img_size", None),
        (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[-1],
        224,
        64,
        32,
        28,
    ):
        s = s[-1] if isinstance(s, (tuple, list)) else s
        if isinstance(s, int) and s > 0 and s not in sizes:
            sizes.append(s)
    for s in sizes:
        yield torch.zeros(1, chans, s, s)


def derive_with_fallback(model: nn.Module, example: torch.Tensor | None) -> list[FeatureInfo]:
    """:func:`derive_feature_info` on the first input of :func:`example_inputs` the model runs on."""
    errors = []
    for x in example_inputs(model, example):
        try:
            return derive_feature_info(model, x)
        except (RuntimeError, ValueError, AssertionError, TypeError, IndexError) as e:
            errors.append(f"{list(x.shape)}: {str(e).splitlines()[0] if str(e) else type(e)}")
    raise RelkdError(
        f"cannot derive the stages of {type(model).__name__}: no dummy input ran "
        f"({'; '.join(errors)}); give the model a `feature_info` list"
    )


def annotate_layouts(model: nn.Module, infos: list[FeatureInfo]) -> list[FeatureInfo]:
    """Declared stages (e.g. timm's) with their output layout measured by one dummy forward:
    ``[B, C, H, W]``, ``[B, H, W, C]`` or tokens ``[B, L, C]`` (prefix = the model's
    ``num_prefix_tokens`` or what exceeds a square grid)."""
    names = {i.name for i in infos}
    shapes: dict[str, tuple[int, ...]] = {}
    for x in example_inputs(model, None):
        try:
            events, _ = trace(model, x)
        except (RuntimeError, ValueError, AssertionError, TypeError, IndexError):
            continue
        shapes = {e.name: e.shape for e in events if e.name in names and e.shape is not None}
        break
    out = []
    for i in infos:
        s = shapes.get(i.name)
        lay, prefix = "NCHW", 0
        if s is not None and len(s) == 4 and s[1] != i.channels and s[3] == i.channels:
            lay = "NHWC"
        elif s is not None and len(s) == 3 and s[2] == i.channels:
            prefix = getattr(model, "num_prefix_tokens", None)
            if not isinstance(prefix, int):
                prefix = s[1] - math.isqrt(s[1]) ** 2
            lay = "NLC"
        out.append(FeatureInfo(i.name, i.channels, i.reduction, lay, int(prefix)))
    return out
