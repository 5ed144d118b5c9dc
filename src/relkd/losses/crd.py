"""Contrastive Representation Distillation (Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020, arXiv 1910.10699): the NCE math and the memory-bank update.

Each training sample i has a slot in two memory banks of L2-normalised 128-d embeddings, one for
the student and one for the teacher. A batch element is scored against K + 1 rows of the *other*
model's bank: its own row (the positive) and K sampled rows (negatives). With the noise
distribution P_n = 1 / N uniform over the N training samples, the paper's NCE objective (Eq. 18)
treats h = P / (P + K P_n) as the probability that a pair came from the data distribution, where
P = exp(<v, m> / T) / Z and Z is a constant estimated once, from the first batch, as
N * mean(exp(<v, m> / T)) (the official code does the same). After scoring, the positive rows are
moved towards the new embeddings: m <- normalise(momentum * m + (1 - momentum) * v).

Our own code, written from the paper and from reading the public RepDistiller code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: keeps the log ratios finite when the scores underflow (same role as in the reference code).
NCE_EPS = 1e-7


def sample_contrast_index(
    index: torch.Tensor, num_data: int, num_negatives: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, K + 1] memory rows to score: column 0 the positive ``index`` [B], then K negatives.

    Negatives are drawn uniformly with replacement from the N - 1 *other* samples (the positive
    never appears as its own negative): the method's ``negatives="any"`` option. The official
    CIFAR pipeline instead draws them without replacement from samples of other classes (the
    method's default, :func:`sample_other_class_index`); ContrastMemory's fallback draws
    uniformly from all N. With C classes about 1 / C of these negatives share the anchor's class.
    """
    if num_data < 2:
        raise ValueError(f"CRD needs at least 2 training samples, got num_data={num_data}")
    b = index.shape[0]
    neg = torch.randint(
        0, num_data - 1, (b, num_negatives), device=index.device, generator=generator
    )
    neg = neg + (neg >= index[:, None]).long()  # skip the positive: map [0, N-1) onto the others
    return torch.cat([index[:, None].long(), neg], dim=1)


def sample_other_class_index(
    index: torch.Tensor,
    labels: torch.Tensor,
    num_negatives: int,
    *,
    replacement: bool = False,
    generator: torch.Generator | None = None,
    chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """[B, K + 1] memory rows to score: column 0 the positive ``index`` [B], then K negatives
    drawn uniformly from the samples of *other classes* (RepDistiller's CIFAR-100 CRD sampler).

    Args:
        index: [B] dataset indices of the anchors; their labels ``labels[index]`` must be known.
        labels: [N] class label of every training sample; ``-1`` marks a sample whose label is
            not known yet: it counts as another class for every anchor (see
            :class:`relkd.methods.crd.CRD`).
        num_negatives: K.
        replacement: False (default): without replacement, as the official CIFAR loader
            (``np.random.choice(..., replace=False)``), falling back to with replacement for an
            anchor whose class leaves fewer than K candidates (the official rule). True: with
            replacement (the official ImageNet loader; cheaper).
        chunk_elems: rows drawn without replacement take one uniform key per candidate
            ([rows, N]; the K smallest keys are a uniform K-subset); they are drawn in chunks of at
            most this many elements so memory stays bounded for large N (ImageNet: 1.28M).

    The anchor's whole class, the anchor itself included, is never drawn. Candidates are
    addressed through the class-sorted order of ``labels``: the anchor's class is one contiguous
    block there, so with replacement a draw is one random integer per negative.
    """
    n, b, k = labels.shape[0], index.shape[0], num_negatives
    index = index.long()
    anchor = labels[index]
    if bool((anchor < 0).any()):
        raise ValueError("sample_other_class_index: the anchors' labels must be known (>= 0)")
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    lo = torch.searchsorted(sorted_labels, anchor)  # the anchor class: order[lo:hi]
    own = torch.searchsorted(sorted_labels, anchor, right=True) - lo
    m = n - own  # candidates per anchor
    if bool((m == 0).any()):
        bad = int(anchor[m == 0][0])
        raise ValueError(f"CRD: no sample of another class than {bad} to draw negatives from")
    out = torch.empty(b, k, dtype=torch.long, device=labels.device)
    with_repl = (m < k) | replacement
    rows = with_repl.nonzero().flatten()
    if rows.numel():
        # uniform in [0, m) per row (modulo bias < m / 2**62), then skip the anchor's block
        r = torch.randint(0, 2**62, (rows.numel(), k), device=labels.device, generator=generator)
        r = r % m[rows, None]
        out[rows] = order[r + (r >= lo[rows, None]) * own[rows, None]]
    rows = (~with_repl).nonzero().flatten()
    pos = torch.arange(n, device=labels.device)
    step = max(1, chunk_elems // max(n, 1))
    for chunk in rows.split(step) if rows.numel() else ():
        keys = torch.rand((chunk.numel(), n), device=labels.device, generator=generator)
        block = (pos[None, :] >= lo[chunk, None]) & (pos[None, :] < (lo + own)[chunk, None])
        keys.masked_fill_(block, 2.0)  # never among the K smallest (keys < 1)
        # sorted=False: the loss does not depend on the order of the negatives
        picked = torch.topk(keys, k, dim=1, largest=False, sorted=False).indices
        out[chunk] = order[picked]
    return torch.cat([index[:, None], out], dim=1)


def contrast_scores(
    anchor: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """exp(<memory[j], anchor_i> / T) for the rows j = contrast_index[i]: [B, K + 1], fp32.

    Args:
        anchor: [B, d] L2-normalised embeddings (gradient flows into them).
        memory: [N, d] memory bank (a constant).
        contrast_index: [B, K + 1] from :func:`sample_contrast_index`.
    """
    # fp32 with autocast off: exp(sim / 0.07) of bf16 similarities is off by up to ~10 %.
    with torch.autocast(anchor.device.type, enabled=False):
        mem, a = memory.detach().float(), anchor.float()
        k1 = contrast_index.shape[1]
        if mem.shape[0] <= 4 * k1:
            # Small banks (CIFAR: N = 50k, K + 1 = 16385): all similarities in one matmul, then
            # pick the sampled ones. Same numbers, no [B, K + 1, d] copy of the bank rows.
            # (clone: autograd keeps the bank for backward, and the method updates it in place)
            sim = torch.gather(a @ mem.clone().t(), 1, contrast_index)
        else:  # large banks (ImageNet): gather the sampled rows
            sim = torch.bmm(mem[contrast_index], a[:, :, None])[:, :, 0]
        return torch.exp(sim / temperature)


def estimate_z(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """Monte-Carlo estimate of the partition function Z = N * E[exp(sim / T)] (a constant)."""
    return scores.detach().mean() * num_data


def nce_loss(probs: torch.Tensor, num_data: int) -> torch.Tensor:
    """CRD's NCE loss (paper Eq. 18) for ``probs`` = scores / Z, [B, K + 1] (column 0 positive).

    With m = K and P_n = 1 / N:
    ``-(1/B) sum_i [ log(P_i0 / (P_i0 + m P_n)) + sum_k log(m P_n / (P_ik + m P_n)) ]``.
    """
    m = probs.shape[1] - 1
    mpn = m / float(num_data)
    pos, neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(pos / (pos + mpn + NCE_EPS))
    log_d0 = torch.log(mpn / (neg + mpn + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def crd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    memory_s: torch.Tensor,
    memory_t: torch.Tensor,
    contrast_index: torch.Tensor,
    z_s: torch.Tensor | float,
    z_t: torch.Tensor | float,
    *,
    temperature: float = 0.07,
) -> torch.Tensor:
    """The symmetric CRD loss: student anchored on the teacher bank + teacher on the student bank.

    Args:
        student_emb, teacher_emb: [B, d] L2-normalised embeddings.
        memory_s, memory_t: [N, d] banks of past student / teacher embeddings.
        contrast_index: [B, K + 1], column 0 the batch's own sample indices.
        z_s: normaliser of the student-anchored scores (vs ``memory_t``), see :func:`estimate_z`.
        z_t: normaliser of the teacher-anchored scores (vs ``memory_s``).

    Returns:
        scalar fp32 tensor.
    """
    n = memory_s.shape[0]
    p_s = contrast_scores(student_emb, memory_t, contrast_index, temperature) / z_s
    p_t = contrast_scores(teacher_emb, memory_s, contrast_index, temperature) / z_t
    return nce_loss(p_s, n) + nce_loss(p_t, n)


@torch.no_grad()
def momentum_update(
    memory: torch.Tensor, index: torch.Tensor, emb: torch.Tensor, momentum: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """New rows for the memory bank; ``memory`` itself is not modified.

    ``row_i = normalise(momentum * memory[index_i] + (1 - momentum) * emb_i)``. Returns
    ``(index, rows)`` to apply with ``memory.index_copy_(0, index, rows)``. When an index occurs
    more than once (e.g. DistributedSampler padding), only its last occurrence is kept, so the
    write is deterministic.
    """
    index = index.long()
    order = torch.arange(index.shape[0], device=index.device)
    last = torch.full((memory.shape[0],), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, index, order, reduce="amax")
    keep = last[index] == order
    index, emb = index[keep], emb[keep]
    rows = momentum * memory[index].float() + (1.0 - momentum) * emb.detach().float()
    return index, F.normalize(rows, dim=1).to(memory.dtype)
