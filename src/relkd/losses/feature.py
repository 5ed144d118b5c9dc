"""Feature-map distillation losses of the CRD baseline table (math only).

Every function takes student and teacher maps ``[B, C, H, W]``, detaches the teacher side and
returns a scalar in fp32 (squares, norms and kernels of bf16 activations lose too much).
Where the two maps differ in size, the larger one is average-pooled to the smaller one
(:func:`match_spatial`), the convention of the CRD benchmark code (RepDistiller).

Papers:
    FitNet  Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550.
    AT      Zagoruyko & Komodakis, "Paying More Attention to Attention", arXiv 1612.03928.
    NST     Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
            Transfer", arXiv 1707.01219.
    FSP     Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
            Minimization and Transfer Learning", CVPR 2017.
    AB      Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed
            by Hidden Neurons", arXiv 1811.03233.
    FT      Kim et al., "Paraphrasing Complex Network: Network Compression via Factor
            Transfer", arXiv 1802.04977.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from relkd.losses._precision import fp32, no_autocast


def match_spatial(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool whichever of ``f_s`` / ``f_t`` is larger to the other's ``H x W``
    (per dimension, to the smaller of the two sizes)."""
    (hs, ws), (ht, wt) = f_s.shape[-2:], f_t.shape[-2:]
    h, w = min(hs, ht), min(ws, wt)
    if (hs, ws) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if (ht, wt) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def _prep(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if f_s.ndim != 4 or f_t.ndim != 4:
        raise ValueError(
            f"expected feature maps [B, C, H, W], got {list(f_s.shape)} and {list(f_t.shape)}"
        )
    return match_spatial(fp32(f_s), fp32(f_t.detach()))


@no_autocast
def hint_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """FitNet hint: mean squared error between the regressed student map and the teacher map.

    Args:
        f_s: [B, C, H, W], the student's hint *after* the regressor (same shape as ``f_t``).
        f_t: [B, C, H, W].
    """
    if f_s.shape != f_t.shape:
        raise ValueError(f"hint: regressed student {list(f_s.shape)} != teacher {list(f_t.shape)}")
    return F.mse_loss(fp32(f_s), fp32(f_t.detach()))


@no_autocast
def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention ``Q = vec(mean_c |A_c|^p)``, L2-normalised: [B, C, H, W] -> [B, H*W]."""
    return F.normalize(fp32(f).abs().pow(p).mean(1).flatten(1), dim=1)


@no_autocast
def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer for one stage pair: ``mean((Q_s - Q_t)^2)`` over [B, H*W].

    This is the authors' code form (and RepDistiller's, on which the CRD weight 1000 was tuned);
    the paper writes the un-squared L2 distance instead.
    """
    f_s, f_t = _prep(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@no_autocast
def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer: squared MMD with the polynomial kernel ``k(x, y) = (x.y)^2``.

    Each channel's map, flattened to [H*W] and L2-normalised, is one sample; the two channel
    sets (C_s and C_t of them) are compared per image, averaged over the batch:
    ``mean k(t, t) + mean k(s, s) - 2 mean k(s, t)``.
    """
    f_s, f_t = _prep(f_s, f_t)
    s = F.normalize(f_s.flatten(2), dim=2)  # [B, C_s, HW]
    t = F.normalize(f_t.flatten(2), dim=2)  # [B, C_t, HW]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2)

    return k(t, t).mean() + k(s, s).mean() - 2 * k(s, t).mean()


@no_autocast
def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow-of-solution-procedure matrix ``G_ij = mean_hw F1_i(h, w) F2_j(h, w)``.

    Args:
        first: [B, C1, H1, W1]; second: [B, C2, H2, W2] (the larger is pooled to the smaller).

    Returns:
        [B, C1, C2] in fp32.
    """
    a, b = match_spatial(fp32(first), fp32(second))
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (a.shape[2] * a.shape[3])


@no_autocast
def fsp_loss(feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive stage pairs ``(i, i+1)`` of ``mean((G_s - G_t)^2)``.

    Args:
        feats_s / feats_t: n >= 2 maps each, shallow to deep, with equal channel counts
            stage by stage (the FSP matrices must have the same size).
    """
    if len(feats_s) != len(feats_t) or len(feats_s) < 2:
        raise ValueError(
            f"fsp needs two lists of >= 2 maps of equal length, got {len(feats_s)} / {len(feats_t)}"
        )
    total = torch.zeros((), device=feats_s[0].device)
    for i in range(len(feats_s) - 1):
        g_s = fsp_matrix(feats_s[i], feats_s[i + 1])
        g_t = fsp_matrix(feats_t[i].detach(), feats_t[i + 1].detach())
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp: student matrix {list(g_s.shape)} != teacher {list(g_t.shape)}")
        total = total + (g_s - g_t).pow(2).mean()
    return total


@no_autocast
def ab_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary transfer for one stage (the paper's alternative squared hinge).

    Where the teacher neuron is active (``t > 0``) the student response is pushed above
    ``+margin``, elsewhere below ``-margin``::

        sum( (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0] ) / B

    Args:
        source: [B, C, H, W] student response after the connector (same shape as ``target``).
        target: [B, C, H, W] teacher map; only its sign pattern is used, so the
            post-ReLU map gives the same result as the pre-activation.
    """
    if source.shape != target.shape:
        raise ValueError(f"ab: source {list(source.shape)} != target {list(target.shape)}")
    s, t = fp32(source), target.detach()
    on = t > 0
    loss = (s + margin).pow(2) * ((s > -margin) & ~on) + (s - margin).pow(2) * ((s <= margin) & on)
    return loss.sum() / s.shape[0]


@no_autocast
def ft_loss(
    factor_s: torch.Tensor, factor_t: torch.Tensor, p: int = 1, form: str = "repdistiller"
) -> torch.Tensor:
    """Factor transfer between the translator's and the paraphraser's factors.

    Args:
        factor_s: [B, K, H, W] student factor (translator output).
        factor_t: [B, K, H', W'] teacher factor (paraphraser encoder output).
        p: 1 (paper and CRD default) or 2.
        form: ``"repdistiller"``: each factor is reduced to its L2-normalised spatial map
            ``vec(mean_k F_k^2)`` and the loss is ``mean(|diff|^p)`` (the form the CRD table
            used, weight 200). ``"paper"``: the flattened factors are L2-normalised and the
            loss is the batch mean of ``||diff||_p``.
    """
    f_s, f_t = _prep(factor_s, factor_t)
    if form == "repdistiller":
        return (attention_map(f_s, 2) - attention_map(f_t, 2)).abs().pow(p).mean()
    if form == "paper":
        diff = F.normalize(f_s.flatten(1), dim=1) - F.normalize(f_t.flatten(1), dim=1)
        return diff.norm(p=p, dim=1).mean()
    raise ValueError(f"ft form must be 'repdistiller' or 'paper', got {form!r}")
