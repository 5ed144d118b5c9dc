"""Pure loss functions (math only, no modules, no config): each returns a scalar tensor."""

from relkd.losses.kd import kd_loss

__all__ = ["kd_loss"]

# Optional imports: the losses below live in their own files and are exported when present.
try:
    from relkd.losses.clkd import clkd_loss, clkd_terms
    from relkd.losses.cmkd import cmkd_loss, cmkd_terms
    from relkd.losses.dist import dist_loss
    from relkd.losses.dkd import dkd_loss
    from relkd.losses.softrank import hard_rank, soft_rank

    __all__ += [
        "clkd_loss",
        "clkd_terms",
        "cmkd_loss",
        "cmkd_terms",
        "dist_loss",
        "dkd_loss",
        "hard_rank",
        "soft_rank",
    ]
except ImportError:  # pragma: no cover - during development only
    pass
