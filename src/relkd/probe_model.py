"""The model of ``relkd probe`` (:mod:`relkd.probe`, where the protocol is described).

:class:`LinearProbe` is a frozen backbone (no grad, eval mode whatever ``train()`` is called
with) whose pooled features feed a new ``nn.Linear`` head; :func:`init_head` and
:func:`head_optimizer` are the protocol's head init and SGD over the head alone;
:func:`build_probe` loads a student checkpoint (strictly) into one. These names stay importable
from :mod:`relkd.probe`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from relkd.registry import RelkdError


def init_head(head: nn.Linear, std: float = 0.01) -> nn.Linear:
    """The protocol's head init: weights ~ N(0, std) (std 0.01), bias 0."""
    with torch.no_grad():
        head.weight.normal_(0.0, std)
        if head.bias is not None:
            head.bias.zero_()
    return head


class LinearProbe(nn.Module):
    """A frozen backbone's pooled features -> a new ``nn.Linear`` head.

    The backbone's parameters get ``requires_grad=False`` and the backbone stays in eval mode
    whatever ``train()`` is called with (BatchNorm uses and keeps its running statistics; dropout
    is off). :meth:`features` taps the input of the backbone's classifier
    (:data:`relkd.models.POOLED`) under ``no_grad``; only :attr:`head` is trainable.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, init_std: float = 0.01
    ) -> None:
        super().__init__()
        from relkd.models import POOLED, FeatureTap

        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.head = init_head(nn.Linear(feature_dim, num_classes), init_std)
        self._key = POOLED
        self._tap = FeatureTap(backbone, [POOLED])
        self.backbone.eval()

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: BN statistics never move
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, D] (float32, no graph)."""
        if self.backbone.training:  # someone called backbone.train() directly
            self.backbone.eval()
        return self._tap(x).feats[self._key].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def head_optimizer(
    probe: LinearProbe, *, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD over the head's parameters only (the backbone is not even handed to the optimizer)."""
    return torch.optim.SGD(
        list(probe.head.parameters()), lr=lr, momentum=momentum, weight_decay=weight_decay
    )


def build_probe(
    model_name: str,
    checkpoint: str | os.PathLike[str],
    *,
    num_source_classes: int,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    model_kwargs: Mapping[str, Any] | None = None,
    init_std: float = 0.01,
) -> LinearProbe:
    """Load the student ``model_name`` (``num_source_classes`` outputs) from ``checkpoint`` and
    wrap it in a :class:`LinearProbe` with a fresh ``num_classes`` head.

    The checkpoint is loaded strictly (the official code uses ``strict=False``, which silently
    probes a partly random network when the names do not match); a mismatch is a RelkdError.
    """
    from relkd.engine.build import model_kwargs as with_in_chans
    from relkd.engine.build import probe_shapes
    from relkd.models import POOLED, create_model, load_checkpoint

    # in_chans by training's rule: only where the factory takes it (a grey factory without an
    # in_chans parameter is built as it is, as relkd train builds it)
    kw = with_in_chans(model_name, model_kwargs or {}, in_channels)
    backbone = create_model(model_name, num_source_classes, **kw)
    try:
        load_checkpoint(backbone, checkpoint)
    except RelkdError as e:
        if "does not match" not in str(e):
            raise
        raise RelkdError(
            f"{e}\n(the probe builds {model_name!r} with num_source_classes={num_source_classes}"
            f"{f' and {kw}' if kw else ''}; model, class count and architecture arguments must "
            "match the checkpoint)"
        ) from e
    dummy = torch.zeros(2, in_channels, image_size, image_size)
    shapes = probe_shapes(backbone, [POOLED], dummy)
    if len(shapes[POOLED]) != 1:
        raise RelkdError(f"{model_name}: pooled features have shape {shapes[POOLED]}, expected [D]")
    return LinearProbe(backbone, shapes[POOLED][0], num_classes, init_std)
