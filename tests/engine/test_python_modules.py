"""Models passed from Python to relkd.train: recorded on disk, the teacher's top-1 measured."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import relkd
from relkd.bench.report import write_report
from relkd.data import build_datasets


class MyTeacher(nn.Module):
    """A user's own teacher: not a registered model, no relkd config entry."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class MyStudent(MyTeacher):
    pass


def _cfg(fmnist_root: Path, out: Path, **extra) -> dict:
    cfg = {
        "method": {"name": "kd"},
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
        "train": {"epochs": 1, "progress": False, "tensorboard": False},
        "schedule": {"name": "constant"},
        "output_dir": str(out),
        "name": "py",
    }
    cfg.update(extra)
    return cfg


def _reference_top1(model: nn.Module, fmnist_root: Path) -> float:
    """Top-1 (%) of ``model`` on the test split, by a plain loop of our own."""
    _, test_ds, _ = build_datasets("fashion_mnist", str(fmnist_root))
    model.eval()
    hits = n = 0
    with torch.no_grad():
        for batch in DataLoader(test_ds, batch_size=50):
            x, y = batch[0], batch[1]
            hits += int((model(x).argmax(1) == y).sum())
            n += len(y)
    return 100.0 * hits / n


def test_python_teacher_is_measured_and_recorded(fmnist_root, tmp_path):
    torch.manual_seed(0)
    teacher, student = MyTeacher(), MyStudent()
    # Train the teacher a little so its top-1 is not the chance level a bug would also give.
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    train_ds, _, _ = build_datasets("fashion_mnist", str(fmnist_root), augment=False)
    for batch in DataLoader(train_ds, batch_size=32, shuffle=True):
        loss = nn.functional.cross_entropy(teacher(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = _reference_top1(teacher, fmnist_root)

    # No student.name in the config: the modules are recorded by their import paths (their
    # classes rebuild them), so config.yaml names what the run used.
    res = relkd.train(_cfg(fmnist_root, tmp_path), teacher=teacher, student=student, quiet=True)
    assert abs(res["teacher_top1"] - want) < 1e-9
    here = "tests.engine.test_python_modules"
    assert res["student"] == f"{here}:MyStudent" and res["teacher"] == f"{here}:MyTeacher"
    run = Path(res["run_dir"])
    given = json.loads((run / "run.json").read_text())["sessions"][-1]["modules_from_python"]
    assert given["teacher"]["class"].endswith("test_python_modules.MyTeacher")
    assert given["teacher"]["parameters"] == sum(p.numel() for p in teacher.parameters())
    assert given["student"]["class"].endswith("MyStudent")

    # The report shows that number beside the student's, labelled with the module's class.
    md = write_report(tmp_path, tmp_path / "rep").read_text()
    assert f"## {here}:MyTeacher → {here}:MyStudent (Fashion-MNIST)" in md
    assert f"Teacher {here}:MyTeacher: {want:.2f} (recorded by the run)" in md


def test_a_finished_run_resumed_says_it_is_complete(fmnist_root, tmp_path, capsys):
    cfg = _cfg(fmnist_root, tmp_path, method={"name": "ce"}, student={"name": "cnn_tiny"})
    first = relkd.train(cfg)
    again = relkd.train(cfg, resume=True)
    out = capsys.readouterr()
    assert "is already complete (1 epoch): nothing to train" in out.out + out.err
    assert (
        again["best_top1"] == first["best_top1"] and again["train_time_s"] == first["train_time_s"]
    )
