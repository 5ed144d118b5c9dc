"""The logit-standardisation switch on every logit method (Sun et al., arXiv 2403.01427)."""

from __future__ import annotations

import pytest
import torch

from relkd.losses import zscore_logits
from relkd.methods import MethodContext, build_method
from relkd.models.base import ModelOutput

LOGIT_METHODS = ["kd", "dkd", "dist", "cmkd"]


def _terms(name, zs, zt, y, **args):
    m, _ = build_method(name, MethodContext(num_classes=zs.shape[1]), args)
    return {k: v.item() for k, v in m(ModelOutput(zs), ModelOutput(zt), y).items()}


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_logit_std_equals_method_on_zscored_logits_at_base_temperature(name):
    torch.manual_seed(0)
    zs, zt, y = 3 * torch.randn(8, 6), 5 * torch.randn(8, 6), torch.randint(0, 6, (8,))
    on = _terms(name, zs, zt, y, logit_std=True, logit_std_temperature=2.0)
    manual = _terms(name, zscore_logits(zs), zscore_logits(zt), y, temperature=2.0)
    assert on.keys() == manual.keys()
    for k in on:
        assert on[k] == pytest.approx(manual[k], rel=1e-5, abs=1e-7), k
    # and the switch does change the loss (the raw logits are not standardised)
    off = _terms(name, zs, zt, y, temperature=2.0)
    assert any(abs(off[k] - on[k]) > 1e-4 for k in on)


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_logit_std_is_scale_invariant(name):
    torch.manual_seed(1)
    zs, zt, y = torch.randn(8, 6), torch.randn(8, 6), torch.randint(0, 6, (8,))
    a = _terms(name, zs, zt, y, logit_std=True)
    b = _terms(name, 7 * zs + 3, 0.5 * zt - 1, y, logit_std=True)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
