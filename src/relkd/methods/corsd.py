"""CORSD: Class-Oriented Relational Self Distillation (Yu, Tan, Wu, Dong, Zhang, Ma; arXiv
2305.00918, ICASSP 2023). From the abstract and the official code (github.com/muzhou-yu/CORSD);
the paper body was not readable to us."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from relkd import distributed as D
from relkd.data.triplets import TripletDataset
from relkd.losses import corsd as L
from relkd.methods._corsd_nets import ClassCentreNet, RelationNet, build_relation_nets
from relkd.methods.base import Method, MethodContext, register_method
from relkd.registry import RelkdError


@register_method("corsd")
class CORSD(Method):
    """Self-distillation: the deepest stage teaches the shallower ones through relation nets.

    Every training item is a triplet (anchor, positive of its class, negative of another class,
    :class:`relkd.data.triplets.TripletDataset`); ``data.batch_size`` counts triplets, the step sees
    3B images ``[anchors; positives; negatives]`` and the engine adds CE on all of them. Stage k
    (k = 0 the deepest) has a relation net scoring the pairs (a, p) and (a, n) -> p_k, n_k [B] in
    (0, 1), with an aux classifier -> aux_p_k, aux_n_k [B, C]. Terms (already weighted)::

        corsd_kl     w_kl * sum_{k>=1} KL_T(aux_p_0 || aux_p_k)
        corsd_task   (w_task - w_kl) * sum_k CE(aux_p_k, y_a)
        corsd_kl_s   w_kl_s * sum_{k>=1} KL_T(aux_n_0 || aux_n_k)
        corsd_task_s (w_task_s - w_kl_s) * sum_k SoftCE_T(aux_n_k, (onehot(y_a) + onehot(y_n)) / 2)
        corsd_hinge  alpha * sum_k mean(max(p_k - n_k + margin, 0))
        corsd_feat   w_feat * sum_{k>=1} [mean((p_k - p_0)^2) + mean((n_k - n_0)^2)]
        corsd_lg     w_lg * mean_i [R([softmax(z_i), M[y_i]]) - R([softmax(z_i), M[y'_i]])]

    M [C, C] (buffer, identity at start) accumulates ``softmax(z)`` per class over training;
    y' a random wrong class; R the class-centre relation net. Defaults = official argparse.

    Our decisions: deep targets (p_0, n_0, aux_*_0) are detached in the KL / MSE terms
    (``detach_deep``; the official code does not detach); relation nets are derived from the
    backbone's stages (see :mod:`relkd.methods._corsd_nets`); the memory is updated with the whole
    batch before R is evaluated (officially sample by sample); ``corsd_lg`` is a mean over the 3B
    images (the official loop sums); under DDP every rank adds all ranks' predictions to M.
    Positive and negative pairs go through a relation net in two calls as officially (separate
    BatchNorm batches), in one call when B = 1.

    Official-code defects we do not reproduce:
    1. syntax / indentation errors: the published code does not import;
    2. KL on raw logits (``F.kl_div(logits, logits)``, NaN / garbage): we use KL_T on softmaxes;
    3. the hinge is always active (scores in (0, 1), margin 1): formula kept, documented;
    4. BatchNorm1d of RN_logits on single samples fails in train mode: evaluated batched;
    5. the test loader used the triplet collate: we evaluate the backbone on single images.

    At inference everything here is dropped: the exported student is the bare backbone.
    The forward never reads a teacher, so ``corsd+kd`` adds an external teacher's KD on the 3B
    images through :class:`relkd.methods.Composite`.
    """

    requires_teacher = False
    default_ce_weight = 1.0
    wraps_train_set = True  # triplets (wrap_train_dataset)
    changes_batch = True  # [anchors; positives; negatives] -> 3B images (prepare_batch)

    def __init__(
        self,
        ctx: MethodContext,
        stages: list[str] | None = None,
        w_kl: float = 0.16,
        w_task: float = 0.2,
        w_kl_s: float = 0.04,
        w_task_s: float = 0.05,
        w_feat: float = 0.01,
        alpha: float = 0.01,
        margin: float = 1.0,
        w_lg: float = 0.01,
        temperature: float = 3.0,
        detach_deep: bool = True,
    ) -> None:
        super().__init__(ctx)
        infos = {i.name: i for i in ctx.student_stages}
        names = list(dict.fromkeys(infos if stages is None else stages))
        bad = [n for n in names if n not in infos]
        if bad or len(names) < 2:
            raise RelkdError(
                f"corsd needs >= 2 student stages; got {names} (unknown: {bad}). The model's "
                f"stages (feature_info): {list(infos) or 'none declared'}"
            )
        self.stages = sorted(names, key=list(infos).index)[::-1]  # deepest first (k = 0)
        self.rns = build_relation_nets(
            [infos[n] for n in self.stages],
            [tuple(ctx.student_shapes.get(n, ())) for n in self.stages],
            ctx.num_classes,
        )
        self.rn_logits = ClassCentreNet(ctx.num_classes)
        self.register_buffer("memory", torch.eye(ctx.num_classes))
        self.w_kl, self.w_task, self.w_kl_s, self.w_task_s = w_kl, w_task, w_kl_s, w_task_s
        self.w_feat, self.alpha, self.margin, self.w_lg = w_feat, alpha, margin, w_lg
        self.temperature, self.detach_deep = temperature, detach_deep

    def student_taps(self) -> list[str]:
        return list(self.stages)

    def wrap_train_dataset(self, dataset: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        # Seeded: the triplet of sample i depends only on (seed, epoch, i), not on the rank that
        # loads it or the DataLoader worker.
        return TripletDataset(dataset, seed=self.ctx.seed)

    def prepare_batch(self, images, targets, extras):
        """``[anchors; positives; negatives]`` -> 3B images / targets; ``triplets=B`` in extras."""
        if "pos" not in extras:
            return images, targets, extras
        extras = dict(extras)
        b = images.shape[0]
        images = torch.cat([images, extras.pop("pos"), extras.pop("neg")])
        targets = torch.cat([targets, extras.pop("pos_target"), extras.pop("neg_target")])
        extras["triplets"] = b
        return images, targets, extras

    def _pairs(self, rn: RelationNet, f: torch.Tensor, b: int):
        a, p, n = f[:b], f[b : 2 * b], f[2 * b : 3 * b]
        pos, neg = torch.cat([a, p], 1), torch.cat([a, n], 1)
        if b > 1:
            return (*rn(pos), *rn(neg))
        s, o = rn(torch.cat([pos, neg]))  # BatchNorm1d needs 2 rows
        return s[:1], o[:1], s[1:], o[1:]

    def forward(self, student, teacher, targets, **extras: Any) -> dict[str, torch.Tensor]:
        b = extras.get("triplets")
        if b is None:
            raise RelkdError(
                "corsd needs triplet batches (TripletDataset + prepare_batch): train it through "
                "relkd.train / the engine, or pass triplets=B with [anchors; positives; negatives]"
            )
        y_a, y_n, T, dd = targets[:b], targets[2 * b : 3 * b], self.temperature, self.detach_deep
        soft = L.two_hot(y_a, y_n, self.ctx.num_classes)
        p, ap, n, an = zip(
            *(self._pairs(rn, student.feats[s], b) for rn, s in zip(self.rns, self.stages))
        )
        K, K1 = range(len(self.rns)), range(1, len(self.rns))

        def total(fn, ks) -> torch.Tensor:
            return sum((fn(k) for k in ks), p[0].new_zeros((), dtype=torch.float32))

        terms = {
            "corsd_kl": self.w_kl * total(lambda k: L.kl_t(ap[k], ap[0], T, dd), K1),
            "corsd_task": (self.w_task - self.w_kl)
            * total(lambda k: F.cross_entropy(ap[k].float(), y_a), K),
            "corsd_kl_s": self.w_kl_s * total(lambda k: L.kl_t(an[k], an[0], T, dd), K1),
            "corsd_task_s": (self.w_task_s - self.w_kl_s)
            * total(lambda k: L.soft_ce_t(an[k], soft, T), K),
            "corsd_hinge": self.alpha
            * total(lambda k: L.triplet_hinge(p[k], n[k], self.margin), K),
            "corsd_feat": self.w_feat
            * total(lambda k: L.relation_mse(p[k], p[0], dd) + L.relation_mse(n[k], n[0], dd), K1),
        }
        probs = F.softmax(student.logits.float(), dim=1)
        if self.training:  # every rank adds every rank's batch: M = the single-process memory
            delta = L.update_class_memory(torch.zeros_like(self.memory), targets, probs)
            self.memory += D.all_reduce_sum(delta)
        # drawn for the gathered batch and sliced: under DDP the same draws as one process
        wrong = D.local_rows(
            L.random_wrong_class(D.all_gather_with_grad(targets), self.ctx.num_classes),
            targets.shape[0],
        )
        lg = L.class_centre_relation(self.rn_logits, probs, self.memory, targets, wrong)
        terms["corsd_lg"] = self.w_lg * lg
        return terms
