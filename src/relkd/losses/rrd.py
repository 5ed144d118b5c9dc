"""Relational Representation Distillation (Giakoumoglou & Stathaki, "Relational Representation
Distillation", arXiv 2407.12073).

RRD relaxes a contrastive objective: instead of picking the positive out of negatives (CRD), the
student matches the teacher's *distribution of similarities* to a memory queue of past teacher
embeddings:

    s_s = z_s Q^T,  s_t = z_t Q^T                               # [B, K] cosine similarities
    L   = -(1/B) sum_i sum_k softmax(s_t,i / tau_t)_k * log softmax(s_s,i / tau_s)_k

Decisions (see the docs of :class:`relkd.methods.rrd.RRD` for the full list):

* Temperatures: this function's defaults ``tau_s = 0.04``, ``tau_t = 0.1`` are the official code's
  while the paper was at v1-v4; later code, after paper v5, uses 0.1 / 0.02. The method picks
  them by its ``version`` preset (default ``"v5"`` since 2026-12-01, chosen on a validation split:
  :class:`relkd.methods.rrd.RRD`).
* Queue order: this function only scores against the queue it is given. Whether the current
  batch is enqueued before (code after Feb 2025, the v5 preset) or after (v1-v4 code, the v4
  preset) scoring is the caller's choice; :func:`ring_buffer_enqueue` does the enqueue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rrd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    queue: torch.Tensor,
    *,
    tau_s: float = 0.04,
    tau_t: float = 0.1,
    detach_target: bool = True,
) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's similarity distributions.

    Args:
        student_emb: z_s [B, d], L2-normalised.
        teacher_emb: z_t [B, d], L2-normalised.
        queue: Q [K, d], L2-normalised rows; always treated as a constant (no gradient).
        tau_s: student temperature (0.04, the v1-v4 code; sharper than the teacher's).
        tau_t: teacher temperature (0.1).
        detach_target: the official code detaches the target distribution; ``False`` lets a
            gradient reach ``teacher_emb`` (used by the ``teacher_proj="shared"`` variant).

    Returns:
        scalar fp32 tensor: mean over the batch of sum_k -p_t,k log p_s,k.
    """
    if tau_s <= 0 or tau_t <= 0:
        raise ValueError(f"temperatures must be > 0, got tau_s={tau_s}, tau_t={tau_t}")
    # fp32 with autocast off (it would run the matmuls in bf16): bf16 similarities divided by
    # 0.04 lose the differences that the softmax resolves.
    with torch.autocast(student_emb.device.type, enabled=False):
        q = queue.detach().float()
        t = teacher_emb.float()
        if detach_target:
            t = t.detach()
        log_p_s = F.log_softmax(student_emb.float() @ q.T / tau_s, dim=1)
        p_t = F.softmax(t @ q.T / tau_t, dim=1)
        return -(p_t * log_p_s).sum(dim=1).mean()


@torch.no_grad()
def ring_buffer_enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write ``keys`` [n, d] into the FIFO ``queue`` [K, d] at ``ptr`` (one-element long tensor),
    wrapping around; advance ``ptr`` by n modulo K. Both are updated in place.

    Any n is accepted (the official queue asserts K % n == 0): the result is that of writing the
    rows one at a time, so a batch larger than K leaves its last K rows, the oldest first at the
    new pointer. Index arithmetic stays on the device (no host sync).
    """
    k, n = queue.shape[0], keys.shape[0]
    if n == 0:
        return
    keys = keys.detach().to(queue.dtype)
    skip = max(n - k, 0)  # rows that a one-at-a-time write would overwrite within this call
    pos = (ptr + skip + torch.arange(n - skip, device=queue.device)) % k
    queue.index_copy_(0, pos, keys[skip:])
    ptr.copy_((ptr + n) % k)
