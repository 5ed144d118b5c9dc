"""``relkd probe``: the RRD linear-probe transfer protocol (arXiv 2407.12073) on tiny synthetic
STL-10 / Tiny-ImageNet files written in their real on-disk formats."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relkd.data import build_datasets
from relkd.models import create_model, save_student
from relkd.probe import (
    BN_NOTE,
    NO_AUGMENT_NOTE,
    PROTOCOL,
    LinearProbe,
    add_probe_parser,
    build_probe,
    file_pipeline,
    fit_probe,
    head_optimizer,
    head_schedule,
    load_probe_config,
    materialize_file_split,
    probe_options,
    run_probe,
)
from relkd.registry import RelkdError
from tests.foreign_resnet import AKAMASTER_MEAN, AKAMASTER_STD, ResNet

REPO = Path(__file__).resolve().parents[1]

#: One clearly distinct colour per class: linearly separable after global pooling.
COLOURS = np.array(
    [[230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230],
     [25, 230, 230], [240, 240, 240], [15, 15, 15], [128, 64, 0], [0, 128, 64]],
    dtype=np.float64,
)  # fmt: skip


def _images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, size, size, 3]: the class colour plus pixel noise."""
    x = COLOURS[labels][:, None, None, :] + rng.normal(0, 20, (len(labels), size, size, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def write_stl10(root: Path, n_train: int = 160, n_test: int = 100, seed: int = 0) -> Path:
    """STL-10 binaries: X uint8, each image [3, 96, 96] channel by channel in column-major
    order; y uint8 labels 1..10; class_names.txt."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = _images(y, 96, rng)  # [N, H, W, C]
        x.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")  # -> [N, C, W, H]
        (y + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return root


def write_tiny_imagenet(root: Path, per_class: int = 6, n_val: int = 12, seed: int = 0) -> Path:
    """Tiny-ImageNet layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and
    val/val_annotations.txt (64x64 JPEGs)."""
    rng = np.random.default_rng(seed)
    wnids = ["n00000003", "n00000001", "n00000002"]  # unsorted on purpose
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    order = sorted(wnids)
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        labels = np.full(per_class, order.index(w))
        for i, img in enumerate(_images(labels, 64, rng)):
            Image.fromarray(img).save(d / f"{w}_{i}.JPEG", quality=95)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    labels = np.arange(n_val) % len(wnids)
    for i, img in enumerate(_images(labels, 64, rng)):
        Image.fromarray(img).save(root / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{order[labels[i]]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def stl_root(tmp_path_factory) -> Path:
    return write_stl10(tmp_path_factory.mktemp("stl"))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("tin") / "tiny-imagenet-200")


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory) -> Path:
    """An (untrained) CIFAR-100 resnet8 with non-trivial BN running statistics."""
    torch.manual_seed(0)
    model = create_model("resnet8", 100)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    path = tmp_path_factory.mktemp("student") / "student.pt"
    save_student(model, path)
    return path


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the model


def test_head_init_and_optimizer_hold_only_the_head(student_ckpt):
    torch.manual_seed(0)
    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=200)
    w, b = probe.head.weight, probe.head.bias
    wd = w.detach()
    assert w.shape == (200, 64)
    assert abs(float(wd.std()) - 0.01) < 0.0006 and abs(float(wd.mean())) < 0.0006
    assert torch.count_nonzero(b) == 0
    assert all(not p.requires_grad for p in probe.backbone.parameters())
    opt = head_optimizer(probe, lr=0.05, momentum=0.9, weight_decay=5e-4)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(w), id(b)}
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.9, 5e-4)
    probe.train()
    assert probe.training and probe.head.training
    assert not any(m.training for m in probe.backbone.modules())


def test_features_are_the_classifier_input(student_ckpt):
    from relkd.models import load_checkpoint

    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=10)
    ref = load_checkpoint(create_model("resnet8", 100), student_ckpt).eval()
    x = torch.randn(4, 3, 32, 32)
    f = probe.features(x)
    assert not f.requires_grad and f.shape == (4, 64)
    with torch.no_grad():
        torch.testing.assert_close(ref.fc(f), ref(x))
    out = probe(x)
    assert out.shape == (4, 10) and out.requires_grad


def test_lr_schedule_is_the_protocols():
    """The protocol's rule (official ``adjust_learning_rate``: x0.1 at epochs 30 / 60 / 90) is
    the engine's multistep schedule, which equals torch's MultiStepLR stepped per epoch."""
    from relkd.engine.schedule import Schedule

    sched = head_schedule(0.05, 3, 120, [30, 60, 90], 0.1)
    assert isinstance(sched, Schedule)
    lrs = [sched.lr(s) for s in range(0, 360, 3)]  # the first step of every epoch
    assert lrs[0] == lrs[29] == 0.05
    assert lrs[30] == pytest.approx(0.005) and lrs[59] == pytest.approx(0.005)
    assert lrs[60] == pytest.approx(5e-4) and lrs[90] == pytest.approx(5e-5)
    assert lrs[119] == pytest.approx(5e-5)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60, 90], 0.1)
    for e in range(120):
        assert sched.lr(3 * e + 2) == pytest.approx(ref.get_last_lr()[0], rel=1e-12), e
        opt.step()
        ref.step()


# -------------------------------------------------------------------------- the training


def test_backbone_frozen_bit_identical_and_bn_stats_unchanged(stl_root, student_ckpt, tmp_path):
    train, test, info = build_datasets("stl10", stl_root, image_size=32)
    assert info.image_size == 32 and info.crop_padding == 4
    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=10)
    before = _state(probe.backbone)
    head_before = probe.head.weight.detach().clone()
    summary = fit_probe(
        probe, train, test, run_dir=tmp_path, epochs=2, batch_size=32, max_steps_per_epoch=3,
        quiet=True,
    )  # fmt: skip
    after = probe.backbone.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights, BN running_mean / running_var / num_batches_tracked
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in probe.backbone.parameters())
    assert not torch.equal(head_before, probe.head.weight)
    assert summary["train_data_path"] == "in_memory" and summary["steps_per_epoch"] == 3
    assert summary["backbone_mode"] == "eval"
    assert (tmp_path / "head.pt").is_file()
    recs = _metrics(tmp_path)
    assert [r["step"] for r in recs] == [3, 6]


def test_head_trains_through_the_engine_step_on_the_engine_schedule(
    stl_root, student_ckpt, tmp_path, monkeypatch
):
    """Every optimizer step of the probe is a call of the engine's TrainStep, and the lr it
    runs with at each step is the engine schedule's (protocol rule: x gamma per milestone)."""
    from relkd.engine.step import TrainStep

    seen: list[tuple[float, int]] = []
    real = TrainStep.__call__

    def spy(self, x, y, extras=None):
        seen.append((self.optimizer.param_groups[0]["lr"], x.shape[1]))
        return real(self, x, y, extras)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    train, test, _ = build_datasets("stl10", stl_root, image_size=32)
    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=10)
    fit_probe(
        probe, train, test, run_dir=tmp_path, epochs=4, lr=0.2, milestones=(1, 3), gamma=0.5,
        batch_size=32, max_steps_per_epoch=2, quiet=True,
    )  # fmt: skip
    want = [head_schedule(0.2, 2, 4, (1, 3), 0.5).lr(s) for s in range(8)]
    assert want == [0.2] * 2 + [0.1] * 4 + [0.05] * 2
    assert [lr for lr, _ in seen] == want
    assert all(d == 64 for _, d in seen)  # the step trains the head on [B, 64] features
    assert [r["lr"] for r in _metrics(tmp_path)] == [0.2, 0.1, 0.1, 0.05]


def test_head_training_equals_plain_sgd_on_cross_entropy(stl_root, student_ckpt, tmp_path):
    """The engine's step on the head is exactly the protocol's loop: per batch CE(head(f), y),
    zero_grad, backward, SGD step; lr from torch's MultiStepLR stepped per epoch (an
    independent reference, written out here); shuffle order from (seed, epoch)."""
    import copy

    import torch.nn.functional as F

    from relkd.probe import eval_loader, extract_features

    train, test, _ = build_datasets("stl10", stl_root, image_size=32, augment=False)
    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=10)
    ref = copy.deepcopy(probe.head)
    fit_probe(
        probe, train, test, run_dir=tmp_path, epochs=3, lr=0.2, milestones=(2,), batch_size=48,
        augment=False, seed=5, quiet=True,
    )  # fmt: skip
    loader = eval_loader(train, batch_size=256, device=torch.device("cpu"), num_workers=0,
                          in_memory="auto")  # fmt: skip
    feats, y = extract_features(probe, loader, torch.device("cpu"))
    opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)
    for epoch in range(3):
        order = torch.randperm(
            len(y), generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)
        )
        for idx in order.split(48):  # 160 = 3 x 48 + 16: a short last batch
            loss = F.cross_entropy(ref(feats[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    assert torch.equal(ref.weight, probe.head.weight) and torch.equal(ref.bias, probe.head.bias)


def test_non_finite_head_loss_stops_naming_the_step(stl_root, student_ckpt, tmp_path):
    train, test, _ = build_datasets("stl10", stl_root, image_size=32)
    probe = build_probe("resnet8", student_ckpt, num_source_classes=100, num_classes=10)
    with pytest.raises(RelkdError, match=r"non-finite loss at epoch 1 step \d+ .*ce="):
        fit_probe(
            probe, train, test, run_dir=tmp_path, epochs=1, lr=1e35, milestones=(),
            batch_size=32, augment=False, quiet=True,
        )  # fmt: skip
    assert _metrics(tmp_path) == []  # no epoch of a diverged head is recorded


def test_feature_extraction_progress_bars_and_quiet(
    stl_root, student_ckpt, tmp_path, capsys, monkeypatch
):
    kw = dict(
        num_source_classes=100, epochs=1, max_steps_per_epoch=1, augment=False, device="cpu",
        out_dir=str(tmp_path), eval_batch_size=16,
    )  # fmt: skip
    monkeypatch.setenv("RELKD_PROGRESS", "bar")  # as on a terminal
    run_probe("resnet8", str(student_ckpt), "stl10", str(stl_root), name="loud", **kw)
    err = capsys.readouterr().err
    # tqdm bars over the test (100 images) and train (160) feature batches of 16
    assert re.search(r"test features: .*\d/7 \[", err), err
    assert re.search(r"train features \(no augment\): .*\d/10 \[", err), err
    # stderr is no terminal here: plain lines (every loop counts as long with MIN_S=0)
    monkeypatch.delenv("RELKD_PROGRESS")
    monkeypatch.setenv("RELKD_PROGRESS_MIN_S", "0")
    run_probe("resnet8", str(student_ckpt), "stl10", str(stl_root), name="lines", **kw)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.findall(r"^test features: (\d/7) \(\d+%\), [\d.]+ batch/s", err, re.M) == [
        "2/7", "4/7", "6/7"
    ]  # fmt: skip
    run_probe("resnet8", str(student_ckpt), "stl10", str(stl_root), name="q", quiet=True, **kw)
    assert capsys.readouterr().err == ""


def test_run_probe_stl10_run_folder(stl_root, student_ckpt, tmp_path):
    res = run_probe(
        "resnet8", str(student_ckpt), "stl10", str(stl_root), num_source_classes=100,
        epochs=2, batch_size=32, max_steps_per_epoch=2, device="cpu", out_dir=str(tmp_path),
        quiet=True,
    )  # fmt: skip
    run_dir = Path(res["run_dir"])
    assert run_dir == tmp_path / "stl10_resnet8_s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res))
    recs = _metrics(run_dir)
    assert [r["epoch"] for r in recs] == [1, 2]
    top1 = [r["top1"] for r in recs]
    assert summary["best_top1"] == max(top1) and summary["last_top1"] == top1[-1]
    assert summary["best_epoch"] == 1 + top1.index(max(top1))
    assert recs[-1]["best_top1"] == max(top1)
    assert summary["num_test"] == 100 and summary["num_train"] == 160
    meta = json.loads((run_dir / "probe.json").read_text())
    assert meta["protocol"] == PROTOCOL and "2407.12073" in meta["paper"]
    assert meta["options"]["epochs"] == 2 and meta["options"]["image_size"] == 32
    assert meta["backbone_mode"] == "eval" and BN_NOTE in meta["deviations"]
    assert meta["matches_protocol"] is False and summary["matches_protocol"] is False
    assert meta["target"]["image_size"] == 32 and meta["feature_dim"] == 64
    # A finished run is never overwritten silently.
    with pytest.raises(RelkdError, match="already holds"):
        run_probe(
            "resnet8", str(student_ckpt), "stl10", str(stl_root), num_source_classes=100,
            epochs=1, max_steps_per_epoch=1, device="cpu", out_dir=str(tmp_path), quiet=True,
        )  # fmt: skip


def test_separable_target_is_learned(stl_root, student_ckpt, tmp_path):
    """No-augment (cached features) on class-coloured images: far above chance (10%)."""
    res = run_probe(
        "resnet8", str(student_ckpt), "stl10", str(stl_root), num_source_classes=100,
        epochs=30, lr=0.5, milestones=(), augment=False, batch_size=32, device="cpu",
        out_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    assert res["train_data_path"] == "cached_features" and res["augment"] is False
    assert res["best_top1"] >= 60.0, res
    meta = json.loads((Path(res["run_dir"]) / "probe.json").read_text())
    assert NO_AUGMENT_NOTE in meta["deviations"]


def test_augmented_probe_learns_too(stl_root, student_ckpt, tmp_path):
    res = run_probe(
        "resnet8", str(student_ckpt), "stl10", str(stl_root), num_source_classes=100,
        epochs=6, lr=0.5, milestones=(), batch_size=32, device="cpu", out_dir=str(tmp_path),
        quiet=True,
    )  # fmt: skip
    assert res["augment"] is True and res["train_data_path"] == "in_memory"
    assert res["best_top1"] >= 40.0, res


# ---------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_materialised_equals_the_file_pipeline(tiny_root):
    train, _, info = build_datasets("tiny_imagenet", tiny_root, image_size=32)
    pipe = file_pipeline(train)
    assert pipe is not None
    assert (pipe["resize"], pipe["crop"], pipe["padding"], pipe["flip"]) == (32, 32, 4, True)
    assert pipe["mean"] == tuple(info.mean)
    x, y = materialize_file_split(train, pipe)
    assert x.dtype == torch.uint8 and x.shape == (18, 3, 32, 32)
    assert y.tolist() == train.targets.tolist()
    # Unaugmented: the materialised images, normalised, equal the per-sample transform exactly.
    plain, _, _ = build_datasets("tiny_imagenet", tiny_root, image_size=32, augment=False)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    ref = torch.stack([plain[i][0] for i in range(len(plain))])
    torch.testing.assert_close((x.float() / 255 - mean) / std, ref, rtol=0, atol=1e-6)
    # Pipelines we cannot reproduce on the device are not materialised.
    from relkd.data import FileImageDataset
    from relkd.data.transforms import imagenet_transforms

    rrc = FileImageDataset(train.samples, transform=imagenet_transforms(32)[0])
    assert file_pipeline(rrc) is None
    assert file_pipeline(plain) is not None  # Resize + ToTensor + Normalize
    assert file_pipeline(object()) is None  # not a FileImageDataset


@pytest.mark.parametrize("in_memory", ["auto", "false"])
def test_run_probe_tiny_imagenet(tiny_root, student_ckpt, tmp_path, in_memory):
    res = run_probe(
        "resnet8", str(student_ckpt), "tiny_imagenet", str(tiny_root), num_source_classes=100,
        epochs=2, batch_size=8, max_steps_per_epoch=2, device="cpu", out_dir=str(tmp_path),
        num_workers=0, in_memory=in_memory, quiet=True,
    )  # fmt: skip
    expected = "in_memory_decoded" if in_memory == "auto" else "dataloader"
    assert res["train_data_path"] == expected
    assert res["num_classes"] == 3 and res["num_test"] == 12 and res["num_train"] == 18
    recs = _metrics(Path(res["run_dir"]))
    assert res["last_top1"] == recs[-1]["top1"]
    assert res["best_top1"] == max(r["top1"] for r in recs)


# ---------------------------------------------------------------------------------- errors


def test_checkpoint_that_does_not_match_the_model(stl_root, student_ckpt, tmp_path):
    with pytest.raises(RelkdError, match=r"(?s)does not match.*num_source_classes=10"):
        run_probe(
            "resnet8", str(student_ckpt), "stl10", str(stl_root), num_source_classes=10,
            epochs=1, device="cpu", out_dir=str(tmp_path), quiet=True,
        )  # fmt: skip
    with pytest.raises(RelkdError, match="does not match"):
        run_probe(
            "resnet20", str(student_ckpt), "stl10", str(stl_root), num_source_classes=100,
            epochs=1, device="cpu", out_dir=str(tmp_path), quiet=True,
        )  # fmt: skip
    with pytest.raises(RelkdError, match="does not exist"):
        run_probe(
            "resnet8", str(tmp_path / "nope.pt"), "stl10", str(stl_root),
            num_source_classes=100, epochs=1, device="cpu", out_dir=str(tmp_path), quiet=True,
        )  # fmt: skip


def test_missing_data_root(student_ckpt, tmp_path):
    for data in ("stl10", "tiny_imagenet"):
        with pytest.raises(RelkdError, match="does not exist"):
            run_probe(
                "resnet8", str(student_ckpt), data, str(tmp_path / "missing"),
                num_source_classes=100, epochs=1, device="cpu", out_dir=str(tmp_path),
                quiet=True,
            )  # fmt: skip


def test_bad_options(student_ckpt, stl_root, tmp_path):
    kw = dict(num_source_classes=100, device="cpu", out_dir=str(tmp_path), quiet=True)
    with pytest.raises(RelkdError, match="epochs"):
        run_probe("resnet8", str(student_ckpt), "stl10", str(stl_root), epochs=0, **kw)
    with pytest.raises(RelkdError, match="milestones"):
        run_probe("resnet8", str(student_ckpt), "stl10", str(stl_root), milestones=[60, 30], **kw)


# -------------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relkd")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_probe_parser(sub)
    return p


def test_shipped_transfer_configs_are_the_protocol():
    for name, data in (("stl10", "stl10"), ("tiny_imagenet", "tiny_imagenet")):
        cfg = load_probe_config(REPO / "configs" / "transfer" / f"{name}.yaml")
        assert cfg["data"] == data and cfg["num_source_classes"] == 100
        for k, v in PROTOCOL.items():
            if k in cfg:
                assert cfg[k] == v, (name, k)
        assert "checkpoint" not in cfg  # given on the command line


def test_cli_config_then_flags(tmp_path, stl_root, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_student(create_model("cnn_tiny", 100, in_chans=3), ckpt)
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(
        "model: resnet8\nnum_source_classes: 100\ndata: stl10\nepochs: 120\nbatch_size: 64\n"
        f"root: {stl_root}\nmilestones: [30, 60, 90]\nseed: 3\n"
    )
    args = _parser().parse_args(
        ["probe", "--config", str(cfg), "--model", "cnn_tiny", "--checkpoint", str(ckpt),
         "--model-arg", "in_chans=3", "--epochs", "1", "--batch-size", "16",
         "--max-steps-per-epoch", "2", "--device", "cpu", "--out", str(tmp_path / "runs"),
         "--milestones", "1,2", "--quiet"]
    )  # fmt: skip
    opts = probe_options(args)
    assert opts["model_name"] == "cnn_tiny" and opts["model_kwargs"] == {"in_chans": 3}
    assert opts["epochs"] == 1 and opts["batch_size"] == 16 and opts["milestones"] == [1, 2]
    assert opts["seed"] == 3 and opts["root"] == str(stl_root) and opts["quiet"] is True
    assert "augment" not in opts and "lr" not in opts  # run_probe's protocol defaults apply
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "cnn_tiny" and out["epochs"] == 1
    assert Path(out["run_dir"]) == tmp_path / "runs" / "stl10_cnn_tiny_s3"
    assert out["feature_dim"] == 64  # cnn_tiny's last stage


def test_cli_flags_without_config_and_missing_required():
    args = _parser().parse_args(
        ["probe", "--model", "resnet8", "--checkpoint", "x.pt", "--data", "stl10",
         "--num-source-classes", "100", "--no-augment", "--image-size", "0"]
    )  # fmt: skip
    opts = probe_options(args)
    assert opts["augment"] is False and opts["image_size"] == 0 and opts["root"] is None
    with pytest.raises(RelkdError, match=r"--checkpoint.*--num-source-classes"):
        probe_options(_parser().parse_args(["probe", "--model", "resnet8", "--data", "stl10"]))


def test_bad_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: resnet8\nlearning_rate: 0.1\n")
    with pytest.raises(RelkdError, match="unknown key 'learning_rate'"):
        load_probe_config(cfg)
    cfg.write_text("epochs: many\n")
    with pytest.raises(RelkdError, match="epochs must be int"):
        load_probe_config(cfg)


def test_probe_config_reads_yes_and_on_as_config_files_do(tmp_path, capsys):
    """The probe's YAML has YAML 1.2's booleans, as config and suite files (relkd._yaml): ``on``
    for a boolean option is refused naming the value (it used to be read as true), ``name: no``
    is the folder name "no", true / false are booleans; ``--model-arg k=yes`` is the string."""
    from relkd.cli import main

    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: resnet8\nname: no\naugment: false\ndownload: true\n")
    assert load_probe_config(cfg) == {
        "model": "resnet8", "name": "no", "augment": False, "download": True,
    }  # fmt: skip
    cfg.write_text("model: resnet8\ncheckpoint: x.pt\ndata: stl10\nnum_source_classes: 100\n"
                   "augment: on\n")  # fmt: skip
    assert main(["probe", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"relkd: error: probe config {str(cfg)!r}: augment must be true or false, got 'on'\n"
    )
    args = _parser().parse_args(
        ["probe", "--model", "resnet8", "--checkpoint", "x.pt", "--data", "stl10",
         "--num-source-classes", "100", "--model-arg", "flag=yes", "--model-arg", "k=on",
         "--model-arg", "t=true", "--model-arg", "n=3"]
    )  # fmt: skip
    assert probe_options(args)["model_kwargs"] == {"flag": "yes", "k": "on", "t": True, "n": 3}


def test_probe_builds_the_model_with_in_chans_as_training_does(fmnist_root, tmp_path, capsys):
    """``relkd probe`` passes ``in_chans`` by training's rule (engine.build.model_kwargs): a grey
    factory without an ``in_chans`` parameter probes Fashion-MNIST from the CLI (the probe used
    to pass in_chans=1 and fail), a ``**kwargs`` factory gets the data's channels, and a zoo
    CNN (1 channel by default) gets 3 on RGB data without ``--model-arg``."""
    from relkd.cli import main
    from tests.foreign_resnet import grey_net, kwargs_net

    torch.manual_seed(0)
    grey = tmp_path / "grey.pt"
    save_student(grey_net(10), grey)
    code = main(["probe", "--model", "tests.foreign_resnet:grey_net", "--checkpoint", str(grey),
                 "--num-source-classes", "10", "--data", "fashion_mnist", "--root",
                 str(fmnist_root), "--image-size", "0", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--no-augment", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "probe")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["feature_dim"] == 4 and summary["num_classes"] == 10  # grey_net's 4 channels
    assert 0 <= summary["last_top1"] <= 100
    anyc = tmp_path / "anyc.pt"
    save_student(kwargs_net(num_classes=10, in_chans=1), anyc)
    probe = build_probe("tests.foreign_resnet:kwargs_net", anyc, num_source_classes=10,
                        num_classes=5, in_channels=1, image_size=8)  # fmt: skip
    assert probe.backbone[0].in_channels == 1 and probe(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    rgb = tmp_path / "rgb.pt"
    save_student(create_model("cnn_tiny", 10, in_chans=3), rgb)
    probe = build_probe("cnn_tiny", rgb, num_source_classes=10, num_classes=5, in_channels=3)
    assert probe.head.in_features == 64 and probe(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_linear_probe_wraps_any_module():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5))  # fmt: skip
    probe = LinearProbe(net, 8, 3)
    probe.train()
    before = _state(net)
    probe(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert probe.head.weight.grad is not None


# ----------------------------------------------------------------------- the model's own statistics
# Three builds of one network (same state dict): one declares ImageNet statistics (as a user's
# akamaster-style model does), one declares nothing and re-normalises the STL-10 inputs by hand
# (what relkd eval's rule does to the first), one declares nothing and sees the data's.


class _ByHand(ResNet):
    input_mean = input_std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from relkd.data.transforms import STL10_MEAN, STL10_STD
        from relkd.models.normalization import renormalize

        return super().forward(renormalize(x, STL10_MEAN, STL10_STD, AKAMASTER_MEAN, AKAMASTER_STD))


class _Plain(ResNet):
    input_mean = input_std = None


def declared_net(num_classes: int = 10) -> ResNet:
    return ResNet((1, 1, 1), num_classes)


def by_hand_net(num_classes: int = 10) -> ResNet:
    return _ByHand((1, 1, 1), num_classes)


def plain_net(num_classes: int = 10) -> ResNet:
    return _Plain((1, 1, 1), num_classes)


def test_probe_applies_the_models_declared_statistics_as_eval_does(stl_root, tmp_path, capsys):
    """``relkd probe`` of a model that declares its own mean / std: the backbone sees the STL-10
    images re-normalised to them (relkd eval's rule), so the probe trains exactly the head of
    the same network re-normalising by hand, and another head than with the data's statistics;
    probe.json says what the backbone saw."""
    from relkd.cli import main

    torch.manual_seed(0)
    net = declared_net(10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    ckpt = tmp_path / "net.pt"
    save_student(net, ckpt)
    common = ["--checkpoint", str(ckpt), "--num-source-classes", "10", "--data", "stl10",
              "--root", str(stl_root), "--epochs", "1", "--max-steps-per-epoch", "2",
              "--batch-size", "32", "--no-augment", "--device", "cpu", "--out",
              str(tmp_path / "probe")]  # fmt: skip
    runs = {}
    for name in ("declared_net", "by_hand_net", "plain_net"):
        code = main(["probe", "--model", f"tests.test_probe:{name}", *common, "--name", name])
        out, err = capsys.readouterr()
        assert code == 0, err
        runs[name] = Path(json.loads(out)["run_dir"])
    heads = {k: torch.load(v / "head.pt", weights_only=True) for k, v in runs.items()}
    heads = {k: v.get("model", v) if isinstance(v, dict) else v for k, v in heads.items()}
    for key in heads["declared_net"]:
        torch.testing.assert_close(heads["declared_net"][key], heads["by_hand_net"][key],
                                   rtol=0, atol=0)  # fmt: skip
    assert not torch.equal(heads["declared_net"]["weight"], heads["plain_net"]["weight"])
    seen = {
        k: json.loads((v / "probe.json").read_text())["backbone_input"] for k, v in runs.items()
    }
    assert seen["declared_net"] == (
        "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225) declared by the model, "
        "re-normalised from the data's"
    )
    assert seen["plain_net"].startswith("the data's mean (0.4467, 0.4398, 0.4066)")


def test_probe_of_a_relkd_checkpoint_uses_the_statistics_it_records(stl_root, tmp_path, capsys):
    """A checkpoint that records the statistics of the data it was trained on (relkd's
    student.pt): probed on STL-10, the backbone sees them (as relkd eval would), with a note."""
    from relkd.cli import main
    from relkd.data.transforms import CIFAR100_MEAN, CIFAR100_STD

    ckpt = tmp_path / "student.pt"
    meta = {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD), "image_size": 32,
            "in_chans": 3}  # fmt: skip
    save_student(plain_net(10), ckpt, metadata=meta)
    code = main(["probe", "--model", "tests.test_probe:plain_net", "--checkpoint", str(ckpt),
                 "--num-source-classes", "10", "--data", "stl10", "--root", str(stl_root),
                 "--epochs", "1", "--max-steps-per-epoch", "1", "--no-augment", "--device",
                 "cpu", "--out", str(tmp_path / "probe")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    probe = json.loads((Path(json.loads(out)["run_dir"]) / "probe.json").read_text())
    assert probe["backbone_input"] == (
        "mean (0.5071, 0.4867, 0.4408) std (0.2675, 0.2565, 0.2761) recorded with its "
        "checkpoint, re-normalised from the data's"
    )
    assert "relkd probe: note: model tests.test_probe:plain_net was trained on inputs " in err
