"""Every registered method, automatically: one real step on CPU with tiny models."""

from __future__ import annotations

import pytest
import torch

from relkd.config import load_config
from relkd.engine.trainer import _make_loaders, _unpack, build_components
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
    train, _ = _make_loaders(cfg, comp.method, comp.train_ds, comp.test_ds, comp.info, device)
    return comp, train


@pytest.mark.parametrize("name", list_methods())
def test_one_step(name, fmnist_root, tiny_teacher_ckpt, tmp_path):
    torch.manual_seed(0)
    comp, loader = _components(name, fmnist_root, tiny_teacher_ckpt)
    d, method, tea = comp.distiller, comp.method, comp.teacher
    loader.set_epoch(0)
    batch = next(iter(loader))
    x, y, extras = _unpack(batch, torch.device("cpu"))
    x, y, extras = method.prepare_batch(x, y, extras)
    t_out = tea(x) if tea is not None else None
    logits, terms = d(x, y, t_out, **extras)
    assert logits.shape == (x.shape[0], 10)
    assert terms, "a method must contribute at least one term (CE counts)"
    for k, v in terms.items():
        assert v.ndim == 0 and torch.isfinite(v), (k, v)
    sum(terms.values()).backward()
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
