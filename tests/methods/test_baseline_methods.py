"""The CRD-table baseline methods: phases, connectors for the CRD pairs' shapes, defaults and
build-time errors. Features are random tensors of the real models' shapes (no model runs)."""

from __future__ import annotations

import pytest
import torch

from relkd.losses import kd_loss
from relkd.losses.logit_std import zscore_logits
from relkd.methods import MethodContext, build_method
from relkd.methods._connectors import ConvReg
from relkd.models.base import FeatureInfo, ModelOutput
from relkd.registry import RelkdError

BASELINES = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst"]

#: Tap shapes (no batch dim) of some zoo models at 32x32 (28x28 for the small CNNs), as
#: measured by relkd.engine.trainer.probe_shapes; the first entries are the stages in order.
SHAPES = {
    "resnet32x4": {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "pooled": (256,)},
    "resnet8x4": {"layer1": (64, 32, 32), "layer2": (128, 16, 16), "layer3": (256, 8, 8), "pooled": (256,)},
    "wrn_40_2": {"block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8), "pooled": (128,)},
    "wrn_40_1": {"block1": (16, 32, 32), "block2": (32, 16, 16), "block3": (64, 8, 8), "pooled": (64,)},
    "vgg13": {"act1": (128, 16, 16), "act2": (256, 8, 8), "act3": (512, 4, 4), "act4": (512, 4, 4), "pooled": (512,)},
    "MobileNetV2": {"blocks.1": (12, 16, 16), "blocks.2": (16, 8, 8), "blocks.4": (48, 4, 4), "blocks.6": (160, 2, 2), "pooled": (1280,)},
    "ShuffleV1": {"layer1": (240, 16, 16), "layer2": (480, 8, 8), "layer3": (960, 4, 4), "pooled": (960,)},
    "cnn_small": {"stage1": (32, 14, 14), "stage2": (64, 7, 7), "stage3": (128, 3, 3), "stage4": (256, 3, 3), "pooled": (256,)},
    "cnn_tiny": {"stage1": (16, 14, 14), "stage2": (32, 7, 7), "stage3": (64, 3, 3), "pooled": (64,)},
}  # fmt: skip

PAIRS = [
    ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_40_1"),  # FSP is "n/a" in the CRD table here (channels differ)
    ("vgg13", "MobileNetV2"),  # student maps half the teacher's size at the last stage
    ("wrn_40_2", "ShuffleV1"),  # student maps half the teacher's size everywhere
    ("cnn_small", "cnn_tiny"),  # 4 teacher stages, 3 student stages
]


def _stages(model):
    return [FeatureInfo(n, s[0], 1) for n, s in SHAPES[model].items() if n != "pooled"]


def _ctx(teacher, student, classes=10):
    s_shapes = dict(SHAPES[student], logits=(classes,))
    t_shapes = dict(SHAPES[teacher], logits=(classes,))
    return MethodContext(
        num_classes=classes,
        student_stages=_stages(student),
        teacher_stages=_stages(teacher),
        student_shapes=s_shapes,
        teacher_shapes=t_shapes,
        num_train_samples=100,
    )


def _outputs(model, taps, batch=4, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    feats = {
        n: torch.randn(batch, *SHAPES[model][n], generator=g).relu().requires_grad_(grad)
        for n in taps
    }
    logits = torch.randn(batch, 10, generator=g).requires_grad_(grad)
    return ModelOutput(logits, feats)


def _step(method, teacher, student, phase="main"):
    method.set_phase(phase)
    s_out = _outputs(student, method.student_taps(), seed=1, grad=True)
    t_out = _outputs(teacher, method.teacher_taps(), seed=2)
    terms = method(s_out, t_out, torch.zeros(4, dtype=torch.long))
    return terms, s_out


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("name", BASELINES)
def test_builds_and_steps_on_crd_pair_shapes(name, teacher, student):
    torch.manual_seed(0)
    method, ce = build_method(name, _ctx(teacher, student))
    assert ce == 1.0  # CRD protocol: CE weight 1 and no KD for every baseline
    terms, s_out = _step(method, teacher, student)
    if name in ("ab", "fsp"):  # pre-training only: CE alone in the main phase
        assert terms == {}
        terms, s_out = _step(method, teacher, student, phase="init")
        name = f"{name}_init"
    assert list(terms) == [name]
    assert terms[name].ndim == 0 and torch.isfinite(terms[name])
    terms[name].backward()
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in s_out.feats.values())


def test_default_weights_follow_the_crd_protocol():
    ctx = _ctx("resnet32x4", "resnet8x4")
    expected = {
        "fitnet": 100, "at": 1000, "sp": 3000, "cc": 0.02, "vid": 1, "rkd": 1, "pkt": 30000,
        "ft": 200, "nst": 50,
        "ab": 0, "fsp": 0,  # RepDistiller's main loop adds 0 for these (init phase only)
    }  # fmt: skip
    for name, w in expected.items():
        assert build_method(name, ctx)[0].weight == w, name
    m = build_method("rkd", ctx)[0]
    assert (m.distance_weight, m.angle_weight) == (25, 50)
    assert build_method("at", ctx)[0].p == 2
    assert build_method("fitnet", ctx)[0].s_name == "layer2"  # RepDistiller hint_layer=2
    assert build_method("sp", ctx)[0].s_name == "layer3"
    assert build_method("ab", ctx)[0].stage_weights == [0.25, 0.5, 1.0]


@pytest.mark.parametrize("name", ["ab", "fsp", "ft"])
def test_init_phase_returns_only_init_terms(name):
    method, _ = build_method(name, _ctx("wrn_40_2", "wrn_40_1"))
    assert method.phases() == [("init", 30)]
    terms, s_out = _step(method, "wrn_40_2", "wrn_40_1", phase="init")
    assert list(terms) == [f"{name}_init"] and torch.isfinite(terms[f"{name}_init"])
    terms[f"{name}_init"].backward()
    trained = {n for n, p in method.named_parameters() if p.grad is not None}
    if name == "ft":  # only the paraphraser (an auto-encoder of the teacher map) trains
        assert trained and all(n.startswith(("encoder", "decoder")) for n in trained)
        assert all(f.grad is None for f in s_out.feats.values())
    else:  # the student's stages and the connectors
        assert all(f.grad is not None for f in s_out.feats.values())
        assert trained == {n for n, p in method.named_parameters()}


def test_parts_trained_only_in_the_init_phase_are_frozen_afterwards():
    ctx = _ctx("wrn_40_2", "wrn_40_1")
    ab = build_method("ab", ctx)[0]
    ft = build_method("ft", ctx)[0]
    # built trainable, so that the optimizer (built before the first phase) holds them
    assert all(p.requires_grad for p in ab.parameters())
    assert all(p.requires_grad for p in ft.parameters())
    ab.set_phase("main")
    assert not any(p.requires_grad for p in ab.parameters())
    terms, _ = _step(ft, "wrn_40_2", "wrn_40_1", phase="main")
    terms["ft"].backward()
    assert all(p.grad is None and not p.requires_grad for p in ft.encoder.parameters())
    assert all(p.grad is not None for p in ft.translator.parameters())
    ft.set_phase("init")
    assert all(p.requires_grad for p in ft.encoder.parameters())
    # no init phase: nothing to pre-train, the AB connectors are never trainable
    ab0 = build_method("ab", ctx, {"init_epochs": 0})[0]
    assert ab0.phases() == [] and not any(p.requires_grad for p in ab0.parameters())


def test_fitnet_optional_hint_phase():
    ctx = _ctx("resnet32x4", "resnet8x4")
    assert build_method("fitnet", ctx)[0].phases() == []
    m = build_method("fitnet", ctx, {"init_epochs": 5, "init_weight": 2.0})[0]
    assert m.phases() == [("init", 5)]
    init_terms, _ = _step(m, "resnet32x4", "resnet8x4", phase="init")
    main_terms, _ = _step(m, "resnet32x4", "resnet8x4", phase="main")
    assert list(init_terms) == ["fitnet_init"] and list(main_terms) == ["fitnet"]
    torch.testing.assert_close(init_terms["fitnet_init"] / 2.0, main_terms["fitnet"] / 100.0)


def test_methods_without_the_phase_return_nothing_there():
    ctx = _ctx("resnet32x4", "resnet8x4")
    for name in BASELINES:
        m = build_method(name, ctx, {"init_epochs": 0} if name in ("ab", "fsp", "ft") else {})[0]
        assert _step(m, "resnet32x4", "resnet8x4", phase="init")[0] == {}, name


def test_composition_collects_phases():
    ctx = _ctx("resnet32x4", "resnet8x4")
    method, ce = build_method("ab+kd", ctx)
    assert method.phases() == [("init", 30)] and ce == 1.0
    method, _ = build_method("at+kd", ctx)
    assert method.phases() == []
    terms, _ = _step(method, "resnet32x4", "resnet8x4")
    assert set(terms) == {"at", "kd"}


def test_fsp_connects_only_unequal_channels():
    same = build_method("fsp", _ctx("resnet32x4", "resnet8x4"))[0]
    assert sum(p.numel() for p in same.parameters()) == 0
    diff = build_method("fsp", _ctx("wrn_40_2", "wrn_40_1"))[0]
    assert len([c for c in diff.connectors if isinstance(c, torch.nn.Sequential)]) == 3


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((4, 8, 8), (6, 8, 8)),  # 1x1
        ((4, 8, 8), (6, 4, 4)),  # stride 2
        ((4, 4, 4), (6, 8, 8)),  # transposed
        ((4, 7, 7), (6, 3, 3)),  # valid conv, kernel 5
        ((4, 3, 3), (6, 7, 7)),  # upsampling (beyond the CRD code)
    ],
)
def test_convreg_output_shape(s_shape, t_shape):
    out = ConvReg(s_shape, t_shape, relu=False)(torch.randn(2, *s_shape))
    assert out.shape == (2, *t_shape)


def test_build_errors_name_the_problem():
    ctx = _ctx("resnet32x4", "resnet8x4")
    with pytest.raises(RelkdError, match=r"stage index 5 .*\['layer1', 'layer2', 'layer3'\]"):
        build_method("at", ctx, {"stages": [0, 5]})
    with pytest.raises(RelkdError, match="same length"):
        build_method("nst", ctx, {"stages": [0, 1], "teacher_stages": [2]})
    with pytest.raises(RelkdError, match="kernel"):
        build_method("cc", ctx, {"kernel": "poly"})
    with pytest.raises(RelkdError, match="form"):
        build_method("ft", ctx, {"form": "nope"})
    bare = MethodContext(num_classes=10, student_shapes={"pooled": (8,)})
    with pytest.raises(RelkdError, match="declares no stages"):
        build_method("fitnet", bare)
    assert build_method("at", ctx, {"stages": [-1], "teacher_stages": [0]})[0].pairs == [
        ("layer3", "layer1")
    ]


def test_kd_logit_standardisation_switch():
    ctx = _ctx("resnet32x4", "resnet8x4")
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g) * 5
    s, t = ModelOutput(zs), ModelOutput(zt)
    plain = build_method("kd", ctx)[0](s, t, None)["kd"]
    torch.testing.assert_close(plain, 0.9 * kd_loss(zs, zt, 4.0))
    ls = build_method("kd", ctx, {"logit_std": True, "weight": 9.0})[0]
    out = ls(s, t, None)["kd"]
    torch.testing.assert_close(out, 9.0 * kd_loss(zscore_logits(zs), zscore_logits(zt), 2.0))
    # only the logit relations matter: a per-sample affine change of the teacher is invisible
    shifted = ls(s, ModelOutput(zt * 0.1 + 3.0), None)["kd"]
    torch.testing.assert_close(shifted, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ft", "ab"])
def test_engine_runs_the_init_phase_then_freezes(name, fmnist_root, tiny_teacher_ckpt, tmp_path):
    """One init epoch then one main epoch through relkd.train: the init-only parts change in
    the init epoch and stay fixed in the main one; the init epoch logs no CE."""
    import json

    import relkd

    res = relkd.train(
        {
            "student": {"name": "cnn_tiny"},
            "teacher": {"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)},
            "method": {"name": name, "args": {"init_epochs": 1}},
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 64},
            "train": {"epochs": 1, "progress": False, "tensorboard": False},
            "schedule": {"name": "constant"},
            "output_dir": str(tmp_path),
            "name": "run",
        },
        quiet=True,
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["phase"] == "init" and f"train/{name}_init" in records[0]
    assert "train/ce" not in records[0] and "train/ce" in records[1]
    after_init = torch.load(run / "checkpoint.prev.pt", weights_only=True)["distiller"]
    after_main = torch.load(run / "checkpoint.pt", weights_only=True)["distiller"]
    frozen = "method.encoder." if name == "ft" else "method.connectors."
    keys = [k for k in after_main if k.startswith(frozen) and "running" not in k]
    assert keys and all(torch.equal(after_init[k], after_main[k]) for k in keys)
    moved = [
        k for k in after_main if k.startswith("student.") and after_main[k].is_floating_point()
    ]
    assert any(not torch.equal(after_init[k], after_main[k]) for k in moved)
    assert res["epochs"] == 1


@pytest.mark.parametrize("name", BASELINES)
def test_terms_are_fp32_under_bf16_autocast(name):
    method, _ = build_method(name, _ctx("cnn_small", "cnn_tiny"))
    phase = "init" if name in ("ab", "fsp") else "main"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, _ = _step(method, "cnn_small", "cnn_tiny", phase=phase)
    assert terms and all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
