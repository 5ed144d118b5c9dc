"""Every registered method, automatically: one real step on CPU with tiny models, through the
engine's own assembly (``build_components``) and forward half (``forward_loss``)."""

from __future__ import annotations

import pytest
import torch

from relkd.config import load_config
from relkd.engine.build import build_components
from relkd.engine.plan import build_loaders, plan_for_config, unpack
from relkd.engine.step import forward_loss
from relkd.methods import list_methods
from relkd.models import create_model
from relkd.models.checkpoint import save_student


def _components(method: str, fmnist_root, ckpt):
    cfg = load_config(
        {
            "student": {"name": "cnn_tiny"},
            "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)},
            "method": {"name": method},
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 24},
            "train": {"epochs": 2, "progress": False},
        }
    )
    device = torch.device("cpu")
    comp = build_components(cfg, device)
    plan = plan_for_config(cfg, comp.method, False, comp.train_ds)
    train, _ = build_loaders(plan, cfg, comp.method, comp.train_ds, comp.test_ds, comp.info, device)
    return comp, train


@pytest.mark.parametrize("name", list_methods())
def test_one_step(name, fmnist_root, tiny_teacher_ckpt, tmp_path):
    torch.manual_seed(0)
    comp, loader = _components(name, fmnist_root, tiny_teacher_ckpt)
    d, method, tea = comp.distiller, comp.method, comp.teacher
    loader.set_epoch(0)
    batch = next(iter(loader))
    x, y, extras = unpack(batch, torch.device("cpu"))
    out = forward_loss(
        d, x, y, extras, teacher=tea, prepare_batch=method.prepare_batch, method_name=name
    )
    logits, terms = out.logits, out.terms
    assert logits.shape == (out.targets.shape[0], 10)
    assert terms, "a method must contribute at least one term (CE counts)"
    for k, v in terms.items():
        assert v.ndim == 0 and torch.isfinite(v), (k, v)
    torch.testing.assert_close(out.loss, sum(t.float() for t in terms.values()), rtol=0, atol=0)
    out.loss.backward()
    # gradients reach the student ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    # ... and every trainable extra of the method that took part in this step
    for n, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: extra parameter {n} got no gradient"
    # never the teacher
    if tea is not None:
        assert all(p.grad is None for p in tea.model.parameters())
    # export: exactly the student's weights, no method extras
    path = tmp_path / "s.pt"
    save_student(d.student, path)
    saved = torch.load(path, weights_only=True)["model"]
    fresh = create_model("cnn_tiny", 10, in_chans=1)
    assert set(saved) == set(fresh.state_dict())


def _terms_and_grads(name, fmnist_root, ckpt, batch, channels_last: bool):
    torch.manual_seed(0)
    comp, _ = _components(name, fmnist_root, ckpt)
    d, method, tea = comp.distiller, comp.method, comp.teacher
    if channels_last:  # what the engine does with train.channels_last
        d = d.to(memory_format=torch.channels_last)
    x, y, extras = unpack(batch, torch.device("cpu"))
    torch.manual_seed(1)  # the same draws (CRD negatives, ...) in both layouts
    out = forward_loss(
        d, x, y, extras, teacher=tea, prepare_batch=method.prepare_batch,
        channels_last=channels_last, method_name=name,
    )  # fmt: skip
    terms = out.terms
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize("name", list_methods())
def test_channels_last_gives_the_same_step(name, fmnist_root, tiny_teacher_ckpt):
    """``train.channels_last`` changes the memory layout, not the math: every method's terms
    equal the NCHW step's up to float rounding, and so do its gradients up to the tie-breaking
    of max-pooling (cnn_tiny pools Fashion-MNIST's flat black background, where a window's
    equal maxima route the gradient to whichever element the layout's kernel picks: CORSD,
    whose relation network reads the first stage, sees ~1e-3 of the first conv's gradient norm
    move; a lone conv-BN-(ReLU-)maxpool block moved 4e-4 - 7e-3 of its weight gradient on a
    zero-background batch and 2e-5 on uniform noise). A layout bug (a ``view`` that mixes channels and positions) moves O(1) of it; and no
    method may break on a non-contiguous feature map."""
    torch.manual_seed(0)
    _, loader = _components(name, fmnist_root, tiny_teacher_ckpt)
    loader.set_epoch(0)
    batch = next(iter(loader))
    t0, g0 = _terms_and_grads(name, fmnist_root, tiny_teacher_ckpt, batch, False)
    t1, g1 = _terms_and_grads(name, fmnist_root, tiny_teacher_ckpt, batch, True)
    assert t0.keys() == t1.keys() and g0.keys() == g1.keys() and g0
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-4, atol=1e-5, msg=f"{name}: term {k}")
    # a bias followed by batch norm has a zero gradient in exact arithmetic (the norm removes
    # the mean), so its float noise is compared with the whole gradient, not with itself
    total = torch.stack([g.norm() for g in g0.values()]).norm()
    for n in g0:
        diff = (g1[n] - g0[n]).norm()
        assert diff <= 2e-2 * g0[n].norm() + 1e-4 * total, (
            f"{name}: grad {n} moved by {diff:.2e} (its norm {g0[n].norm():.2e}, all {total:.2e})"
        )
