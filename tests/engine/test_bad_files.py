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
import torch

import relkd
from relkd.cli import main as cli_main
from relkd.engine.checkpoint import CKPT, MANIFEST, PREV
from relkd.registry import RelkdError


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
def _replace(path: Path, target: str) -> None:
    if target == "dev_zero":
        path.symlink_to("/dev/zero")
    elif target == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


@pytest.mark.parametrize("target", ["dev_zero", "fifo", "folder"])
def test_eval_refuses_weights_that_are_not_a_regular_file(finished, tmp_path, target):
    weights = tmp_path / "w.pt"
    _replace(weights, target)
    code, err = _cli(["eval", str(finished), "--checkpoint", str(weights)])
    line = _one_line(err)
    assert code == 2 and "w.pt" in line and "not a regular file" in line, line


@pytest.mark.parametrize("target", ["dev_zero", "fifo", "folder"])
def test_resume_refuses_a_checkpoint_that_is_not_a_regular_file(
    finished, fmnist_root, tmp_path, target
):
    """checkpoint.pt -> /dev/zero grew --resume to 22 GB; a FIFO hung it: one line naming the
    file, exit 2, at once."""
    run = _copy(finished, tmp_path)
    (run / CKPT).unlink()
    _replace(run / CKPT, target)
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


# --- item 3: a finished run pruned to its exported student is still a run ----------------------
def test_a_pruned_finished_run_is_refused_not_overwritten(finished, fmnist_root, tmp_path):
    """config.yaml, run.json and student.pt kept; checkpoints, metrics, summary deleted. The next
    run of that name (even of another model) used to overwrite it, provenance included."""
    run = _copy(finished, tmp_path)
    for name in (CKPT, PREV, MANIFEST, "metrics.jsonl", "summary.json", "student_best.pt"):
        (run / name).unlink(missing_ok=True)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {"config.yaml", "run.json", "student.pt"} <= set(before)
    other = _cfg(fmnist_root, run.parent, epochs=1)
    other["student"] = {"name": "cnn_small"}
    code, err = _cli(["train", _cfg_file(tmp_path, other)])
    line = _one_line(err)
    assert code == 2 and "already holds a run" in line, line
    code, err = _cli(["train", _cfg_file(tmp_path, other), "--resume"])
    line = _one_line(err)
    assert code == 2 and "student.pt" in line and "no checkpoint" in line, line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# --- item 7: a folder named checkpoint.pt is refused before training ---------------------------
@pytest.mark.parametrize("name", [CKPT, "metrics.jsonl", "summary.json"])
def test_a_folder_under_a_run_file_name_is_refused_before_training(fmnist_root, tmp_path, name):
    run = tmp_path / "out" / "r"
    (run / name).mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"relkd_run": 1}))
    code, err = _cli(["train", _cfg_file(tmp_path, _cfg(fmnist_root, run.parent, epochs=1))])
    line = _one_line(err)
    assert code == 2 and f"{name} is not a regular file (a folder)" in line, line
    assert sorted(p.name for p in run.iterdir()) == sorted([name, "run.json"])  # nothing trained


# --- item 12: the resume line names the epoch the next line prints -----------------------------
def test_the_resume_line_and_the_next_epoch_line_agree(finished, fmnist_root, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    capsys.readouterr()
    relkd.train(_cfg(fmnist_root, run.parent, epochs=3), resume=True, allow_change=["train"])
    err = capsys.readouterr().err
    assert "after epoch 2 (next: epoch 3)" in err, err
    assert "epoch 3/3" in err, err


def test_git_status_takes_no_optional_lock(tmp_path, monkeypatch):
    """`git status` refreshes the index under .git/index.lock unless told not to; a concurrent
    `git commit` in the checkout then fails. A stand-in git records what relkd runs."""
    from relkd.engine import rundir

    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    top = Path(rundir.__file__).resolve().parents[2]
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'case "$*" in *rev-parse*) echo {top}; echo 0123abc;; esac\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert rundir._git_commit() == "0123abc"
    status = [c for c in log.read_text().splitlines() if "status" in c]
    assert status and all(c.startswith("--no-optional-locks ") for c in status), status


# --- item 6: a full disk during training --------------------------------------------------------
@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_a_full_or_read_only_disk_during_training_is_one_line_and_resumable(
    fmnist_root, tmp_path, monkeypatch, err
):
    import errno

    from relkd.engine import checkpoint

    real = checkpoint.write_fsync
    calls = []

    def full_on_second_save(path, data):
        if Path(path).name.startswith(f".{CKPT}."):
            calls.append(path)
        if len(calls) == 2 and calls[-1] == path:  # epoch 2's checkpoint
            raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_fsync", full_on_second_save)
    cfg = _cfg(fmnist_root, tmp_path / "out", epochs=2)
    code, err_text = _cli(["train", _cfg_file(tmp_path, cfg)])
    line = _one_line(err_text)
    assert code == 2 and os.strerror(getattr(errno, err)) in line and "checkpoint.pt" in line
    monkeypatch.setattr(checkpoint, "write_fsync", real)  # space freed: resume from epoch 1
    res = relkd.train(cfg, resume=True, quiet=True)
    recs = [
        json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in recs] == [1, 2]


def test_identical_runs_write_identical_safetensors_bytes(fmnist_root, tmp_path):
    """safetensors wrote its metadata from a hash map: the key order (and the bytes) changed
    from process to process. Now sorted; the file still loads with its metadata."""
    import torch
    from safetensors import safe_open

    from relkd.models import create_model
    from relkd.models.checkpoint import save_student

    meta = json.loads(json.dumps({"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1}))
    meta |= {"mean": [0.5], "std": [0.25], "image_size": 28, "data": "fashion_mnist"}
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 10, in_chans=1)
    blobs = set()
    for i in range(6):  # each save: a fresh hash map, a fresh order before the fix
        save_student(model, tmp_path / f"s{i}.safetensors", metadata=meta)
        blobs.add((tmp_path / f"s{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    with safe_open(str(tmp_path / "s0.safetensors"), "pt") as f:
        got = f.metadata()
    assert got == {"format": "pt", **{k: json.dumps(v) for k, v in meta.items()}}
    runs = [
        Path(relkd.train(_cfg(fmnist_root, tmp_path / f"o{i}", epochs=1), quiet=True)["run_dir"])
        for i in range(2)
    ]  # two identical runs, end to end
    for name in ("student.pt", "student.safetensors"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    raw = (tmp_path / "s0.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(got)


def test_a_non_finite_test_loss_is_written_as_json_null(finished, tmp_path):
    """`"test_loss": NaN` is not JSON; relkd eval of NaN weights prints strict JSON."""
    import torch

    run = _copy(finished, tmp_path)
    sd = torch.load(run / "student.pt", weights_only=True)
    sd["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                   for k, v in sd["model"].items()}  # fmt: skip
    torch.save(sd, run / "student.pt")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli_main(["eval", str(run), "--no-progress"]) == 0

    def refuse(c):
        raise AssertionError(f"not JSON: {c}")

    res = json.loads(out.getvalue(), parse_constant=refuse)
    assert res["test_loss"] is None and 0 <= res["top1"] <= 100
    from relkd.engine.logger import RunLogger

    (tmp_path / "log").mkdir()
    log = RunLogger(tmp_path / "log", tensorboard=False, quiet=True)
    log.metrics({"epoch": 1, "test_loss": float("nan"), "top1": 10.0, "x": [float("inf")]})
    line = (tmp_path / "log" / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {
        "epoch": 1, "test_loss": None, "top1": 10.0, "x": [None]
    }  # fmt: skip


@pytest.mark.parametrize("device", ["gpu:7", "cuda"])
def test_eval_device_errors_name_the_eval_option(finished, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, err = _cli(["eval", str(finished), "--device", device])
    line = _one_line(err)
    assert code == 2 and f"--device={device!r}" in line and "train.device" not in line, line


def test_weights_without_a_state_dict_name_the_file(finished, tmp_path):
    import torch

    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3, "note": "no tensors here"}, junk)
    code, err = _cli(["eval", str(finished), "--checkpoint", str(junk)])
    line = _one_line(err)
    assert code == 2 and "holds no state dict" in line and str(junk) in line, line


# --- item 8: a non-finite buffer is a non-finite step ---------------------------------------------
class _OverflowsBuffer(torch.nn.Module):
    """A finite loss whose forward pass writes inf into a buffer on the batch marked bad (as a
    BatchNorm batch variance that overflows while the loss stays finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("running_var", torch.ones(3))

    def forward(self, x, y, t_out, **_):
        with torch.no_grad():  # y[0] == 1: a variance past float32's range
            big = torch.where(y[0] > 0, torch.tensor(3e38), torch.tensor(0.0))
            self.running_var.mul_(0.9).add_(0.1 * x.var(0)).add_(big).add_(big)
        return None, {"ce": ((x @ self.w) ** 2).mean()}


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_step_that_makes_a_buffer_non_finite_is_treated_like_a_non_finite_loss(mode):
    from relkd.engine.step import TrainStep

    torch.manual_seed(0)
    net = _OverflowsBuffer()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    step = TrainStep(net, opt, on_nonfinite=mode)
    x = torch.randn(4, 3)
    ok, bad = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    step(x, ok)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss = step(x, bad)  # finite loss, running_var -> inf
    assert torch.isfinite(loss)
    if mode == "stop":
        with pytest.raises(RelkdError, match=r"non-finite BatchNorm statistics .* step 1 "):
            step.read()
        return
    for k, v in net.state_dict().items():  # exactly as before the batch
        assert torch.equal(v, before[k]), k
    step(x, ok)
    stats = step.read()
    assert (stats.steps, stats.skipped) == (2, 1)
    assert torch.isfinite(net.running_var).all()


def test_a_diverging_run_with_skip_keeps_finite_statistics(fmnist_root, tmp_path):
    """optim.lr=1e10 with on_nonfinite=skip: the loss stayed finite while a batch variance
    overflowed; running_var became inf and the run exited 0 with inf in student.pt."""
    cfg = _cfg(fmnist_root, tmp_path, epochs=1)
    cfg["optim"]["lr"] = 1e10
    cfg["train"].update(on_nonfinite="skip", log_every=1)
    res = relkd.train(cfg, quiet=True)
    sd = torch.load(Path(res["run_dir"]) / "student.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    rec = json.loads((Path(res["run_dir"]) / "metrics.jsonl").read_text())
    assert rec["skipped_steps"] >= 1
