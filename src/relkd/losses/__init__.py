"""Pure loss functions (math only, no modules, no config): each returns a scalar tensor."""

from relkd.losses.clkd import clkd_loss, clkd_terms
from relkd.losses.cmkd import cmkd_loss, cmkd_terms
from relkd.losses.crd import (
    contrast_scores,
    crd_loss,
    estimate_z,
    momentum_update,
    nce_loss,
    sample_contrast_index,
)
from relkd.losses.dist import dist_loss
from relkd.losses.dkd import dkd_loss
from relkd.losses.kd import kd_loss
from relkd.losses.rrd import ring_buffer_enqueue, rrd_loss
from relkd.losses.softrank import hard_rank, soft_rank

__all__ = [
    "clkd_loss",
    "clkd_terms",
    "cmkd_loss",
    "cmkd_terms",
    "contrast_scores",
    "crd_loss",
    "dist_loss",
    "dkd_loss",
    "estimate_z",
    "hard_rank",
    "kd_loss",
    "momentum_update",
    "nce_loss",
    "ring_buffer_enqueue",
    "rrd_loss",
    "sample_contrast_index",
    "soft_rank",
]
