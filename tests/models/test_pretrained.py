"""Pretrained weights from the local caches only (fake caches in tmp folders: nothing downloads),
one-line errors naming the file and folder, first-conv adaptation for grey / 4-channel data and
close-match hints for torchvision / timm names."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from relkd.models import create_model
from relkd.models.normalization import attach_input_norm, find_input_norm
from relkd.registry import RelkdError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Every download entry point fails the test; caches live under tmp_path."""

    def boom(*a, **k):
        raise AssertionError(f"a download was attempted: {a[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _random_like(key: str, v: torch.Tensor) -> torch.Tensor:
    if not v.is_floating_point():
        return v
    return torch.rand_like(v) + 0.5 if key.endswith("running_var") else torch.randn_like(v) * 0.1


def _fake_torchvision_cache(name: str, weights: str) -> dict[str, torch.Tensor]:
    """A state dict of the right shapes (random values) under the file name torchvision uses."""
    w = torchvision.models.get_model_weights(name)[weights]
    torch.manual_seed(1)
    sd = torchvision.models.get_model(name, weights=None).state_dict()
    sd = {k: _random_like(k, v) for k, v in sd.items()}
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder)
    torch.save(sd, os.path.join(folder, os.path.basename(w.url)))
    return sd


def test_torchvision_weights_load_from_torch_home() -> None:
    sd = _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    model = create_model("torchvision:resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert find_input_norm(model) == IMAGENET  # the weights' own normalisation
    # Another class count: the backbone is the weights', the classifier a fresh one.
    ten = create_model("torchvision:resnet18", num_classes=10, weights="DEFAULT")
    assert torch.equal(ten.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert ten.fc.weight.shape == (10, 512)
    assert ten.new_classifier and not model.new_classifier
    assert [i.name for i in ten.feature_info] == ["layer1", "layer2", "layer3", "layer4"]


def test_missing_torchvision_weights_name_file_and_folder() -> None:
    with pytest.raises(RelkdError) as e:
        create_model("torchvision:resnet50", num_classes=10, weights="IMAGENET1K_V1")
    msg = str(e.value)
    folder = os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints")
    assert "resnet50-0676ba61.pth" in msg and folder in msg and "\n" not in msg


def test_torchvision_weights_typo_suggests() -> None:
    with pytest.raises(RelkdError, match=r"did you mean IMAGENET1K_V1\?.*Valid choices: DEFAULT"):
        create_model("torchvision:resnet18", num_classes=10, weights="IMAGENET1K_V3")


def test_from_scratch_models_declare_the_data_statistics() -> None:
    assert find_input_norm(create_model("torchvision:resnet18", num_classes=10)) is None
    pytest.importorskip("timm")
    # A timm model has a pretrained_cfg even without weights; relkd says "the data's" then.
    assert find_input_norm(create_model("timm:resnet18", num_classes=10)) is None


def test_grey_and_four_channel_first_conv() -> None:
    sd = _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    rgb = create_model("torchvision:resnet18", num_classes=10, weights="IMAGENET1K_V1").eval()
    grey = create_model("torchvision:resnet18", num_classes=10, weights="IMAGENET1K_V1", in_chans=1)
    grey.fc.load_state_dict(rgb.fc.state_dict())
    grey.eval()
    assert torch.equal(grey.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    g = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a grey image answers like the same image in RGB
        torch.testing.assert_close(grey(g), rgb(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    four = create_model("torchvision:resnet18", num_classes=10, weights="IMAGENET1K_V1", in_chans=4)
    w = sd["conv1.weight"]
    torch.testing.assert_close(four.conv1.weight, torch.cat([w, w[:, :1]], 1) * 0.75)
    assert four(torch.randn(2, 4, 32, 32)).shape == (2, 10)
    # Grey data and 3-value statistics: their average (the grey image stands for R = G = B).
    fp = attach_input_norm(grey, (0.3,), (0.2,))
    assert str(sum(IMAGENET[0]) / 3) in fp


@pytest.mark.parametrize("name", ["densenet121", "swin_t", "vit_b_16", "mobilenet_v3_small"])
def test_every_family_takes_grey_data(name: str) -> None:
    kw = {"image_size": 32} if name.startswith("vit") else {}
    model = create_model(f"torchvision:{name}", num_classes=10, in_chans=1, **kw)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_googlenet_grey_pretrained_is_a_clear_error() -> None:
    with pytest.raises(RelkdError, match="transform_input"):
        create_model("torchvision:googlenet", num_classes=10, in_chans=1, transform_input=True)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("torchvision:resnt18", "resnet18"), ("torchvision:mobilenet_v3_smal", "mobilenet_v3_small")],
)
def test_torchvision_name_hints(name: str, hint: str) -> None:
    with pytest.raises(RelkdError, match=f"did you mean {hint}") as e:
        create_model(name, num_classes=10)
    assert len(str(e.value)) < 200  # a suggestion, not the list of ~80 names


def test_zoo_models_refuse_weights() -> None:
    with pytest.raises(RelkdError, match="checkpoint"):
        create_model("resnet8", num_classes=10, weights="IMAGENET1K_V1")


def _fake_hf_cache(name: str, hub_id: str) -> dict[str, torch.Tensor]:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    sd = timm.create_model(name, pretrained=False).state_dict()
    sd = {k: _random_like(k, v) for k, v in sd.items()}
    repo = os.path.join(os.environ["HF_HUB_CACHE"], f"models--{hub_id.replace('/', '--')}")
    os.makedirs(os.path.join(repo, "refs"))
    os.makedirs(os.path.join(repo, "snapshots", "0123abcd"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0123abcd")
    save_file(
        {k: v.contiguous() for k, v in sd.items()},
        os.path.join(repo, "snapshots", "0123abcd", "model.safetensors"),
    )
    return sd


def test_timm_pretrained_loads_from_the_hf_cache() -> None:
    pytest.importorskip("timm")
    sd = _fake_hf_cache("resnet18", "timm/resnet18.a1_in1k")
    model = create_model("timm:resnet18", num_classes=10, weights="pretrained")
    assert torch.equal(model.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])
    assert model.fc.weight.shape == (10, 512) and model.new_classifier  # fresh, 10 classes
    assert find_input_norm(model) == IMAGENET
    grey = create_model("timm:resnet18", num_classes=10, weights="pretrained", in_chans=1)
    torch.testing.assert_close(grey.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))


def test_missing_timm_weights_name_file_and_folder() -> None:
    pytest.importorskip("timm")
    with pytest.raises(RelkdError) as e:
        create_model("timm:resnet18", num_classes=10, pretrained=True)
    msg = str(e.value)
    folder = os.path.join(os.environ["HF_HUB_CACHE"], "models--timm--resnet18.a1_in1k")
    assert "model.safetensors" in msg and folder in msg and "\n" not in msg


def test_timm_name_hint() -> None:
    pytest.importorskip("timm")
    with pytest.raises(RelkdError, match="did you mean resnet18"):
        create_model("timm:resnt18", num_classes=10)


def _tiny_cfg(tmp_path, fmnist_root, **sections):
    cfg = {
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
        "optim": {"lr": 0.01},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "device": "cpu", "progress": False,
                  "tensorboard": False},
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    cfg.update(sections)
    return cfg


def test_fit_trains_a_pretrained_torchvision_student_on_grey_data(tmp_path) -> None:
    """Through relkd.train: student.weights loads the cached file (first conv adapted to the
    grey data), and the weights' ImageNet statistics are applied by the input hook."""
    import relkd
    from relkd.models.normalization import input_norm_fingerprint
    from tests.conftest import make_fmnist

    sd = _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    root = make_fmnist(tmp_path / "fm", n_train=64, n_test=32)
    import relkd.engine.build as build_mod

    seen = {}
    real_build = build_mod.build_models

    def spy(*a, **k):
        t, s = real_build(*a, **k)
        seen["student"], seen["conv1"] = s, s.conv1.weight.detach().clone()
        return t, s

    cfg = _tiny_cfg(
        tmp_path, root, student={"name": "torchvision:resnet18", "weights": "IMAGENET1K_V1"},
        method={"name": "ce"},
    )  # fmt: skip
    import unittest.mock

    with unittest.mock.patch.object(build_mod, "build_models", spy):
        summary = relkd.train(cfg, quiet=True)
    s = seen["student"]
    assert summary["last_top1"] >= 0
    # As built (before training): the grey first conv is the cached RGB kernel summed over its
    # input channels, and the weights' ImageNet statistics are applied by the input hook.
    assert torch.allclose(seen["conv1"], sd["conv1.weight"].sum(1, keepdim=True))
    assert '"mean": [0.449], "std": [0.226]' in input_norm_fingerprint(s)  # ImageNet, grey


def test_fit_refuses_a_pretrained_teacher_whose_classifier_is_new(tmp_path) -> None:
    import relkd
    from tests.conftest import make_fmnist

    _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    root = make_fmnist(tmp_path / "fm", n_train=64, n_test=32)
    cfg = _tiny_cfg(
        tmp_path, root, student={"name": "cnn_tiny"}, method={"name": "kd"},
        teacher={"name": "torchvision:resnet18", "weights": "IMAGENET1K_V1"},
    )  # fmt: skip
    with pytest.raises(RelkdError, match="untrained classifier"):
        relkd.train(cfg, quiet=True)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.yaml"))
