"""End-to-end training on a tiny Fashion-MNIST-format set: resume, user modules, run folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import relkd
from relkd.models import load_checkpoint
from relkd.registry import RelkdError


def _cfg(root: Path, out: Path, name: str, **train) -> dict:
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": None,
        "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "milestones": [1]},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 3, **train},
        "output_dir": str(out),
        "name": name,
    }


def _kd(cfg: dict, ckpt: Path) -> dict:
    cfg = dict(cfg)
    cfg["teacher"] = {"name": "cnn_small", "checkpoint": str(ckpt)}
    cfg["method"] = {"name": "kd"}
    return cfg


def _records(run_dir: str) -> list[dict]:
    recs = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("epoch_time_s")
    return recs


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir, "student.pt"), weights_only=True)["model"]


def test_train_writes_run_folder_and_learns(fmnist_root, tmp_path):
    res = relkd.train(_cfg(fmnist_root, tmp_path, "a"), quiet=True)
    run = Path(res["run_dir"])
    for f in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "student.pt", "summary.json"):
        assert (run / f).exists(), f
    assert (run / "student.safetensors").exists()
    recs = _records(res["run_dir"])
    assert [r["epoch"] for r in recs] == [1, 2]
    assert res["last_top1"] == recs[-1]["top1"]
    assert res["best_top1"] == max(r["top1"] for r in recs)
    assert res["best_top1"] > 30.0  # 10 classes: chance is 10 %; the bands are easy
    # lr rule: multistep at epoch 1 -> epoch 2 trains at 0.1 x lr
    assert recs[1]["lr"] == pytest.approx(0.005)


def test_resume_continues_exactly(fmnist_root, tiny_teacher_ckpt, tmp_path):
    full = relkd.train(_kd(_cfg(fmnist_root, tmp_path, "full"), tiny_teacher_ckpt), quiet=True)
    part_cfg = _kd(_cfg(fmnist_root, tmp_path, "part"), tiny_teacher_ckpt)
    relkd.train(part_cfg, overrides=["train.epochs=1"], quiet=True)
    resumed = relkd.train(part_cfg, resume=True, allow_change=["train.epochs"], quiet=True)
    assert _records(full["run_dir"]) == _records(resumed["run_dir"])
    wf, wr = _weights(full["run_dir"]), _weights(resumed["run_dir"])
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k


def test_existing_run_folder_is_never_overwritten(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path, "x", epochs=1)
    relkd.train(cfg, quiet=True)
    with pytest.raises(RelkdError, match="--resume"):
        relkd.train(cfg, quiet=True)


class MyTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


class MyStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.out = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).flatten(1))


def test_train_with_user_modules(fmnist_root, tmp_path):
    teacher, student = MyTeacher(), MyStudent()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = _cfg(fmnist_root, tmp_path, "user", epochs=1)
    cfg["method"] = {"name": "kd"}
    res = relkd.train(cfg, teacher=teacher, student=student, quiet=True)
    assert res["last_top1"] >= 0
    # the teacher is frozen: unchanged weights, no grads, eval mode
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the exported student loads strictly into a fresh instance of the user's class
    load_checkpoint(MyStudent(), Path(res["run_dir"]) / "student.pt", strict=True)


def test_method_needing_teacher_without_one_fails_early(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path, "noteacher")
    cfg["method"] = {"name": "kd"}
    with pytest.raises(RelkdError, match="needs a teacher"):
        relkd.train(cfg, quiet=True)


def test_class_count_mismatch_fails(fmnist_root, tmp_path):
    with pytest.raises(RelkdError, match="classes"):
        relkd.train(
            _cfg(fmnist_root, tmp_path, "m"),
            student=nn.Sequential(nn.Flatten(), nn.Linear(784, 7)),
            quiet=True,
        )


def test_model_that_cannot_take_the_data_fails_clearly(fmnist_root, tmp_path):
    with pytest.raises(RelkdError, match=r"\[2, 1, 28, 28\]"):
        relkd.train(_cfg(fmnist_root, tmp_path, "bad"), student=nn.Linear(784, 10), quiet=True)


def test_cli_user_error_exit_2_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student:\n  name: resnet8\ndata:\n  batch_sise: 3\n")
    p = subprocess.run(
        [sys.executable, "-m", "relkd", "train", str(cfg)], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert "batch_sise" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "relkd", "list", "methods"], capture_output=True, text=True
    )
    assert p.returncode == 0 and "kd" in p.stdout.split()


def test_cli_eval_reports_the_checkpoint_accuracy(fmnist_root, tiny_teacher_ckpt):
    p = subprocess.run(
        [
            sys.executable, "-m", "relkd", "eval", "--model", "cnn_small",
            "--checkpoint", str(tiny_teacher_ckpt), "--data", "fashion_mnist",
            "--root", str(fmnist_root), "--device", "cpu",
        ],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    # the teacher's own run recorded the same test accuracy in its summary
    summary = json.loads((Path(tiny_teacher_ckpt).parent / "summary.json").read_text())
    assert res["top1"] == pytest.approx(summary["last_top1"])
