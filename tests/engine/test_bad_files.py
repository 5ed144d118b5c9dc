"""Run-folder files damaged or replaced from outside: every one ends in one line (exit 2) or the
documented recovery, never a traceback, a hang or an unbounded read."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

import relkd
from relkd.cli import main as cli_main
from relkd.engine.checkpoint import CKPT, MANIFEST, PREV


def _cfg(root: Path, out: Path, name: str = "r", epochs: int = 2, **over) -> dict:
    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
        "optim": {"lr": 0.02},
        "schedule": {"name": "constant"},
        "train": {"epochs": epochs, "progress": False, "tensorboard": False, "seed": 1},
        "output_dir": str(out),
        "name": name,
    }
    for dotted, value in over.items():
        sect, _, key = dotted.partition("__")
        if key:
            cfg.setdefault(sect, {})[key] = value
        else:
            cfg[sect] = value
    return cfg


@pytest.fixture(scope="module")
def finished(fmnist_root, tmp_path_factory) -> Path:
    """A finished 2-epoch run; tests copy it (never change it)."""
    out = tmp_path_factory.mktemp("finished")
    return Path(relkd.train(_cfg(fmnist_root, out), quiet=True)["run_dir"])


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out" / run.name
    shutil.copytree(run, dst)
    return dst


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(args)
    return code, err.getvalue()


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("relkd: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cfg_file(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))  # JSON is YAML
    return str(p)


# --- item 2: only regular files of a bounded size are read ------------------------------------
@pytest.mark.parametrize("target", ["dev_zero", "fifo", "folder"])
def test_resume_refuses_a_checkpoint_that_is_not_a_regular_file(
    finished, fmnist_root, tmp_path, target
):
    """checkpoint.pt -> /dev/zero grew --resume to 22 GB; a FIFO hung it. Both checkpoints
    replaced: one line naming the file, exit 2, at once."""
    run = _copy(finished, tmp_path)
    for name in (CKPT, PREV):
        (run / name).unlink()
        if target == "dev_zero":
            (run / name).symlink_to("/dev/zero")
        elif target == "fifo":
            os.mkfifo(run / name)
        else:
            (run / name).mkdir()
    cfg = _cfg(fmnist_root, run.parent, epochs=3)
    code, err = _cli(["train", _cfg_file(tmp_path, cfg), "--resume", "--allow-change", "train"])
    line = _one_line(err)
    assert code == 2 and CKPT in line and "not a regular file" in line, line


def test_resume_refuses_a_checkpoint_larger_than_its_bound(
    finished, fmnist_root, tmp_path, monkeypatch
):
    from relkd import _fs

    run = _copy(finished, tmp_path)
    monkeypatch.setitem(_fs.LIMITS, "checkpoint", 1000)  # a sparse 64 GiB file, scaled down
    cfg = _cfg(fmnist_root, run.parent, epochs=3)
    code, err = _cli(["train", _cfg_file(tmp_path, cfg), "--resume", "--allow-change", "train"])
    line = _one_line(err)
    assert code == 2 and "more than the 1000 bytes" in line, line


# --- item 9: an unreadable checkpoint manifest is a missing one ---------------------------------
@pytest.mark.parametrize("content", [b"\x00garbage", b"[]", b'{"files": 3}', b"{}"])
def test_a_damaged_checkpoint_manifest_loads_the_intact_checkpoints_unverified(
    finished, fmnist_root, tmp_path, capsys, content
):
    run = _copy(finished, tmp_path)
    (run / MANIFEST).write_bytes(content)
    capsys.readouterr()
    res = relkd.train(
        _cfg(fmnist_root, run.parent, epochs=3), resume=True, allow_change=["train.epochs"]
    )
    err = capsys.readouterr().err
    assert "cannot be read" in err and "unverified" in err and "corrupt" not in err, err
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]  # resumed after epoch 2, not restarted
    assert res["last_top1"] == recs[-1]["top1"]
