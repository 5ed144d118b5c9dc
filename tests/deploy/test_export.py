"""`relkd export` / `relkd eval FILE.onnx` / :func:`relkd.export_onnx` as a user meets them: a zoo
student, a torchvision student and a user module; the file computes what the trained student
computes (same test top-1 as the run's own evaluation), its check fails loudly and leaves
nothing behind, and an unexportable operator is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import relkd
from relkd.cli import main

onnx = pytest.importorskip("onnx", reason="the export extra: pip install 'relkd[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra: pip install 'relkd[export]'")

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]  # fmt: skip


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _meta(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_a_zoo_student_and_evaluate_the_file(kd_run, fmnist_root, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    code, text, err = _cli(["export", str(kd_run), "--out", str(out)], capsys)
    assert code == 0, err
    assert out.is_file() and "checked with onnxruntime" in text
    rec = json.loads((tmp_path / "tiny.export.json").read_text())
    v = rec["verification"]
    assert rec["file"] == "tiny.onnx" and rec["exporter"] in ("dynamo", "torchscript")
    assert v["max_abs_logit_diff"] <= v["tolerance"] and v["top1_agreement"] == 1.0
    assert v["images"] == 128 and "test split of fashion_mnist" in v["source"]
    summary = json.loads((kd_run / "summary.json").read_text())
    # The torch reference is the student as training fed it: the run's own last top-1.
    assert v["torch_top1"] == pytest.approx(summary["last_top1"])
    assert v["onnx_top1"] == pytest.approx(summary["last_top1"])
    meta = _meta(out)
    assert json.loads(meta["class_names"]) == FMNIST_CLASSES
    assert json.loads(meta["mean"]) == pytest.approx([0.286]) and meta["input_size"] == "1x28x28"
    assert meta["relkd_version"] == relkd.__version__ and meta["input_range"] == "[0, 1]"
    # A fixed batch of 1, float [0, 1] NCHW in, logits out.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 1, 28, 28]
    assert sess.get_outputs()[0].shape[-1] == 10
    # `relkd eval FILE.onnx` on the data set: the run's numbers again.
    code, text, err = _cli(
        ["eval", str(out), "--data", "fashion_mnist", "--root", str(fmnist_root)], capsys
    )
    assert code == 0, err
    res = json.loads(text)
    assert res["top1"] == pytest.approx(summary["last_top1"])
    assert res["top5"] == pytest.approx(summary["last_top5"])
    # The same from Python.
    assert relkd.eval_onnx(out, "fashion_mnist", str(fmnist_root))["top1"] == res["top1"]
    rec = relkd.export_run(kd_run, tmp_path / "py" / "s.onnx", verify_images=32)
    assert rec["verification"]["images"] == 32 and (tmp_path / "py" / "s.export.json").is_file()


def test_export_options_dynamic_batch_opset_best_no_data(kd_run, tmp_path, capsys):
    out = tmp_path / "dyn.onnx"
    code, _, err = _cli(
        ["export", str(kd_run), "--out", str(out), "--dynamic-batch", "--opset", "18",
         "--no-data", "--best"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rec = json.loads((tmp_path / "dyn.export.json").read_text())
    assert rec["opset"] == 18 and rec["dynamic_batch"] is True
    assert rec["verification"]["source"].startswith("64 random images")
    assert rec["metadata"]["weights"] == "student_best.pt"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"image": torch.rand(3, 1, 28, 28).numpy()})[0]
    assert y.shape == (3, 10)
    # Default output: beside the run's weights.
    code, _, err = _cli(["export", str(kd_run), "--no-data"], capsys)
    assert code == 0, err
    assert (kd_run / "student.onnx").is_file() and (kd_run / "student.export.json").is_file()


def test_int8_reports_both_accuracies_and_latencies(kd_run, tmp_path, capsys):
    out = tmp_path / "q" / "student.onnx"
    code, text, err = _cli(
        ["export", str(kd_run), "--out", str(out), "--int8", "--calibration-images", "64"],
        capsys,
    )
    assert code == 0, err
    rec = json.loads((out.parent / "student.export.json").read_text())
    q = rec["int8"]
    assert (out.parent / q["file"]).is_file() and q["file"] == "student.int8.onnx"
    assert q["calibration_images"] == 64 and q["eval_images"] == 128  # the whole test split
    assert q["fp32_top1"] == pytest.approx(rec["verification"]["onnx_top1"])
    assert 0 <= q["int8_top1"] <= 100
    assert q["bytes_int8"] < q["bytes_fp32"]
    for lat in (q["fp32_latency"], q["int8_latency"]):
        assert lat["median_ms"] > 0 and "ONNX Runtime" in lat["machine"]
    assert "int8:" in text and "fp32" in text
    # the int8 file evaluates like any export
    code, text, err = _cli(
        ["eval", str(out.parent / q["file"]), "--data", "fashion_mnist", "--root",
         _root(kd_run)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(text)["top1"] == pytest.approx(q["int8_top1"])
    code, _, err = _cli(["export", str(kd_run), "--int8", "--no-data"], capsys)
    assert code == 2 and "--no-data" in err


def _root(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]


def test_a_failed_check_leaves_no_file(kd_run, tmp_path, capsys, monkeypatch):
    import relkd.deploy.export as ex

    real = ex.ort_logits
    monkeypatch.setattr(ex, "ort_logits", lambda sess, x, batch=64: real(sess, x, batch) + 0.5)
    out = tmp_path / "new" / "bad.onnx"
    code, _, err = _cli(["export", str(kd_run), "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "export check failed" in err and "no file written" in err
    assert list(tmp_path.iterdir()) == []  # nor the folder made for it


def test_export_a_torchvision_student_cli_and_profile(tv_run, tmp_path, capsys):
    out = tmp_path / "tv.onnx"
    code, _, err = _cli(["export", str(tv_run), "--out", str(out), "--verify-images", "16"],
                        capsys)  # fmt: skip
    assert code == 0, err
    rec = json.loads((tmp_path / "tv.export.json").read_text())
    assert rec["verification"]["images"] == 16 and rec["verification"]["top1_agreement"] == 1.0
    assert rec["metadata"]["architecture"] == "torchvision:resnet18"
    code, text, err = _cli(["profile", str(tv_run), "--no-latency", "--json"], capsys)
    assert code == 0, err
    (s,) = json.loads(text)["models"]  # a CE run: no teacher
    assert s["name"] == "torchvision:resnet18" and s["input_shape"] == [1, 28, 28]


class UserNet(nn.Module):
    """A user's own module: returns (logits, features), takes normalised RGB images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        f = self.body(x)
        return self.head(f), f


def test_python_api_exports_a_user_module_and_a_timm_model(tmp_path):
    m = UserNet().eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    images = torch.rand(20, 3, 16, 16)
    labels = torch.arange(20) % 4
    rec = relkd.export_onnx(
        m, tmp_path / "user.onnx", input_shape=(3, 16, 16), mean=mean, std=std,
        class_names=["a", "b", "c", "d"], images=images, labels=labels, dynamic_batch=True,
    )  # fmt: skip
    assert rec["verification"]["top1_agreement"] == 1.0
    # The file really normalises: its logits are the module's on (x - mean) / std.
    sess = ort.InferenceSession(str(tmp_path / "user.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"image": images.numpy()})[0])
    want = m((images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))[0]
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)
    assert json.loads(_meta(tmp_path / "user.onnx")["class_names"]) == ["a", "b", "c", "d"]
    r = relkd.export_onnx(relkd.create_model("timm:resnet10t", 7), tmp_path / "timm.onnx",
                          input_shape="3x32x32")  # fmt: skip
    assert r["verification"]["max_abs_logit_diff"] <= r["verification"]["tolerance"]


def test_an_unexportable_operator_is_named(tmp_path):
    class Bessel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.special.bessel_j0(x.mean((2, 3))))

    with pytest.raises(relkd.RelkdError, match="special_bessel_j0") as e:
        relkd.export_onnx(Bessel(), tmp_path / "b.onnx", input_shape=(3, 8, 8))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(kd_run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    code, _, err = _cli(["export", str(kd_run), "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and "pip install 'relkd[export]'" in err and "onnxruntime" in err
    assert len(err.strip().splitlines()) == 1


def test_safetensors_format_is_the_runs_export(kd_run, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "w.safetensors"
    code, _, err = _cli(["export", str(kd_run), "--format", "safetensors", "--out", str(out)],
                        capsys)  # fmt: skip
    assert code == 0, err
    with safe_open(str(out), "pt") as a, safe_open(str(kd_run / "student.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118  (safe_open is no dict)
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    code, _, err = _cli(["export", str(kd_run), "--format", "safetensors", "--int8"], capsys)
    assert code == 2 and "--int8" in err


def test_a_pretrained_student_exports_with_its_own_statistics(tmp_path, monkeypatch, capsys):
    """student.weights=IMAGENET1K_V1 (a fake local cache): training fed the student ImageNet
    statistics (averaged for grey images); the file normalises with them, so `relkd eval
    FILE.onnx` gives the run's own last test loss."""
    from tests.conftest import make_fmnist
    from tests.deploy.conftest import _train
    from tests.models.test_pretrained import _fake_torchvision_cache

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    root = make_fmnist(tmp_path / "fm", n_train=64, n_test=32)
    run = _train(
        root, tmp_path / "runs", "tvp", "torchvision:resnet18", optim={"lr": 0.01},
        student={"name": "torchvision:resnet18", "weights": "IMAGENET1K_V1"},
    )  # fmt: skip
    out = tmp_path / "p.onnx"
    code, _, err = _cli(["export", str(run), "--out", str(out)], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "p.export.json").read_text())
    grey = sum([0.485, 0.456, 0.406]) / 3, sum([0.229, 0.224, 0.225]) / 3
    assert rec["metadata"]["mean"] == pytest.approx([grey[0]])
    assert rec["metadata"]["std"] == pytest.approx([grey[1]])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    code, text, err = _cli(["eval", str(out), "--data", "fashion_mnist", "--root", str(root)],
                           capsys)  # fmt: skip
    assert code == 0, err
    res = json.loads(text)
    assert res["top1"] == pytest.approx(last["top1"])
    assert res["test_loss"] == pytest.approx(last["test_loss"], rel=1e-4)


def test_export_and_profile_leave_a_users_module_as_they_found_it(tmp_path):
    m = UserNet().train()
    relkd.export_onnx(m, tmp_path / "u.onnx", input_shape=(3, 8, 8))
    relkd.profile_model(m, (3, 8, 8), latency=False)
    assert m.training and all(p.device.type == "cpu" for p in m.parameters())


def test_python_int8_of_a_user_module(tmp_path):
    torch.manual_seed(0)
    m = UserNet().eval()
    images, labels = torch.rand(40, 3, 12, 12), torch.arange(40) % 4
    rec = relkd.export_onnx(
        m, tmp_path / "u.onnx", input_shape=(3, 12, 12), mean=[0.5] * 3, std=[0.25] * 3,
        images=images, labels=labels, int8=True, calibration=torch.rand(32, 3, 12, 12),
    )  # fmt: skip
    q = rec["int8"]
    assert (tmp_path / "u.int8.onnx").is_file() and q["calibration_images"] == 32
    assert q["fp32_top1"] == pytest.approx(rec["verification"]["onnx_top1"])
    assert q["eval_images"] == 40 and 0 <= q["top1_agreement_with_fp32"] <= 1
    with pytest.raises(relkd.RelkdError, match="calibration"):
        relkd.export_onnx(m, tmp_path / "v.onnx", input_shape=(3, 12, 12), int8=True)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--split", "val"], "--split val"),
        (["--test-subset", "500"], "--test-subset"),
        (["--device", "cpu"], "--device"),
    ],
)
def test_eval_of_an_onnx_file_refuses_flags_it_would_ignore(tmp_path, capsys, flags, named):
    """``relkd eval FILE.onnx --split val`` used to evaluate the whole test split silently (found
    by a new-user check); a flag the ONNX path does not apply is one line, exit 2."""
    from relkd.cli import main

    onnx_file = tmp_path / "student.onnx"
    onnx_file.write_bytes(b"not read: the flags are refused first")
    assert main(["eval", str(onnx_file), "--data", "fashion_mnist", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "not supported for an ONNX file" in err[0]


@pytest.mark.parametrize("content", ["empty", "random"])
def test_eval_of_a_file_that_is_no_onnx_model_is_one_line(fmnist_root, tmp_path, capsys, content):
    """``relkd eval`` of an empty .onnx file showed ONNX Runtime's traceback ("No graph was found
    in the protobuf"); an empty file or random bytes are one line naming the file, exit 2."""
    import numpy as np

    from relkd.cli import main

    onnx_file = tmp_path / "student.onnx"
    data = b"" if content == "empty" else np.random.default_rng(0).bytes(300)
    onnx_file.write_bytes(data)
    code = main(["eval", str(onnx_file), "--data", "fashion_mnist", "--root", str(fmnist_root)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert str(onnx_file) in lines[0] and "is not a valid ONNX model (" in lines[0]
    assert "Traceback" not in err
    if content == "empty":  # the reason is ONNX Runtime's own, without its code prefix
        assert "ONNX Runtime: No graph was found in the protobuf" in lines[0]
        assert "INVALID_ARGUMENT" not in lines[0]


def test_the_python_module_hint_names_relkd_trains_real_keyword():
    from relkd.plugins import PYTHON_MODULE, refuse_python_module

    for section, keyword in (("model", "student"), ("student", "student"), ("teacher", "teacher")):
        with pytest.raises(relkd.RelkdError, match=rf"relkd\.train\(config, {keyword}=module"):
            refuse_python_module(f"{PYTHON_MODULE}mypkg.Net", section)


def test_an_opset_the_exporter_does_not_write_is_one_line_and_no_file(kd_run, tmp_path, capsys):
    """Found by a new-user check: ``--opset 5`` silently wrote opset 18."""
    out = tmp_path / "old.onnx"
    code, _, err = _cli(["export", str(kd_run), "--out", str(out), "--opset", "5", "--no-data"],
                        capsys)  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--opset 5 was asked for" in err and "no file written" in err
    assert not out.exists() and not list(tmp_path.glob(".old.onnx*"))


def test_each_export_into_a_folder_keeps_its_own_record(kd_run, fmnist_root, tmp_path, capsys):
    """Two exports into one folder shared one export.json (the second overwrote the first's
    record); each file now has <stem>.export.json, and `relkd eval` reads each file."""
    recs = {}
    for stem, extra in (("a", ["--verify-images", "16"]), ("b", ["--dynamic-batch", "--no-data"])):
        code, text, err = _cli(["export", str(kd_run), "--out", str(tmp_path / f"{stem}.onnx"),
                                *extra], capsys)  # fmt: skip
        assert code == 0, err
        assert f"record: {tmp_path / f'{stem}.export.json'}" in text
        recs[stem] = json.loads((tmp_path / f"{stem}.export.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.export.json", "a.onnx", "b.export.json", "b.onnx"
    ]  # fmt: skip
    assert recs["a"]["file"] == "a.onnx" and recs["a"]["verification"]["images"] == 16
    assert recs["a"]["dynamic_batch"] is False and recs["a"]["input"][0] == 1
    assert recs["b"]["file"] == "b.onnx" and recs["b"]["dynamic_batch"] is True
    assert recs["b"]["verification"]["source"].startswith("64 random images")
    summary = json.loads((kd_run / "summary.json").read_text())
    for stem in ("a", "b"):  # the same student: the run's own test top-1 from either file
        code, text, err = _cli(["eval", str(tmp_path / f"{stem}.onnx"), "--data",
                                "fashion_mnist", "--root", str(fmnist_root)], capsys)  # fmt: skip
        assert code == 0, err
        assert json.loads(text)["top1"] == pytest.approx(summary["last_top1"])


def test_a_write_failure_is_reported_as_one_and_leaves_nothing(
    kd_run, tmp_path, capsys, monkeypatch
):
    """A folder that cannot be written, or a disk that fills as the checked file is copied
    there, is one line naming the path and the system's reason (it read as an exporter
    failure); nothing half-written is left, and an earlier file of that name is kept whole."""
    import errno

    import relkd._fs

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x.onnx"  # its folder is a file
    code, text, err = _cli(["export", str(kd_run), "--out", str(out), "--no-data"], capsys)
    assert code == 2 and text == "" and len(err.strip().splitlines()) == 1, err
    assert f"cannot write {str(out)!r}: " in err and str(tmp_path / "afile") in err
    assert "exporter" not in err
    # the disk fills while the checked file is written beside the destination
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "x.onnx").write_bytes(b"the earlier export")
    real = relkd._fs.write_fsync

    def full(path, data):
        if Path(path).parent == dest:
            with open(path, "wb") as f:  # a part gets written, then the disk is full
                f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(relkd._fs, "write_fsync", full)
    for fmt, name in (("onnx", "x.onnx"), ("safetensors", "x.safetensors")):
        argv = ["export", str(kd_run), "--out", str(dest / name), "--format", fmt]
        code, text, err = _cli(argv + (["--no-data"] if fmt == "onnx" else []), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"cannot write {str(dest / name)!r}: No space left on device (errno 28)" in err
        assert sorted(p.name for p in dest.iterdir()) == ["x.onnx"]  # no part, no record
        assert (dest / "x.onnx").read_bytes() == b"the earlier export"


@pytest.mark.parametrize(
    ("flag", "value"), [("--verify-images", "0"), ("--calibration-images", "-1"), ("--opset", "0")]
)
def test_cli_export_refuses_counts_below_one(kd_run, tmp_path, capsys, flag, value):
    code, _, err = _cli(
        ["export", str(kd_run), "--out", str(tmp_path / "x.onnx"), flag, value], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{flag} {value} is not valid: must be >= 1" in err
    assert list(tmp_path.iterdir()) == []
