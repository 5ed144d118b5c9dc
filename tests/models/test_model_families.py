"""Registry-style: every torchvision classification family (one small member, no weights, small
inputs where the model allows) and a few timm families get stages without a hand-written
``feature_info``, and train one step of a feature method (FitNet: one hint stage, student side)
and of a stage method (AT: every stage, teacher side) through relkd's Distiller and Teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from relkd.engine.distiller import Distiller
from relkd.engine.teacher import Teacher
from relkd.methods import MethodContext, build_method
from relkd.models import POOLED, FeatureTap, create_model, get_feature_info
from relkd.registry import RelkdError

#: torchvision module -> (small member, input size, extra kwargs).
TORCHVISION = {
    "alexnet": ("alexnet", 64, {}),
    "convnext": ("convnext_tiny", 32, {}),
    "densenet": ("densenet121", 32, {}),
    "efficientnet": ("efficientnet_b0", 32, {}),
    "googlenet": ("googlenet", 32, {}),
    "inception": ("inception_v3", 75, {}),
    "maxvit": ("maxvit_t", 224, {}),
    "mnasnet": ("mnasnet0_5", 32, {}),
    "mobilenetv2": ("mobilenet_v2", 32, {}),
    "mobilenetv3": ("mobilenet_v3_small", 32, {}),
    "regnet": ("regnet_y_400mf", 32, {}),
    "resnet": ("resnet18", 32, {}),
    "shufflenetv2": ("shufflenet_v2_x0_5", 32, {}),
    "squeezenet": ("squeezenet1_1", 32, {}),
    "swin_transformer": ("swin_t", 32, {}),
    "vgg": ("vgg11", 32, {}),
    "vision_transformer": ("vit_b_16", 32, {"image_size": 32}),
}
SLOW = {"maxvit", "vgg"}  # the two largest steps; still run in CI (not deselected)

TIMM = {
    "resnet18": (32, {}),
    "mobilenetv3_small_050": (32, {}),
    "convnext_atto": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32}),
}


def test_every_torchvision_family_is_covered() -> None:
    families = {
        torchvision.models.get_model_builder(n).__module__.rsplit(".", 1)[-1]
        for n in torchvision.models.list_models(module=torchvision.models)
    }
    assert families == set(TORCHVISION), "a torchvision family without a test member"


def _step(student: nn.Module, teacher: nn.Module, method: str, x: torch.Tensor) -> None:
    """One SGD step of ``method`` with shapes measured as the engine does."""

    def shapes(model: nn.Module) -> dict[str, tuple]:
        names = [i.name for i in get_feature_info(model, x)]
        try:
            FeatureTap(model, [POOLED]).remove()
            names.append(POOLED)
        except RelkdError:
            pass
        tap = FeatureTap(model, names)
        model.eval()
        with torch.no_grad():
            out = tap(x)
        model.train()
        tap.remove()
        return {k: tuple(v.shape[1:]) for k, v in out.feats.items()}

    ctx = MethodContext(
        num_classes=10,
        student_stages=get_feature_info(student, x),
        teacher_stages=get_feature_info(teacher, x),
        student_shapes=shapes(student),
        teacher_shapes=shapes(teacher),
    )
    for side in ("student", "teacher"):
        for i in getattr(ctx, f"{side}_stages"):
            shape = getattr(ctx, f"{side}_shapes")[i.name]
            assert len(shape) == 3 and shape[0] == i.channels, (side, i, shape)
    m, ce = build_method(method, ctx, {})
    distiller = Distiller(student, m, ce)
    tea = Teacher(teacher, m.teacher_taps())
    opt = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    y = torch.tensor([1, 7])
    distiller.train()
    _, terms = distiller(x, y, tea(x))
    assert method in terms and torch.isfinite(terms[method])
    loss = sum(terms.values())
    opt.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    opt.step()


def _partner(size: int) -> nn.Module:
    return create_model("resnet8", num_classes=10)


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in sorted(TORCHVISION)],
)
def test_torchvision_family_trains_feature_and_stage_methods(family: str) -> None:
    name, size, kw = TORCHVISION[family]
    torch.manual_seed(0)
    model = create_model(f"torchvision:{name}", num_classes=10, **kw)
    x = torch.randn(2, 3, size, size)
    stages = get_feature_info(model, x)
    assert len(stages) >= 1 and len({s.name for s in stages}) == len(stages)
    assert [s.reduction for s in stages] == sorted({s.reduction for s in stages})
    untrained = copy.deepcopy(model)
    _step(model, _partner(size), "fitnet", x)  # the family as the student
    _step(_partner(size), untrained, "at", x)  # the family as the teacher


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_family_trains_feature_and_stage_methods(name: str) -> None:
    pytest.importorskip("timm")
    size, kw = TIMM[name]
    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=10, **kw)
    x = torch.randn(2, 3, size, size)
    assert get_feature_info(model, x)
    untrained = copy.deepcopy(model)
    _step(model, _partner(size), "fitnet", x)
    _step(_partner(size), untrained, "at", x)


def test_stage_methods_accept_module_names() -> None:
    x = torch.randn(2, 3, 32, 32)
    student = create_model("torchvision:densenet121", num_classes=10)
    teacher = create_model("resnet8", num_classes=10)
    stages = get_feature_info(student, x)
    ctx = MethodContext(
        num_classes=10,
        student_stages=stages,
        teacher_stages=get_feature_info(teacher),
        student_shapes={s.name: (s.channels, 32 // s.reduction, 32 // s.reduction) for s in stages},
        teacher_shapes={"layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)},
    )
    fit, _ = build_method("fitnet", ctx, {"hint_stage": "features.denseblock2"})
    assert (fit.s_name, fit.t_name) == ("features.denseblock2", "layer3")  # index 2 on both
    fit, _ = build_method("fitnet", ctx, {"hint_stage": 1, "teacher_hint_stage": "layer1"})
    assert (fit.s_name, fit.t_name) == ("features.denseblock1", "layer1")
    at, _ = build_method("at", ctx, {"stages": ["features.relu0", 3], "teacher_stages": [0, -1]})
    assert at.pairs == [("features.relu0", "layer1"), ("features.denseblock3", "layer3")]
    with pytest.raises(RelkdError, match=r"'features.conv0' is not a student stage.*denseblock1"):
        build_method("fitnet", ctx, {"hint_stage": "features.conv0"})


def test_user_module_without_feature_info_gets_stages_and_caches_them() -> None:
    class Net(nn.Module):  # no feature_info, a bottleneck-like stride inside a block
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.down = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1))  # a 1x1 branch
            self.down2 = nn.Conv2d(16, 32, 3, 2, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.down(self.stem(x))
            x = x * self.se(x).sigmoid()
            return self.fc(self.pool(self.down2(x)).flatten(1))

    net = Net()
    assert get_feature_info(net, derive=False) == []
    stages = get_feature_info(net, torch.zeros(1, 3, 16, 16))
    assert [(s.name, s.channels, s.reduction) for s in stages] == [
        ("stem", 8, 1),
        ("down", 16, 2),
        ("down2", 32, 4),
    ]
    assert get_feature_info(net, derive=False) == stages  # cached on the model
    tap = FeatureTap(net, [s.name for s in stages])
    out = tap(torch.randn(2, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in out.feats.items()} == {
        "stem": (2, 8, 16, 16),
        "down": (2, 16, 8, 8),
        "down2": (2, 32, 4, 4),
    }


@pytest.mark.parametrize("name", ["swin_t", "vit_b_16"])
def test_token_and_nhwc_stages_are_handed_over_as_nchw(name: str) -> None:
    kw = {"image_size": 32} if name.startswith("vit") else {}
    model = create_model(f"torchvision:{name}", num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    stages = get_feature_info(model, x)
    raw: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[s.name].register_forward_hook(lambda _m, _a, o, n=s.name: raw.__setitem__(n, o))
        for s in stages
    ]
    tap = FeatureTap(model, [s.name for s in stages])
    with torch.no_grad():
        feats = tap(x).feats
    for h in hooks:
        h.remove()
    for s in stages:
        f, r = feats[s.name], raw[s.name]
        assert f.shape[:2] == (2, s.channels) and f.shape[2] == f.shape[3]
        if s.layout == "NHWC":
            torch.testing.assert_close(f, r.permute(0, 3, 1, 2))
        elif s.layout == "NLC":  # the class token dropped, patch tokens on their 2x2 grid
            assert s.prefix_tokens == 1
            torch.testing.assert_close(f[:, :, 0, 1], r[:, 2])
            torch.testing.assert_close(f[:, :, 1, 0], r[:, 3])
    if name == "swin_t":
        assert [s.layout for s in stages] == ["NHWC"] * 3 + ["NCHW"]
        assert [s.channels for s in stages] == [96, 192, 384, 768]
        assert [s.reduction for s in stages] == [4, 8, 16, 32]
    else:
        assert [(s.name, s.layout, s.channels, s.reduction) for s in stages] == [
            ("encoder", "NLC", 768, 16)
        ]


def test_a_model_no_dummy_input_runs_on_has_no_stages_and_says_why() -> None:
    from relkd.models.base import derive_error

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(5 * 7 * 7, 10))  # only [B, 5, 7, 7] inputs
    assert get_feature_info(mlp) == []
    assert "no dummy input ran" in derive_error(mlp)
    noisy = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Dropout(0.5))
    noisy.forward = lambda x: nn.Sequential.forward(noisy, x + torch.rand_like(x))
    state = torch.random.get_rng_state()
    assert get_feature_info(noisy, torch.zeros(1, 3, 8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)  # derivation drew nothing globally
