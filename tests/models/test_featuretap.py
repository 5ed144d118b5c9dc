"""FeatureTap on the zoo models: error messages, no effect on logits, hook removal, and that the
captured stage maps are the tensors the network really uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relkd.models import FeatureTap, create_model, get_feature_info
from relkd.models.base import POOLED
from relkd.registry import RelkdError


def _n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _input(model: nn.Module) -> torch.Tensor:
    cin = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(2, cin, 32, 32)


def test_unknown_tap_name_raises() -> None:
    model = create_model("resnet8", num_classes=10)
    with pytest.raises(RelkdError, match="layer9"):
        FeatureTap(model, ["layer9"])
    assert _n_hooks(model) == 0


def test_unknown_tap_message_lists_stages() -> None:
    with pytest.raises(RelkdError, match=r"layer1.*layer2.*layer3"):
        FeatureTap(create_model("resnet20", num_classes=10), ["layer4"])


@pytest.mark.parametrize(
    "name", ["resnet8", "ResNet18", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
)
def test_tap_does_not_change_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        tap = FeatureTap(model, [i.name for i in get_feature_info(model)] + [POOLED])
        out = tap(x)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    tap.remove()


def test_remove_removes_hooks() -> None:
    model = create_model("wrn_16_1", num_classes=10)
    before = _n_hooks(model)
    tap = FeatureTap(model, ["block1", "block3", POOLED])
    assert _n_hooks(model) == before + 3
    tap.remove()
    assert _n_hooks(model) == before
    model(torch.randn(2, 3, 32, 32))
    assert tap.pop() == {}


def test_pop_after_plain_forward() -> None:
    model = create_model("cnn_tiny", num_classes=10)
    tap = FeatureTap(model, ["stage3", POOLED])
    model(torch.randn(2, 1, 28, 28))
    feats = tap.pop()
    assert set(feats) == {"stage3", POOLED}
    assert feats["stage3"].shape == (2, 64, 3, 3)
    assert tap.pop() == {}


@pytest.mark.parametrize(
    ("name", "last"),
    [
        ("resnet8", "layer3"),
        ("ResNet18", "layer4"),
        ("wrn_16_1", "relu"),
        ("vgg8", "act4"),
        ("MobileNetV2", "conv2"),
        ("ShuffleV1", "layer3"),
        ("cnn_small", "stage4"),
    ],
)
def test_pooled_is_mean_of_last_map(name: str, last: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    tap = FeatureTap(model, [last, POOLED])
    with torch.no_grad():
        feats = tap(_input(model)).feats
    torch.testing.assert_close(feats[POOLED], feats[last].mean((2, 3)))


def test_captured_stages_are_not_modified_in_place() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    tap = FeatureTap(model, ["layer1", "layer2", "layer3"])
    with torch.no_grad():
        feats = tap(torch.randn(2, 3, 32, 32)).feats
        torch.testing.assert_close(model.layer2(feats["layer1"]), feats["layer2"])
        torch.testing.assert_close(model.layer3(feats["layer2"]), feats["layer3"])
    assert (feats["layer1"] >= 0).all(), "resnet stages are tapped after the ReLU"


def test_tapped_features_carry_gradients() -> None:
    model = create_model("vgg8", num_classes=10).train()
    tap = FeatureTap(model, ["act2", POOLED])
    out = tap(torch.randn(2, 3, 32, 32))
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1])) + out.feats["act2"].pow(2).mean()
    loss.backward()
    assert model.block0[0].weight.grad is not None
    assert out.feats[POOLED].requires_grad
