"""Crash safety, checkpoint corruption, non-finite losses and bad input (issue: reliability)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import relkd
from relkd.cli import main as cli_main
from relkd.engine.checkpoint import CKPT, MANIFEST, PREV
from relkd.registry import RelkdError


def _cfg(root: Path, out: Path, name: str, method: str = "kd", ckpt: Path | None = None, **train):
    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 8},
        "optim": {"lr": 0.02},
        "schedule": {"name": "multistep", "milestones": [2]},
        "train": {"epochs": 3, "progress": False, "tensorboard": False, "seed": 1, **train},
        "output_dir": str(out),
        "name": name,
    }
    if ckpt is not None:
        cfg["teacher"] = {"name": "cnn_small", "checkpoint": str(ckpt)}
    return cfg


def _records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("epoch_time_s")
    return recs


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)["model"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# --- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_sigkill_in_epoch_2_then_resume_is_bit_identical(
    method, fmnist_root, tiny_teacher_ckpt, tmp_path
):
    """Train in a subprocess, SIGKILL it at a random point of epoch 2, resume with --resume:
    weights and metrics equal an uninterrupted run bit for bit (CPU, one thread)."""
    rng = random.Random(method)
    cfg_path = tmp_path / "cfg.yaml"
    cfg = _cfg(fmnist_root, tmp_path / "runs", "killed", method, tiny_teacher_ckpt)
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "relkd", "train", str(cfg_path), "--quiet"]
    killed_in_epoch_2 = False
    for _attempt in range(4):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.time() + 120
        while time.time() < t_end and proc.poll() is None:  # wait for epoch 1 to finish
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        epoch_s = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch_time_s"]
        time.sleep(rng.uniform(0.05, 0.6) * epoch_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if len((run / "metrics.jsonl").read_text().splitlines()) == 1:
            killed_in_epoch_2 = True
            break
        # epoch 2 finished before the kill landed: start over
        for f in run.iterdir():
            if f.is_file():
                f.unlink()
    assert killed_in_epoch_2
    assert not (run / "summary.json").exists()
    p = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    full = relkd.train(
        _cfg(fmnist_root, tmp_path / "runs", "full", method, tiny_teacher_ckpt), quiet=True
    )
    assert _records(run) == _records(Path(full["run_dir"]))
    a, b = _weights(run), _weights(Path(full["run_dir"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _two_epochs(fmnist_root, tmp_path, name="c") -> Path:
    res = relkd.train(_cfg(fmnist_root, tmp_path, name, "ce", epochs=2), quiet=True)
    return Path(res["run_dir"])


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(damage, fmnist_root, tmp_path, capsys):
    run = _two_epochs(fmnist_root, tmp_path)
    ck = run / CKPT
    data = ck.read_bytes()
    if damage == "truncate":
        ck.write_bytes(data[: len(data) // 3])
    else:
        mid = len(data) // 2
        ck.write_bytes(
            data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
        )
    res = relkd.train(
        _cfg(fmnist_root, tmp_path, "c", "ce", epochs=3), resume=True, allow_change=["train"]
    )
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and ("corrupt" in err or "cannot be read" in err)
    assert "previous checkpoint" in err
    # resumed from epoch 1's checkpoint: epochs 2 and 3 were (re)done, history is consistent
    recs = _records(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert res["last_top1"] == recs[-1]["top1"]


def test_both_checkpoints_damaged_is_a_clear_error(fmnist_root, tmp_path):
    run = _two_epochs(fmnist_root, tmp_path)
    for name in (CKPT, PREV):
        (run / name).write_bytes(b"not a checkpoint")
    with pytest.raises(RelkdError, match="no readable checkpoint"):
        relkd.train(_cfg(fmnist_root, tmp_path, "c", "ce", epochs=2), resume=True, quiet=True)


def test_checkpoint_files_rotate_and_verify(fmnist_root, tmp_path):
    run = _two_epochs(fmnist_root, tmp_path)
    listed = set(json.loads((run / MANIFEST).read_text())["files"])
    present = {hashlib.sha256((run / name).read_bytes()).hexdigest() for name in (CKPT, PREV)}
    assert listed == present and len(present) == 2  # the manifest lists exactly these two
    new = torch.load(run / CKPT, weights_only=True)
    old = torch.load(run / PREV, weights_only=True)
    assert (new["epoch"], old["epoch"]) == (1, 0)
    assert not list(run.glob("*.tmp*"))  # no temp files left behind


# --- non-finite losses -------------------------------------------------------------------------


class _Boom(nn.Module):
    """A student whose logits turn into NaN from the 3rd forward pass in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= 3:
                out = out * float("nan")
        return out


def test_nonfinite_loss_stops_with_step_method_and_terms(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path, "nan", "ce", epochs=1)
    with pytest.raises(RelkdError) as e:
        relkd.train(cfg, student=_Boom(), quiet=True)
    msg = str(e.value)
    assert "non-finite loss" in msg and "step 2" in msg and "'ce'" in msg and "ce=nan" in msg


def test_nonfinite_loss_skip_counts_skips(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path, "nan", "ce", epochs=1, on_nonfinite="skip")
    student = _Boom()
    relkd.train(cfg, student=student, quiet=True)
    rec = _records(tmp_path / "nan")[0]
    steps = rec["step"]
    assert rec["skipped_steps"] == steps - 2  # every step from the 3rd on was skipped
    assert all(torch.isfinite(p).all() for p in student.parameters())  # never trained on NaN


# --- bad input ---------------------------------------------------------------------------------


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(args)
    return code, err.getvalue()


def _write(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / f"c{random.randrange(10**9)}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_bad_inputs_exit_2_with_one_clear_line(fmnist_root, tiny_teacher_ckpt, tmp_path):
    base = _cfg(fmnist_root, tmp_path / "o", "x", "ce", epochs=1)
    cases: list[tuple[dict, list[str], str]] = [
        (base, ["optim.lr=0"], "optim.lr"),
        (base, ["train.epochs=-3"], "train.epochs"),
        (base, ["data.batch_size=0"], "data.batch_size"),
        (base, ["method.name=kd"], "needs a teacher"),
        (base, ["method.name=kdd"], "'kdd'"),
        (base, ["student.name=resnet2O"], "resnet20"),
        (base, ["data.name=cifar1000"], "cifar100"),
        (base, [f"data.root={tmp_path / 'nowhere'}"], "nowhere"),
        (
            base,
            [
                "method.args.temprature=2",
                "method.name=kd",
                "teacher.name=cnn_small",
                f"teacher.checkpoint={tiny_teacher_ckpt}",
            ],
            "temprature",
        ),
        (
            base,
            [f"output_dir={Path(__file__)}/sub"],  # a folder inside a file cannot exist
            "cannot write",
        ),
        (
            base,
            [
                "teacher.name=cnn_small",
                f"teacher.checkpoint={tmp_path / 'missing.pt'}",
                "method.name=kd",
            ],
            "missing.pt",
        ),
        (base, ["teacher.name=cnn_small", "method.name=kd"], "teacher.checkpoint"),
        (
            base,
            [
                "method.name=at",
                "method.args.stages=[7]",
                "teacher.name=cnn_small",
                f"teacher.checkpoint={tiny_teacher_ckpt}",
            ],
            "7",
        ),
    ]
    for cfg, overrides, needle in cases:
        code, err = _cli(["train", _write(tmp_path, cfg), *overrides])
        assert code == 2, (overrides, err)
        assert needle in err, (overrides, err)
        assert "Traceback" not in err and err.count("\n") == 1, err


def test_teacher_with_other_class_count_fails_before_training(fmnist_root, tmp_path):
    ckpt = tmp_path / "t100.pt"
    relkd.models.save_student(relkd.create_model("cnn_small", 100, in_chans=1), ckpt)
    cfg = _cfg(fmnist_root, tmp_path, "cc", "kd", ckpt)
    with pytest.raises(RelkdError, match="does not match"):
        relkd.train(cfg, quiet=True)
    # and a user module with the wrong class count
    cfg = _cfg(fmnist_root, tmp_path, "cc2", "kd")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 100))
    with pytest.raises(RelkdError, match="teacher predicts 100 classes"):
        relkd.train(cfg, teacher=teacher, quiet=True)


def test_tap_that_does_not_exist(fmnist_root, tmp_path):
    class NoStages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

        def forward(self, x):
            return self.fc(x)

    cfg = _cfg(fmnist_root, tmp_path, "tap", "at")
    with pytest.raises(RelkdError, match="stage"):
        relkd.train(cfg, teacher=NoStages(), student=NoStages(), quiet=True)
    with pytest.raises(RelkdError, match="layer9"):
        relkd.FeatureTap(NoStages(), ["layer9"])
