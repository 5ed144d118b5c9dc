"""`relkd profile`: parameters, MACs, weight bytes and activation memory against counts made by
hand and against an independent counter (forward hooks on the conv / linear modules); latency is
a measurement, so only its presence and labelling are checked, never its value."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import relkd
from relkd.cli import main
from relkd.deploy.profile import (
    count_macs,
    count_params,
    peak_activation_bytes,
    profile_model,
    weight_bytes,
)
from relkd.models import create_model


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _conv_bn_linear() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # bias: 8
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_params_macs_and_bytes_equal_hand_counts():
    m = _conv_bn_linear()
    # conv 8*3*3*3 + 8, BN weight + bias 2*8, depthwise 8*1*3*3, linear 8*5 + 5
    params = (216 + 8) + 16 + 72 + 45
    assert count_params(m) == params
    x = torch.rand(1, 3, 16, 16)
    # each output element of a conv costs (in/groups)*kh*kw MACs; 8x16x16 outputs each
    macs = 8 * 16 * 16 * 27 + 8 * 16 * 16 * 9 + 8 * 5
    assert count_macs(m, x) == macs  # bias, BN, ReLU, pooling: not counted
    # BN running mean / var are weights too (4 bytes each), num_batches_tracked is not
    assert weight_bytes(m, 4) == (params + 16) * 4
    assert weight_bytes(m, 2) == (params + 16) * 2
    cost = profile_model(m, (3, 16, 16), latency=False)
    assert (cost.params, cost.macs, cost.num_classes) == (params, macs, 5)
    # a shared parameter counts once
    shared = nn.ModuleList([m[6], m[6]])  # the same Linear registered twice
    assert count_params(shared) == 45


def test_matmul_in_forward_code_is_counted():
    """A functional product (attention-style), invisible to module hooks, is counted."""

    class Attn(nn.Module):
        def forward(self, x):  # x [B, N, D]
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    x = torch.rand(1, 6, 4)
    assert count_macs(Attn(), x) == 6 * 6 * 4 + 6 * 6 * 4  # [6x4]@[4x6], [6x6]@[6x4]


def test_peak_activation_memory_of_a_chain():
    """Linear(10,20) -> ReLU -> Linear(20,5) at batch 1 fp32: the ReLU's output is made while
    the first Linear's is still referenced (80 + 80 bytes); then 80 + 20; the peak is 160."""
    m = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert peak_activation_bytes(m, torch.rand(1, 10)) == 160
    # In place ReLU reuses the storage: 80 + 20 at most.
    m = nn.Sequential(nn.Linear(10, 20), nn.ReLU(inplace=True), nn.Linear(20, 5))
    assert peak_activation_bytes(m, torch.rand(1, 10)) == 100


def _hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """An independent count: forward hooks on Conv2d / Linear, MACs from the output shape."""
    total = 0

    def hook(mod, _inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += out.numel() * mod.in_features

    hs = [
        mod.register_forward_hook(hook)
        for mod in model.modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return total


@pytest.mark.parametrize(
    "name",
    ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "cnn_tiny",
     "torchvision:resnet18", "timm:resnet10t"],
)  # fmt: skip
def test_zoo_macs_agree_with_an_independent_counter(name):
    in_chans = 1 if name == "cnn_tiny" else 3
    kw = {"in_chans": 1} if name == "cnn_tiny" else {}
    m = create_model(name, 100, **kw)
    x = torch.rand(1, in_chans, 32, 32)
    assert count_macs(m, x) == _hook_macs(m, x)


def test_attention_of_a_vit_is_counted():
    """timm's ViT calls scaled_dot_product_attention: its two products per block (QK^T and
    AV, N x N x D MACs each) come on top of what hooks on its Linear layers see."""
    m = create_model("timm:vit_tiny_patch16_224", 10, img_size=32)
    x = torch.rand(1, 3, 32, 32)
    tokens, dim, blocks = (32 // 16) ** 2 + 1, 192, 12
    assert count_macs(m, x) == _hook_macs(m, x) + blocks * 2 * tokens * tokens * dim


def test_published_sizes_of_the_crd_students():
    """The CRD paper's table: resnet8x4 ~1.2M parameters and ~0.18 G MACs at 100 classes."""
    cost = profile_model("resnet8x4", "3x32x32", num_classes=100, latency=False)
    assert cost.params == pytest.approx(1.23e6, rel=0.01)
    assert cost.macs == pytest.approx(0.18e9, rel=0.03)


def test_cli_profile_of_model_names_with_a_teacher(capsys):
    code, out, err = _cli(
        ["profile", "cnn_tiny", "--num-classes", "10", "--input", "1x28x28", "--teacher",
         "cnn_small", "--batch", "4", "--repeats", "3", "--warmup", "1", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    s, t = res["models"]
    assert (s["name"], t["name"]) == ("cnn_tiny", "cnn_small")
    s_model = create_model("cnn_tiny", 10, in_chans=1)
    t_model = create_model("cnn_small", 10, in_chans=1)
    assert s["params"] == count_params(s_model) and t["params"] == count_params(t_model)
    assert s["input_shape"] == [1, 28, 28]
    assert res["ratios"]["params_x"] == pytest.approx(t["params"] / s["params"])
    assert res["ratios"]["macs_x"] == pytest.approx(t["macs"] / s["macs"])
    for c in (s, t):
        assert {(r["device"], r["batch"], r["mode"]) for r in c["latency"]} >= {
            ("cpu", 1, "eager"),
            ("cpu", 4, "eager"),
        }
        for r in c["latency"]:
            assert r["repeats"] == 3 and r["warmup"] == 1
            assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
            if r["device"] == "cpu":
                assert r["threads"] >= 1 and "torch thread" in r["machine"]
    sp = {(x["device"], x["batch"]): x["x"] for x in res["ratios"]["speedup"]}
    t_lat = {(r["device"], r["batch"]): r["median_ms"] for r in t["latency"]}
    s_lat = {(r["device"], r["batch"]): r["median_ms"] for r in s["latency"]}
    assert sp[("cpu", 1)] == pytest.approx(t_lat[("cpu", 1)] / s_lat[("cpu", 1)])
    assert "not counted" in res["macs_note"]
    # the text form names what is not counted and the ratios
    code, out, _ = _cli(
        ["profile", "cnn_tiny", "--num-classes", "10", "--input", "1x28x28", "--no-latency"],
        capsys,
    )
    assert code == 0 and "MACs (batch 1)" in out and "not counted" in out


def test_cli_profile_of_a_run_folder(kd_run, capsys):
    code, out, err = _cli(["profile", str(kd_run), "--no-latency", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    s, t = res["models"]
    assert (s["name"], t["name"]) == ("cnn_tiny", "cnn_small")
    assert s["input_shape"] == t["input_shape"] == [1, 28, 28]  # the run's data, grey
    assert s["params"] == count_params(create_model("cnn_tiny", 10, in_chans=1))
    assert res["ratios"]["params_x"] > 10
    # Python: the same numbers
    py = relkd.profile_run(kd_run, latency=False)
    assert py["student"].params == s["params"] and py["teacher"].macs == t["macs"]
    code, _, err = _cli(["profile", str(kd_run), "--input", "3x32x32"], capsys)
    assert code == 2 and "brings its own models and input" in err


def test_cli_profile_errors_are_one_line(capsys, tmp_path):
    code, _, err = _cli(["profile", "cnn_tiny"], capsys)
    assert code == 2 and "--num-classes" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(["profile", "cnn_tiny", "--num-classes", "10", "--input", "3x"], capsys)
    assert code == 2 and "CxHxW" in err
    code, _, err = _cli(["profile", "no_such_model", "--num-classes", "10"], capsys)
    assert code == 2 and "no_such_model" in err
    if not torch.cuda.is_available():
        code, _, err = _cli(
            ["profile", "cnn_tiny", "--num-classes", "10", "--device", "cuda"], capsys
        )
        assert code == 2 and "CUDA is not available" in err


def test_benchmark_script_for_the_crd_pairs(tmp_path, capsys):
    """benchmarks/profile_crd_pairs.py (the run behind benchmarks/profile.md): its records are
    `relkd profile`'s numbers and its table quotes them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_crd_pairs.py"
    spec = importlib.util.spec_from_file_location("profile_crd_pairs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p"
    assert mod.main(["--out", str(out), "--pairs", "resnet32x4:resnet8x4", "--no-latency"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recs] == ["resnet32x4", "resnet8x4"]
    for r in recs:
        assert r["params"] == count_params(create_model(r["name"], 100))
    md = (tmp_path / "p.md").read_text()
    t, s = recs
    assert f"| resnet32x4 → resnet8x4 | {t['params'] / 1e6:.2f} / {s['params'] / 1e6:.2f} |" in md
    assert f"{t['params'] / s['params']:.1f}×" in md and "load average before" in md


@pytest.mark.slow
def test_cli_profile_times_torch_compile_too(capsys):
    code, out, err = _cli(
        ["profile", "cnn_tiny", "--num-classes", "10", "--input", "1x28x28", "--compile",
         "--batch", "1", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (m,) = json.loads(out)["models"]
    assert {(r["batch"], r["mode"]) for r in m["latency"]} == {(1, "eager"), (1, "compile")}


def test_profile_md_counts_are_the_codes():
    """benchmarks/profile.md quotes parameters and MACs of the 13 CRD pairs: they must be what
    the code counts (the latency columns come from the recorded run, never from a test)."""
    from pathlib import Path

    from relkd.bench.reference import CRD_PAIRS

    text = (Path(__file__).resolve().parents[2] / "benchmarks" / "profile.md").read_text()
    counts = {}
    for name in {m for pair in CRD_PAIRS for m in pair}:
        m = create_model(name, 100)
        counts[name] = (count_params(m), count_macs(m, torch.rand(1, 3, 32, 32)))
    for t, s in CRD_PAIRS:
        (tp, tm), (sp, sm) = counts[t], counts[s]
        row = (
            f"| {t} → {s} | {tp / 1e6:.2f} / {sp / 1e6:.2f} | {tm / 1e6:.1f} / {sm / 1e6:.1f} | "
            f"{tp / sp:.1f}× | {tm / sm:.1f}× |"
        )
        assert row in text, row


def test_a_forward_that_fails_on_the_input_is_one_line_naming_shapes(capsys):
    """A 1-channel model given --input 3x..: one line naming the input and the channels the
    model's first convolution takes (was a traceback); another forward failure names the input
    shape and the model's own error."""
    grey = "tests.foreign_resnet:grey_net"
    code, out, err = _cli(
        ["profile", grey, "--num-classes", "10", "--input", "3x16x16", "--no-latency"], capsys
    )
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert (
        f"model {grey!r} cannot run on input 3x16x16: its first convolution (module '0') takes "
        "1 channel(s), not 3 (e.g. --input 1x16x16); the forward raised RuntimeError:" in err
    )

    class NeedsSize(nn.Module):  # fails on anything but 8x8 images
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], 64))

    with pytest.raises(relkd.RelkdError, match=r"^model 'NeedsSize' failed on an input of shape "
                       r"1x4x4 \(batch 1\): RuntimeError: shape '\[1, 64\]' is invalid"):  # fmt: skip
        profile_model(NeedsSize(), (1, 4, 4), latency=False)
    assert profile_model(NeedsSize(), (1, 8, 8), latency=False).params == 64 * 3 + 3


@pytest.mark.parametrize(
    ("flag", "value", "want"),
    [("--repeats", "0", ">= 1 (timed calls)"), ("--repeats", "-3", ">= 1 (timed calls)"),
     ("--warmup", "-1", ">= 0 (untimed calls first)"),
     ("--batch", "0", ">= 1 (the larger batch timed)"),
     ("--threads", "0", ">= 1 (torch CPU threads)"),
     ("--num-classes", "-2", ">= 1 (classes of the model's output)")],
)  # fmt: skip
def test_cli_profile_refuses_counts_below_their_bound(capsys, flag, value, want):
    """--repeats 0 used to time one call silently; each count flag names itself and its bound."""
    args = {"--num-classes": "10", "--input": "1x8x8", "--repeats": "2", "--warmup": "0",
            "--batch": "2", flag: value}  # fmt: skip
    code, out, err = _cli(["profile", "cnn_tiny", *(x for kv in args.items() for x in kv)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{flag} {value} is not valid: must be {want}" in err
    # the Python API refuses the same, naming its keyword
    with pytest.raises(relkd.RelkdError, match=r"repeats=0 is not valid: must be an int >= 1"):
        profile_model("cnn_tiny", (1, 8, 8), num_classes=10, repeats=0)
    # and times exactly what is asked for
    r = profile_model("cnn_tiny", (1, 8, 8), num_classes=10, batches=(1,), warmup=0, repeats=2)
    assert [x["repeats"] for x in r.latency if x["device"] == "cpu"] == [2]
