"""Every registered zoo model: forward/backward, feature_info vs. real shapes, exact parameter
counts of the CRD / RepDistiller zoo, and checkpoint-compatible parameter names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd.models import MODELS, FeatureTap, create_model, get_feature_info, list_models
from relkd.models.base import POOLED, find_classifier


def _zoo_without_aliases() -> list[str]:
    """Every registered zoo model once (aliases such as ``mobile_half`` share a factory)."""
    seen: set[object] = set()
    names = []
    for name in list_models():
        factory = MODELS.get(name)
        if factory not in seen:
            seen.add(factory)
            names.append(name)
    return names


ZOO = _zoo_without_aliases()

#: sum(p.numel()) at num_classes=100, as published by RepDistiller / mdistiller.
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet18": 11_220_132,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "mobile_half": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}

#: A few parameter / buffer names and shapes of the released checkpoints, plus the number of
#: state-dict entries (parameters and BN buffers), which a strict load must match.
CHECKPOINT_LAYOUT = {
    "resnet8x4": (
        62,
        {
            "layer1.0.downsample.0.weight": (64, 32, 1, 1),
            "layer3.0.bn2.num_batches_tracked": (),
            "fc.weight": (100, 256),
        },
    ),
    "resnet56": (
        344,
        {"layer2.0.downsample.1.running_var": (32,), "layer3.8.conv2.weight": (64, 64, 3, 3)},
    ),
    "ResNet50": (
        320,
        {"layer4.0.shortcut.0.weight": (2048, 1024, 1, 1), "linear.weight": (100, 2048)},
    ),
    "wrn_40_2": (
        227,
        {
            "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
            "block3.layer.5.bn2.running_mean": (128,),
            "bn1.weight": (128,),
            "fc.weight": (100, 128),
        },
    ),
    "vgg13": (72, {"block0.3.weight": (64, 64, 3, 3), "block4.4.running_mean": (512,)}),
    "vgg8": (37, {"block0.0.bias": (64,), "classifier.weight": (100, 512)}),
    "MobileNetV2": (
        320,
        {
            "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
            "blocks.6.0.conv.7.running_var": (160,),
            "conv2.0.weight": (1280, 160, 1, 1),
            "classifier.0.weight": (100, 1280),
        },
    ),
    "ShuffleV1": (
        296,
        {"layer1.0.conv3.weight": (216, 18, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1)},
    ),
    "ShuffleV2": (
        338,
        {"layer1.0.conv5.weight": (58, 58, 1, 1), "conv2.weight": (1024, 464, 1, 1)},
    ),
}


def _in_chans(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def _build(name: str, num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    x = torch.randn(2, _in_chans(model), 32, 32)
    return model, x


def test_zoo_is_complete() -> None:
    assert set(PARAM_COUNTS) | {"ResNet34", "cnn_small", "cnn_tiny"} <= set(list_models())


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name: str) -> None:
    model = create_model(name, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward_reaches_every_parameter(name: str) -> None:
    model, x = _build(name)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_feature_info_matches_tapped_shapes(name: str) -> None:
    model, x = _build(name)
    model.eval()
    info = get_feature_info(model)
    assert info, f"{name} declares no feature_info"
    assert len({i.name for i in info}) == len(info)
    assert [i.reduction for i in info] == sorted(i.reduction for i in info), "not shallow->deep"
    classifier = dict(model.named_modules())[find_classifier(model)]
    assert isinstance(classifier, nn.Linear)
    assert model.classifier_name == find_classifier(model)

    tap = FeatureTap(model, [i.name for i in info] + [POOLED])
    with torch.no_grad():
        out = tap(x)
        torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)
    tap.remove()
    for i in info:
        side = 32 // i.reduction
        assert out.feats[i.name].shape == (2, i.channels, side, side), i
    assert out.feats[POOLED].shape == (2, classifier.in_features)
    assert out.logits.shape == (2, 10)


@pytest.mark.parametrize("name", ZOO)
def test_repdistiller_checkpoint_reloads_strictly(name: str, tmp_path) -> None:
    model = create_model(name, num_classes=10)
    with torch.no_grad():  # make every entry, BN statistics included, differ from a fresh init
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
            else:
                t.fill_(240)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, path)

    fresh = create_model(name, num_classes=10)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 240
    fresh.load_state_dict(ckpt["model"], strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    bad = dict(ckpt["model"])
    bad.pop(next(iter(bad)))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(bad, strict=True)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_LAYOUT))
def test_checkpoint_layout_matches_released_teachers(name: str) -> None:
    n_entries, samples = CHECKPOINT_LAYOUT[name]
    sd = create_model(name, num_classes=100).state_dict()
    assert len(sd) == n_entries
    for key, shape in samples.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key


def test_mobile_half_is_mobilenetv2() -> None:
    a = create_model("mobile_half", num_classes=100).state_dict()
    b = create_model("MobileNetV2", num_classes=100).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("name", ["cnn_small", "cnn_tiny"])
def test_small_cnns_on_28x28(name: str) -> None:
    model = create_model(name, num_classes=10)
    assert _in_chans(model) == 1
    n = sum(p.numel() for p in model.parameters())
    assert (300_000 <= n <= 1_000_000) if name == "cnn_small" else (20_000 <= n <= 60_000)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    rgb = create_model(name, num_classes=10, in_chans=3)
    assert rgb(torch.randn(2, 3, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "ShuffleV2"])
def test_cifar_models_take_in_chans(name: str) -> None:
    model = create_model(name, num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
