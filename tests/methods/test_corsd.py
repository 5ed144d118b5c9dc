"""CORSD method: relation nets on real backbones, gradients, detaching, memory, export, engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import relkd
from relkd.engine.build import probe_shapes
from relkd.engine.distiller import Distiller
from relkd.engine.evaluation import evaluate
from relkd.methods import Composite, MethodContext, build_method
from relkd.methods.corsd import CORSD
from relkd.models import POOLED, FeatureTap, ModelOutput, create_model, get_feature_info
from relkd.models.checkpoint import save_student
from relkd.registry import RelkdError

TERMS = {
    "corsd_kl",
    "corsd_task",
    "corsd_kl_s",
    "corsd_task_s",
    "corsd_hinge",
    "corsd_feat",
    "corsd_lg",
}


def _ctx(model, num_classes: int, size: int, in_chans: int = 3) -> MethodContext:
    """The context the engine builds (trainer.build_components)."""
    names = [i.name for i in get_feature_info(model)] + [POOLED]
    shapes = probe_shapes(model, names, torch.zeros(2, in_chans, size, size))
    return MethodContext(
        num_classes=num_classes, student_stages=get_feature_info(model), student_shapes=shapes
    )


def _setup(name: str, size: int, num_classes: int = 10, in_chans: int = 3, **args):
    torch.manual_seed(0)
    kw = {"in_chans": in_chans} if name.startswith("cnn") else {}
    model = create_model(name, num_classes, **kw)
    method, _ = build_method("corsd", _ctx(model, num_classes, size, in_chans), args)
    return model, method


def _triplet_batch(b: int, size: int, num_classes: int, in_chans: int = 3):
    """A batch as the loader delivers it: anchors + extras with positives / negatives."""
    y = torch.arange(b) % num_classes
    extras = {
        "pos": torch.randn(b, in_chans, size, size),
        "neg": torch.randn(b, in_chans, size, size),
        "pos_target": y.clone(),
        "neg_target": (y + 1) % num_classes,
    }
    return torch.randn(b, in_chans, size, size), y, extras


# (model, input size): sizes keep CPU time low; the plan depends on resolution ratios only.
MODELS = [
    ("ResNet18", 8),
    ("resnet8x4", 8),
    ("wrn_16_2", 16),
    ("MobileNetV2", 16),
    ("torchvision:resnet18", 32),
    ("cnn_tiny", 28),
]


@pytest.mark.parametrize("name,size", MODELS)
def test_relation_nets_shapes_ranges_and_gradients(name, size):
    in_chans = 1 if name.startswith("cnn") else 3
    model, method = _setup(name, size, in_chans=in_chans)
    stages = get_feature_info(model)
    assert method.stages == [s.name for s in stages][::-1]  # all stages, deepest first
    dim = 2 * stages[-1].channels
    assert len(method.rns[0].body) == 0  # deepest: pool only
    assert all(len(rn.body) >= 1 for rn in method.rns[1:])
    assert all(rn.aux.in_features == dim for rn in method.rns)

    b = 2
    x, y, extras = _triplet_batch(b, size, 10, in_chans)
    x, y, extras = method.prepare_batch(x, y, extras)
    assert x.shape[0] == 3 * b and extras == {"triplets": b}
    tap = FeatureTap(model, method.student_taps())
    model.train()
    method.train()
    out = tap(x)
    for rn, s in zip(method.rns, method.stages):
        sp, ap, sn, an = method._pairs(rn, out.feats[s], b)
        assert sp.shape == sn.shape == (b,) and ap.shape == an.shape == (b, 10)
        assert ((sp > 0) & (sp < 1) & (sn > 0) & (sn < 1)).all()
    terms = method(out, None, y, **extras)
    assert set(terms) == TERMS
    assert all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()  # the CORSD terms alone, without the engine's CE
    for n, p in method.named_parameters():
        assert p.grad is not None, f"{name}: {n} got no gradient"
    mods = dict(model.named_modules())
    for s in stages:
        grads = [p.grad for p in mods[s.name].parameters()]
        assert grads and all(g is not None for g in grads), s.name
        assert sum(float(g.abs().sum()) for g in grads) > 0, s.name
    tap.remove()


def test_resnet18_reproduces_the_official_relation_nets():
    model = create_model("ResNet18", 100)
    method, _ = build_method("corsd", _ctx(model, 100, 32))
    # Official (C = 64): RN4 (layer4) input 1024, pool only; RN3 512 -> 1024; RN2 256 -> 512 ->
    # 1024; RN1 128 -> 256 -> 512 -> 1024; all 1024-d; heads 1024 -> 256 (RN4), 1024 -> 128.
    plans = [[(blk[0].in_channels, blk[-3].out_channels) for blk in rn.body] for rn in method.rns]
    assert plans == [
        [],
        [(512, 1024)],
        [(256, 512), (512, 1024)],
        [(128, 256), (256, 512), (512, 1024)],
    ]
    assert [rn.head[0].out_features for rn in method.rns] == [256, 128, 128, 128]
    # without measured shapes the plan comes from feature_info's channels / reductions: the same
    bare = CORSD(MethodContext(num_classes=100, student_stages=get_feature_info(model)))
    assert [[(b[0].in_channels, b[-3].out_channels) for b in rn.body] for rn in bare.rns] == plans
    assert all(blk[0].stride == (2, 2) for rn in method.rns for blk in rn.body)
    assert method.memory.shape == (100, 100) and torch.equal(method.memory, torch.eye(100))
    assert type(method).requires_teacher is False and type(method).default_ce_weight == 1.0


def test_defaults_are_the_official_ones():
    _, m = _setup("cnn_tiny", 28, in_chans=1)
    got = (m.w_kl, m.w_task, m.w_kl_s, m.w_task_s, m.w_feat, m.alpha, m.margin, m.w_lg)
    assert got == (0.16, 0.2, 0.04, 0.05, 0.01, 0.01, 1.0, 0.01)
    assert m.temperature == 3.0 and m.detach_deep is True


@pytest.mark.parametrize("detach", [True, False])
def test_deep_targets_detached_or_not(detach):
    model, method = _setup("cnn_tiny", 28, in_chans=1, detach_deep=detach)
    x, y, extras = method.prepare_batch(*_triplet_batch(3, 28, 10, 1))
    out = FeatureTap(model, method.student_taps())(x)
    terms = method(out, None, y, **extras)
    deep_terms = terms["corsd_kl"] + terms["corsd_kl_s"] + terms["corsd_feat"]
    deepest = list(method.rns[0].parameters())
    grads = torch.autograd.grad(deep_terms, deepest, allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    if detach:
        assert total == 0.0
    else:
        assert total > 0.0


def test_defect3_hinge_term_is_the_plain_mean_with_unit_margin():
    model, m = _setup("cnn_tiny", 28, in_chans=1)
    x, y, extras = m.prepare_batch(*_triplet_batch(3, 28, 10, 1))
    out = FeatureTap(model, m.student_taps())(x)
    terms = m(out, None, y, **extras)
    want = 0.0
    for rn, s in zip(m.rns, m.stages):
        p, _, n, _ = m._pairs(rn, out.feats[s], 3)
        want += float((p - n + 1.0).mean().detach())
    assert terms["corsd_hinge"].item() == pytest.approx(m.alpha * want, rel=1e-5)


def test_stage_selection_and_errors():
    model, m = _setup("ResNet18", 16, stages=["layer4", "layer2"])
    assert m.stages == ["layer4", "layer2"] and m.student_taps() == ["layer4", "layer2"]
    ctx = _ctx(model, 10, 16)
    with pytest.raises(RelkdError, match="layer1"):  # names the model's stages
        build_method("corsd", ctx, {"stages": ["layer4"]})
    with pytest.raises(RelkdError, match="unknown"):
        build_method("corsd", ctx, {"stages": ["layer4", "conv9"]})
    with pytest.raises(RelkdError, match="none declared"):
        build_method("corsd", MethodContext(num_classes=10))
    with pytest.raises(RelkdError, match="no argument"):
        build_method("corsd", ctx, {"beta": 1.0})


def test_forward_needs_triplets_and_works_with_one_triplet():
    model, m = _setup("cnn_tiny", 28, in_chans=1)
    tap = FeatureTap(model, m.student_taps())
    x, y, extras = m.prepare_batch(*_triplet_batch(1, 28, 10, 1))
    out = tap(x)
    with pytest.raises(RelkdError, match="triplet"):
        m(out, None, y)
    terms = m(out, None, y, **extras)  # B = 1: BatchNorm1d still sees 2 rows
    assert all(torch.isfinite(v) for v in terms.values())


def test_class_memory_update_in_training_only():
    model, m = _setup("cnn_tiny", 28, in_chans=1)
    x, y, extras = m.prepare_batch(*_triplet_batch(2, 28, 10, 1))
    out = FeatureTap(model, m.student_taps())(x)
    m.train()
    m(out, None, y, **extras)
    want = torch.eye(10).index_add_(0, y, torch.softmax(out.logits.detach(), 1))
    assert torch.allclose(m.memory, want, atol=1e-6)
    m.eval()
    m(
        ModelOutput(out.logits.detach(), {k: v.detach() for k, v in out.feats.items()}),
        None,
        y,
        **extras,
    )
    assert torch.allclose(m.memory, want, atol=1e-6)


def test_export_has_no_corsd_weights_and_evaluates_single_images(tmp_path):
    model, m = _setup("cnn_tiny", 28, in_chans=1)
    d = Distiller(model, m, ce_weight=1.0)
    x, y, extras = m.prepare_batch(*_triplet_batch(2, 28, 10, 1))
    logits, terms = d(x, y, None, **extras)
    assert logits.shape == (6, 10) and "ce" in terms and set(terms) >= TERMS
    path = tmp_path / "s.pt"
    save_student(d.student, path)
    saved = torch.load(path, weights_only=True)["model"]
    assert set(saved) == set(create_model("cnn_tiny", 10, in_chans=1).state_dict())
    assert not any(k.startswith(("rns", "rn_logits", "memory")) for k in saved)
    # defect 5: evaluation on plain single images (5 images, not a multiple of 3; batch of 1)
    loader = [(torch.randn(5, 1, 28, 28), torch.arange(5)), (torch.randn(1, 1, 28, 28), y[:1])]
    ev = evaluate(d.student, loader, torch.device("cpu"))
    assert 0.0 <= ev["top1"] <= 100.0


def test_composes_with_external_kd():
    torch.manual_seed(0)
    student = create_model("cnn_tiny", 10, in_chans=1)
    teacher = create_model("cnn_small", 10, in_chans=1).eval()
    ctx = _ctx(student, 10, 28, 1)
    method, ce = build_method("corsd+kd", ctx)
    assert isinstance(method, Composite) and method.requires_teacher and ce == 1.0
    x, y, extras = method.prepare_batch(*_triplet_batch(2, 28, 10, 1))
    with torch.no_grad():
        t_out = ModelOutput(teacher(x))
    out = FeatureTap(student, method.student_taps())(x)
    terms = method(out, t_out, y, **extras)
    assert TERMS | {"kd"} == set(terms)
    assert all(torch.isfinite(v) for v in terms.values())


def test_end_to_end_train(fmnist_root, tmp_path):
    res = relkd.train(
        {
            "student": {"name": "cnn_small"},
            "method": {"name": "corsd"},
            "data": {
                "name": "fashion_mnist",
                "root": str(fmnist_root),
                "batch_size": 4,
                "num_workers": 0,
            },
            "train": {
                "epochs": 1,
                "max_steps_per_epoch": 3,
                "progress": False,
                "tensorboard": False,
            },
            "schedule": {"name": "constant"},
            "output_dir": str(tmp_path),
            "name": "corsd",
        },
        quiet=True,
    )
    assert {"best_top1", "last_top1", "run_dir", "method"} <= set(res)
    assert res["method"] == "corsd" and 0.0 <= res["last_top1"] <= 100.0
    rec = json.loads(Path(res["run_dir"], "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 3 and torch.isfinite(torch.tensor(rec["train/loss"]))
    assert {f"train/{t}" for t in TERMS} | {"train/ce"} <= set(rec)
    saved = torch.load(Path(res["run_dir"], "student.pt"), weights_only=True)["model"]
    assert set(saved) == set(create_model("cnn_small", 10, in_chans=1).state_dict())


def test_registered():
    assert "corsd" in relkd.list_methods()
    assert issubclass(CORSD, torch.nn.Module)
