"""CRD: Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020,
arXiv 1910.10699)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from relkd import distributed as D
from relkd.losses.crd import (
    contrast_scores,
    crd_loss,
    estimate_z,
    momentum_update,
    sample_contrast_index,
    sample_other_class_index,
)
from relkd.methods.base import Method, MethodContext, register_method
from relkd.methods.rrd import pooled_dim
from relkd.models.base import POOLED
from relkd.registry import RelkdError

#: where CRD's negatives come from (see :class:`CRD`).
NEGATIVES = ("other_class", "any")


@register_method("crd")
class CRD(Method):
    """``weight * (NCE(student vs teacher bank) + NCE(teacher vs student bank))``.

    Embeddings: ``l2norm(Linear(f))`` of the pooled features, [B, D_s] / [B, D_t] -> [B, dim],
    both trainable (as in the paper). Memory banks ``memory_s`` / ``memory_t`` [N, dim] hold a
    momentum average of each training sample's embeddings (N = ``ctx.num_train_samples``); they
    need the dataset index of every batch element (batch extra ``"index"``, [B]).

    CRD protocol defaults (paper and RepDistiller): weight 0.8, CE weight 1, 16384 negatives,
    NCE temperature 0.07, memory momentum 0.5, 128-d embeddings, memory rows initialised
    uniform in +-sqrt(3 / dim) (expected unit norm), Z estimated once from the first training
    batch, memory updated after scoring. "crd+kd" adds KD with weight 1 (composition).

    Negatives (``negatives``):

    - ``"other_class"`` (default): as RepDistiller's CIFAR-100 CRD runs (its
      ``CIFAR100InstanceSample``, whose mode "exact" only means the positive is the anchor's own
      index): K negatives from samples of *other classes* only, without replacement
      (``neg_replacement=False``; with replacement for a class that leaves fewer than K
      candidates, the same rule; ``neg_replacement=True`` is the official ImageNet loader's
      with-replacement draw). See :func:`relkd.losses.crd.sample_other_class_index`.
    - ``"any"``: relkd's behaviour before this option (bit-identical): uniform with replacement
      from the N - 1 other samples (about 1 / C of them share the anchor's class), see
      :func:`relkd.losses.crd.sample_contrast_index`.

    The method receives no label table from the engine, so in ``"other_class"`` mode it keeps one:
    ``labels`` [N] (a buffer, saved with checkpoints), -1 = not seen yet, filled from each
    training batch's (gathered) targets *before* its negatives are drawn. From the second epoch on
    every label is known and no negative shares the anchor's class, exactly as in RepDistiller.
    During the first epoch a not-yet-seen sample counts as another class; such a sample's memory
    rows are still at their random initialisation (rows are written only when a sample is seen),
    so a same-class draw among them carries no class information: the first epoch differs from
    RepDistiller only in *which* untouched random rows serve as negatives. Every row that holds
    a same-class embedding is excluded from the first step on.

    Our decisions: under DDP the negatives are drawn for the gathered batch from the global RNG
    (identical on every rank), the label table and the memory update use the all-gathered
    targets, embeddings and indices of every rank, and the first-batch Z is averaged over ranks,
    so all ranks keep identical banks; memories, labels and Z change only in training mode.
    """

    default_ce_weight = 1.0
    batch_extras = ("index",)

    def __init__(
        self,
        ctx: MethodContext,
        weight: float = 0.8,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        dim: int = 128,
        negatives: str = "other_class",
        neg_replacement: bool = False,
    ) -> None:
        super().__init__(ctx)
        if negatives not in NEGATIVES:
            raise RelkdError(
                f"method 'crd': unknown negatives={negatives!r}; choose one of {list(NEGATIVES)}"
            )
        if not isinstance(neg_replacement, bool):
            raise RelkdError(
                f"method 'crd': neg_replacement must be true or false, got {neg_replacement!r}"
            )
        self.negatives, self.neg_replacement = negatives, neg_replacement
        n = int(getattr(ctx, "num_train_samples", 0) or 0)
        if n < 2:
            raise RelkdError(
                "method 'crd' keeps one memory row per training sample and needs the training-set "
                f"size: MethodContext.num_train_samples is {n} (must be >= 2)"
            )
        if nce_k < 1 or dim < 1 or nce_t <= 0 or not 0 <= momentum < 1:
            raise RelkdError(
                f"method 'crd': need nce_k >= 1, dim >= 1, nce_t > 0, 0 <= momentum < 1; got "
                f"nce_k={nce_k}, dim={dim}, nce_t={nce_t}, momentum={momentum}"
            )
        self.weight, self.nce_k, self.nce_t, self.momentum = weight, nce_k, nce_t, momentum
        self.num_data = n
        self.embed_s = nn.Linear(pooled_dim(ctx, "student"), dim)
        self.embed_t = nn.Linear(pooled_dim(ctx, "teacher"), dim)
        bound = math.sqrt(3.0 / dim)
        self.register_buffer("memory_s", torch.empty(n, dim).uniform_(-bound, bound))
        self.register_buffer("memory_t", torch.empty(n, dim).uniform_(-bound, bound))
        # [Z of the student-anchored scores, Z of the teacher-anchored scores]; < 0: not set yet.
        self.register_buffer("z", torch.full((2,), -1.0))
        self._z_checked = -1  # z._version at which z > 0 was last confirmed
        if negatives == "other_class":
            # Class of every training sample as seen in training batches; -1: not seen yet.
            self.register_buffer("labels", torch.full((n,), -1, dtype=torch.long))

    def student_taps(self) -> list[str]:
        return [POOLED]

    def teacher_taps(self) -> list[str]:
        return [POOLED]

    def embed(self, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor):
        """(v_s [B, dim], v_t [B, dim]), L2-normalised in fp32."""
        v_s = F.normalize(self.embed_s(student_pooled.flatten(1)).float(), dim=1)
        v_t = F.normalize(self.embed_t(teacher_pooled.detach().flatten(1)).float(), dim=1)
        return v_s, v_t

    @torch.no_grad()
    def _normalisers(self, v_s, v_t, idx) -> torch.Tensor:
        # Z is set after the first step. Checking that is a host read, so it is done only when
        # the buffer changed since the last check (its version counter: the first steps, a
        # load_state_dict, a skipped step's restore), not in the steady-state step.
        if self._z_checked == self.z._version:
            return self.z
        if bool((self.z > 0).all()):
            self._z_checked = self.z._version
            return self.z
        est = torch.stack(
            [
                estimate_z(contrast_scores(v_s, self.memory_t, idx, self.nce_t), self.num_data),
                estimate_z(contrast_scores(v_t, self.memory_s, idx, self.nce_t), self.num_data),
            ]
        )
        if D.is_dist():
            dist.all_reduce(est)
            est /= D.world_size()
        if self.training:
            self.z.copy_(est)
        return est

    @torch.no_grad()
    def update_memory(self, v_s, v_t, index) -> None:
        """Momentum update of the rows ``index`` (of every rank under DDP)."""
        index = D.all_gather_with_grad(index)
        v_s, v_t = D.all_gather_with_grad(v_s.detach()), D.all_gather_with_grad(v_t.detach())
        self.memory_s.index_copy_(0, *momentum_update(self.memory_s, index, v_s, self.momentum))
        self.memory_t.index_copy_(0, *momentum_update(self.memory_t, index, v_t, self.momentum))

    def forward(self, student, teacher, targets, index=None, **extras):
        if teacher is None:
            raise RelkdError("method 'crd' needs teacher outputs")
        if index is None:
            raise RelkdError("method 'crd' needs the batch extra 'index' (dataset indices, [B])")
        index = index.to(self.memory_s.device).long()
        v_s, v_t = self.embed(student.feats[POOLED], teacher.feats[POOLED])
        # Negatives drawn for the gathered batch, then this rank's rows: DDP draws what one
        # process at the global batch would (the global RNG is in the same state on every rank).
        all_index = D.all_gather_with_grad(index)
        if self.negatives == "any":
            all_idx = sample_contrast_index(all_index, self.num_data, self.nce_k)
        else:
            all_y = D.all_gather_with_grad(targets.to(self.labels.device).long())
            # The batch's labels are recorded before the draw (its own rows are excluded too);
            # outside training on a copy, so eval leaves the table as it was.
            labels = self.labels if self.training else self.labels.clone()
            labels[all_index] = all_y
            all_idx = sample_other_class_index(
                all_index, labels, self.nce_k, replacement=self.neg_replacement
            )
        idx = D.local_rows(all_idx, index.shape[0])
        z = self._normalisers(v_s, v_t, idx)
        # Scored against the banks before this batch's update; the scores copy the sampled rows,
        # so the in-place update below does not disturb backward.
        loss = crd_loss(
            v_s, v_t, self.memory_s, self.memory_t, idx, z[0], z[1], temperature=self.nce_t
        )
        if self.training:
            self.update_memory(v_s, v_t, index)
        return {"crd": self.weight * loss}
