"""Loss terms of CORSD (Yu et al., "Class-Oriented Relational Self Distillation", arXiv
2305.00918, ICASSP 2023). Pure functions; the method (:mod:`relkd.methods.corsd`) weights them.

From the abstract and the official code (github.com/muzhou-yu/CORSD); the paper body was not
readable to us, so nothing here is "the paper's equation". What is official and what is ours:

- :func:`kl_t`: ours. The official code calls ``F.kl_div(aux_logits_k, aux_logits_0)`` on raw
  logits (not log-probabilities / probabilities), which is not a KL divergence and gives NaN or
  garbage; we use the temperature KL of softmaxes, ``T^2``-scaled, batchmean.
- :func:`soft_ce_t`: official (``CrossEntropy`` in ``distillation.py``), including the quirk that
  the soft target is passed through ``softmax(q / T)``.
- :func:`triplet_hinge`: official formula ``mean(max(p - n + margin, 0))``. With sigmoid scores in
  (0, 1) and margin 1 it is always active (a plain ``mean(p - n + 1)``), i.e. it pushes the
  positive-pair score below the negative-pair one; we keep it as published.
- :func:`relation_mse`: official (deep -> shallow relation matching); the ``detach`` switch is ours.
- :func:`update_class_memory` / :func:`class_centre_relation`: official idea, vectorised by us. The
  official code loops over the samples one at a time, updating the memory before each sample's
  term and calling ``BatchNorm1d`` on a batch of one (which fails in train mode). We update the
  memory with the whole batch first (``index_add_``), then evaluate the class-centre relation net
  once on all true-class and wrong-class pairs together, and average instead of summing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def kl_t(
    logits: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 3.0,
    detach_target: bool = True,
) -> torch.Tensor:
    """``T^2 * KL(softmax(target / T) || softmax(logits / T))``, batchmean, fp32.

    Args:
        logits: [B, C], the learning side (a shallow stage's aux head).
        target_logits: [B, C], the teaching side (the deepest stage's aux head).
        temperature: T > 0.
        detach_target: stop the gradient through ``target_logits`` (KD-style target).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if detach_target:
        target_logits = target_logits.detach()
    # fp32 even under autocast; batchmean = true KL per sample; T^2 keeps the gradient scale.
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(target_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def soft_ce_t(
    logits: torch.Tensor, soft_target: torch.Tensor, temperature: float = 3.0
) -> torch.Tensor:
    """Official ``SoftCE_T``: ``-mean_i sum_c softmax(q_i / T)_c * log_softmax(o_i / T)_c``.

    Args:
        logits: o, [B, C].
        soft_target: q, [B, C] (CORSD passes the two-hot ``(onehot(y_a) + onehot(y_n)) / 2``;
            the official code then softens it once more with ``softmax(q / T)``: kept). No
            gradient flows into q. No ``T^2`` factor (as in the official code).
    """
    q = F.softmax(soft_target.detach().float() / temperature, dim=1)
    return -(q * F.log_softmax(logits.float() / temperature, dim=1)).sum(dim=1).mean()


def two_hot(y_a: torch.Tensor, y_n: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(onehot(y_a) + onehot(y_n)) / 2`` as float [B, C]."""
    return (F.one_hot(y_a, num_classes) + F.one_hot(y_n, num_classes)).float() / 2


def triplet_hinge(p: torch.Tensor, n: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Official relation-score hinge ``mean(max(p - n + margin, 0))``.

    Args:
        p, n: relation scores [B] of the (anchor, positive) and (anchor, negative) pairs.
    """
    return (p.float() - n.float() + margin).clamp_min(0).mean()


def relation_mse(shallow: torch.Tensor, deep: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """``mean((s_k - s_0)^2)``: a shallow stage's relation scores [B] follow the deepest's."""
    if detach:
        deep = deep.detach()
    return (shallow.float() - deep.float()).pow(2).mean()


@torch.no_grad()
def update_class_memory(
    memory: torch.Tensor, targets: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """In place: ``M[y_i] += probs_i`` for every sample i (a running sum, official "ema").
    Samples of the same class all add up (``index_add_``). Returns ``memory``.

    Args:
        memory: M, [C, C] (row c = accumulated class-c predictions; initialised to identity).
        targets: y, int64 [N].
        probs: softmax(z), [N, C]; never differentiated.
    """
    return memory.index_add_(0, targets, probs.detach().to(memory.dtype))


def random_wrong_class(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly random class != y for every sample, ``(y + U{1..C-1}) % C`` (official rule)."""
    shift = torch.randint(1, num_classes, targets.shape, device=targets.device)
    return (targets + shift) % num_classes


def class_centre_relation(
    relation_net: Callable[[torch.Tensor], torch.Tensor],
    probs: torch.Tensor,
    memory: torch.Tensor,
    targets: torch.Tensor,
    wrong: torch.Tensor,
) -> torch.Tensor:
    """``mean_i [R([p_i, M[y_i]]) - R([p_i, M[y'_i]])]`` with R the class-centre relation net.

    Evaluated in one batched call of R on the 2N pairs, so its ``BatchNorm1d`` sees a real batch
    (N >= 1 gives 2 rows) and normalises true-class and wrong-class pairs together.

    Args:
        relation_net: maps [2N, 2C] -> [2N, 1] scores in (0, 1).
        probs: softmax(z), [N, C] (differentiable: the student learns through it).
        memory: M, [C, C] (constant).
        targets, wrong: int64 [N], the true and a wrong class per sample.
    """
    m = memory.detach().to(probs.dtype)
    pairs = torch.cat(
        [torch.cat([probs, m[targets]], dim=1), torch.cat([probs, m[wrong]], dim=1)], dim=0
    )
    r = relation_net(pairs).float().reshape(-1)
    n = probs.shape[0]
    return (r[:n] - r[n:]).mean()
