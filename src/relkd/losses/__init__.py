"""Pure loss functions (math only, no modules, no config): each returns a scalar tensor."""

from relkd.losses.clkd import clkd_loss, clkd_terms
from relkd.losses.cmkd import cmkd_loss, cmkd_terms
from relkd.losses.corsd import class_centre_relation, kl_t, soft_ce_t, update_class_memory
from relkd.losses.crd import (
    contrast_scores,
    crd_loss,
    estimate_z,
    momentum_update,
    nce_loss,
    sample_contrast_index,
    sample_other_class_index,
)
from relkd.losses.dist import dist_loss
from relkd.losses.dkd import dkd_loss
from relkd.losses.feature import (
    ab_loss,
    at_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    ft_loss,
    hint_loss,
    nst_loss,
)
from relkd.losses.kd import kd_loss
from relkd.losses.logit_std import zscore_logits
from relkd.losses.relation import cc_loss, pkt_loss, rkd_loss, sp_loss
from relkd.losses.rrd import ring_buffer_enqueue, rrd_loss
from relkd.losses.softrank import hard_rank, soft_rank, soft_rank_network
from relkd.losses.vid import vid_loss

__all__ = [
    "ab_loss",
    "at_loss",
    "attention_map",
    "cc_loss",
    "class_centre_relation",
    "clkd_loss",
    "clkd_terms",
    "cmkd_loss",
    "cmkd_terms",
    "contrast_scores",
    "crd_loss",
    "dist_loss",
    "dkd_loss",
    "estimate_z",
    "fsp_loss",
    "fsp_matrix",
    "ft_loss",
    "hard_rank",
    "hint_loss",
    "kd_loss",
    "kl_t",
    "momentum_update",
    "nce_loss",
    "nst_loss",
    "pkt_loss",
    "ring_buffer_enqueue",
    "rkd_loss",
    "rrd_loss",
    "sample_contrast_index",
    "sample_other_class_index",
    "soft_ce_t",
    "soft_rank",
    "soft_rank_network",
    "sp_loss",
    "update_class_memory",
    "vid_loss",
    "zscore_logits",
]
