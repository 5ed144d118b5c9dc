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
from relkd.engine.checkpoint import CKPT, PREV
from relkd.registry import RelkdError

MANIFEST = "checkpoint.json"  # the checksum manifest (relkd.engine.checkpoint.MANIFEST)
SRC = str(Path(relkd.__file__).resolve().parents[1])  # the relkd under test, for subprocesses


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
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=SRC)
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


# --- crash safety at every instruction ---------------------------------------------------------

# A driver run in a subprocess: for n earlier saves and every k, a forked child performs save
# n+1 and SIGKILLs itself right after its k-th file operation (open / write / fsync / close /
# rename / unlink, through os or io); the driver then loads what is left and reports it.
_KILL_DRIVER = r"""
import io, json, os, shutil, signal, sys
from pathlib import Path
import torch
from relkd.engine.checkpoint import load_latest, save_checkpoint

base = Path(sys.argv[1])
def state(e):
    return {"distiller": {"w": torch.full((4096,), float(e))}, "optimizer": {}, "scaler": {},
            "epoch": e, "step": 10 * e, "history": [{"epoch": i + 1} for i in range(e + 1)],
            "best": {"top1": float(e), "epoch": e}}
torch.save(state(0), io.BytesIO())  # warm up torch's lazy imports before counting operations
OPS = ("open", "write", "fsync", "close", "replace", "rename", "unlink")
results = []
for n in range(3):
    template = base / f"template{n}"
    template.mkdir()
    for e in range(n):
        save_checkpoint(template, state(e))
    for k in range(1, 200):
        d = base / f"n{n}_k{k}"
        shutil.copytree(template, d)
        pid = os.fork()
        if pid == 0:
            count = [0]
            def wrap(fn):
                def f(*a, **kw):
                    out = fn(*a, **kw)
                    count[0] += 1
                    if count[0] == k:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                return f
            for name in OPS:
                setattr(os, name, wrap(getattr(os, name)))
            import builtins
            builtins.open = io.open = wrap(io.open)
            save_checkpoint(d, state(n))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        msgs = []
        try:
            got = load_latest(d, log=msgs.append)
            got = None if got is None else got["epoch"]
            err = None
        except Exception as e:
            got, err = None, f"{type(e).__name__}: {e}"
        # the resumed run's next save, then the fallback must still work
        after = None
        if err is None:
            save_checkpoint(d, state(n + 1))
            (d / "checkpoint.pt").write_bytes(b"damaged")
            try:
                fb = load_latest(d, log=lambda m: None)
                after = None if fb is None else fb["epoch"]
            except Exception as e:
                after = f"{type(e).__name__}: {e}"
        results.append({"n": n, "k": k, "killed": killed, "loaded": got, "error": err,
                        "messages": msgs, "fallback_after_next_save": after})
        shutil.rmtree(d)
        if not killed:
            break
print(json.dumps(results))
"""


def test_a_kill_after_any_file_operation_of_a_save_leaves_a_resumable_checkpoint(tmp_path):
    """relkd 0.1: a kill between the two renames of the rotation (3rd save on) paired
    checkpoint.prev.pt with a stale .sha256 and resume failed with 'no readable checkpoint'."""
    env = _env()
    p = subprocess.run([sys.executable, "-c", _KILL_DRIVER, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for n in range(3):
        mine = [r for r in results if r["n"] == n]
        assert mine[-1]["killed"] is False  # the last k let the save finish
        assert len(mine) >= 8, mine  # every operation of the save was a kill point
        for r in mine:
            where = f"kill after operation {r['k']} of save {n + 1}"
            assert r["error"] is None, (where, r["error"])
            # the newest finished save, or the one being made if its rename happened
            assert r["loaded"] in ((None, 0) if n == 0 else (n - 1, n)), (where, r)
            assert not any("corrupt" in m or "cannot be read" in m for m in r["messages"]), (
                where,
                r["messages"],
            )
            # the run goes on: after its next save the fallback is the checkpoint it resumed
            # from (none when the first save was killed before its rename)
            fb = r["fallback_after_next_save"]
            if r["loaded"] is None:
                assert str(fb).startswith("RelkdError: no readable checkpoint"), (where, r)
            else:
                assert fb == r["loaded"], (where, r)


def test_after_a_fallback_the_next_save_keeps_the_good_checkpoint(fmnist_root, tmp_path):
    """relkd 0.1 rotated the known-corrupt checkpoint.pt over the good previous one."""
    run = _two_epochs(fmnist_root, tmp_path)
    ck = run / CKPT
    data = bytearray(ck.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    ck.write_bytes(bytes(data))
    res = relkd.train(_cfg(fmnist_root, tmp_path, "c", "ce", epochs=2), resume=True, quiet=True)
    assert res["last_top1"] >= 0
    prev = torch.load(run / PREV, weights_only=True)  # the good epoch-1 checkpoint, kept
    new = torch.load(run / CKPT, weights_only=True)
    assert (prev["epoch"], new["epoch"]) == (0, 1)
    listed = set(json.loads((run / MANIFEST).read_text())["files"])
    for name in (CKPT, PREV):
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() in listed, name


def test_a_checkpoint_without_checksum_is_reported_unverified(fmnist_root, tmp_path, capsys):
    run = _two_epochs(fmnist_root, tmp_path)
    for p in [run / MANIFEST, *run.glob("*.sha256")]:
        p.unlink(missing_ok=True)
    capsys.readouterr()
    relkd.train(_cfg(fmnist_root, tmp_path, "c", "ce", epochs=2), resume=True)
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "unverified" in err


_KILL_AT = r"""
import builtins, io, os, signal, sys
import torch
what, argv = sys.argv[1], sys.argv[2:]
if what == "checkpoint":  # SIGKILL inside the first checkpoint's serialisation
    saves, orig = [0], torch.save
    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and "optimizer" in obj:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(obj, f, *a, **kw)
    torch.save = save
else:  # SIGKILL right after a file whose name holds `what` is created
    def wrap(fn):
        def f(path, *a, **kw):
            out = fn(path, *a, **kw)
            if what in os.path.basename(str(path)):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return f
    os.open = wrap(os.open)
    builtins.open = io.open = wrap(io.open)
from relkd.cli import main
sys.exit(main(argv))
"""


def _run_killed(what: str, cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run([sys.executable, "-c", _KILL_AT, what, "train", str(cfg_path), *args],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_kill_before_the_first_checkpoint_never_duplicates_an_epoch(fmnist_root, tmp_path):
    """relkd 0.1: metrics.jsonl got epoch 1's line before the checkpoint; a kill in between
    and --resume left epoch 1 twice."""
    cfg_path = Path(_write(tmp_path, _cfg(fmnist_root, tmp_path / "o", "k", "ce", epochs=2)))
    p = _run_killed("checkpoint", cfg_path, "--quiet")
    assert p.returncode == -signal.SIGKILL, p.stderr
    run = tmp_path / "o" / "k"
    code, err = _cli(["train", str(cfg_path), "--resume", "--quiet"])
    assert code == 0, err
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_a_kill_while_writing_summary_json_never_leaves_it_empty(fmnist_root, tmp_path):
    """relkd 0.1: a kill during summary.json's write left it empty, and the grid runner then
    skipped that run forever."""
    cfg_path = Path(_write(tmp_path, _cfg(fmnist_root, tmp_path / "o", "s", "ce", epochs=1)))
    p = _run_killed("summary.json", cfg_path, "--quiet")
    assert p.returncode == -signal.SIGKILL, p.stderr
    run = tmp_path / "o" / "s"
    assert not (run / "summary.json").exists()  # unfinished, not finished-and-empty
    assert [p.name for p in run.iterdir() if ".tmp" in p.name]  # the killed write's temp file
    code, err = _cli(["train", str(cfg_path), "--resume", "--quiet"])
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["best_top1"] >= 0
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # cleaned up on open


def test_sigterm_ends_like_ctrl_c_with_a_usable_checkpoint(fmnist_root, tmp_path):
    """What Slurm and Kubernetes send: relkd 0.1 died at once (exit -15, no message)."""
    cfg = _cfg(fmnist_root, tmp_path / "o", "t", "ce", epochs=12, max_steps_per_epoch=1)
    cfg_path = _write(tmp_path, cfg)
    run = tmp_path / "o" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "relkd", "train", cfg_path, "--quiet"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    t_end = time.time() + 120
    while time.time() < t_end and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == "relkd: interrupted", err
    done = len(_records(run))
    assert 1 <= done < 12
    state = torch.load(run / CKPT, weights_only=True)
    assert state["epoch"] + 1 == done
    p = subprocess.run([sys.executable, "-m", "relkd", "train", cfg_path, "--resume", "--quiet"],
                       env=_env(), capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert [r["epoch"] for r in _records(run)] == list(range(1, 13))


def test_a_relkd_01_folder_killed_between_its_renames_resumes(fmnist_root, tmp_path, capsys):
    """relkd 0.1's layout (.sha256 sidecars, no run.json) killed between the two renames of a
    rotation: checkpoint.prev.pt holds the newest data beside a stale .sha256. The data is
    intact, so the resume must use it (relkd 0.1 said 'no readable checkpoint')."""
    run = _two_epochs(fmnist_root, tmp_path)
    (run / "run.json").unlink(missing_ok=True)
    (run / MANIFEST).unlink(missing_ok=True)
    sha = {n: hashlib.sha256((run / n).read_bytes()).hexdigest() for n in (CKPT, PREV)}
    (run / f"{CKPT}.sha256").write_text(sha[CKPT])
    (run / f"{PREV}.sha256").write_text(sha[PREV])  # about to be stale:
    os.replace(run / CKPT, run / PREV)  # the first rename happened, the sidecar's did not
    capsys.readouterr()
    relkd.train(_cfg(fmnist_root, tmp_path, "c", "ce", epochs=2), resume=True)
    err = capsys.readouterr().err
    assert "corrupt" not in err and "no readable" not in err and "unverified" not in err, err
    assert [r["epoch"] for r in _records(run)] == [1, 2]
    assert "using checkpoint.prev.pt" in err and "resumed" in err and "after epoch 2" in err


@pytest.mark.parametrize(
    "method, finish_s, message",
    [
        ("ce", "0", "stopped in main epoch 1/2 at step 1/2"),
        ("ce", "1e9", "stopped after main epoch 1/2 (checkpoint written)"),
        ("fitnet", "0", "stopped in init epoch 1/1 at step 1/2"),
        ("fitnet", "1e9", "stopped after init epoch 1/1 (checkpoint written)"),
    ],
)
def test_a_preemption_names_the_epoch_as_the_progress_lines_do(
    fmnist_root, tiny_teacher_ckpt, tmp_path, monkeypatch, capsys, method, finish_s, message
):
    """A stop request names where the run stopped the way the epoch lines do ("main epoch 1/2",
    a pre-training phase as "init epoch 1/1"), not by the internal "epoch slot" count that
    includes pre-training epochs. With RELKD_PREEMPT_FINISH_S 0 the run stops after the first
    step; with a large window it finishes the epoch and its checkpoint first."""
    from relkd.engine import preempt

    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 64},
        "train": {"epochs": 2 if method == "ce" else 1, "progress": False,
                  "tensorboard": False, "max_steps_per_epoch": 2},
        "output_dir": str(tmp_path),
        "name": "stop",
    }  # fmt: skip
    if method == "fitnet":
        cfg["teacher"] = {"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)}
        cfg["method"]["args"] = {"init_epochs": 1}
    monkeypatch.setenv("RELKD_PREEMPT_FINISH_S", finish_s)
    preempt.request()
    try:
        with pytest.raises(preempt.Preempted) as stop:
            relkd.train(cfg)
    finally:
        preempt.clear()
    assert str(stop.value) == message
    if finish_s != "0":  # the epoch line printed just before names the same epoch
        assert f"\n{message.split('after ')[1].split(' (')[0]} loss " in capsys.readouterr().err
