"""Mixed precision and torch.compile on CPU: finite, learning, and compile == eager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import relkd


def _cfg(root, out, name, ckpt, **train):
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(ckpt)},
        "method": {"name": "kd"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "progress": False, "tensorboard": False, "seed": 2, **train},
        "output_dir": str(out),
        "name": name,
    }


def _records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_finite_and_learns(precision, fmnist_root, tiny_teacher_ckpt, tmp_path):
    res = relkd.train(
        _cfg(fmnist_root, tmp_path, precision, tiny_teacher_ckpt, precision=precision), quiet=True
    )
    recs = _records(res["run_dir"])
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in recs)
    assert recs[-1]["train/loss"] < recs[0]["train/loss"]  # it learns
    assert res["best_top1"] > 20.0  # 10 classes: chance is 10 %
    w = torch.load(Path(res["run_dir"]) / "student.pt", weights_only=True)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in w.values())  # fp32 master weights


def test_compile_gives_the_eager_losses(fmnist_root, tiny_teacher_ckpt, tmp_path):
    kw = {"epochs": 1, "max_steps_per_epoch": 3}
    eager = relkd.train(_cfg(fmnist_root, tmp_path, "eager", tiny_teacher_ckpt, **kw), quiet=True)
    comp = relkd.train(
        _cfg(fmnist_root, tmp_path, "compiled", tiny_teacher_ckpt, compile=True, **kw), quiet=True
    )
    a, b = _records(eager["run_dir"])[0], _records(comp["run_dir"])[0]
    # inductor fuses and reorders fp32 arithmetic: equal up to rounding, not bit for bit
    assert b["train/kd"] == pytest.approx(a["train/kd"], rel=1e-4)
    assert b["train/ce"] == pytest.approx(a["train/ce"], rel=1e-4)
    assert b["top1"] == pytest.approx(a["top1"], abs=1.0)


def test_compile_mode_reaches_torch_compile(fmnist_root, tiny_teacher_ckpt, tmp_path, monkeypatch):
    """``train.compile_mode`` is passed to ``torch.compile`` (reduce-overhead = CUDA graphs on a
    GPU); the compiled callable is the one the step runs."""
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)

        def run(*a, **k):
            seen.append("called")
            return model(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    kw = {"epochs": 1, "max_steps_per_epoch": 2, "compile": True, "compile_mode": "reduce-overhead"}
    relkd.train(_cfg(fmnist_root, tmp_path, "ro", tiny_teacher_ckpt, **kw), quiet=True)
    assert seen == ["reduce-overhead", "called", "called"]
