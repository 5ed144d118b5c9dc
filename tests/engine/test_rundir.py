"""The run folder describes exactly the run that happened (issue 14, section 1).

Each test reproduces an attack that succeeded on relkd 0.1 (silent config change on resume,
writes before the build-time checks, shared default names, names escaping ``output_dir``,
writes into a user's folder, silent restart without a checkpoint, two processes on one folder,
missing provenance and safetensors metadata) at the level a user meets it: ``relkd train``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import relkd
from relkd.cli import main as cli_main
from relkd.config import load_config
from relkd.engine.checkpoint import CKPT, PREV
from relkd.registry import RelkdError

# relkd.engine.rundir (new) is imported inside the tests that need it, so that the CLI-level
# tests run, and fail for their own reason, against relkd 0.1 too.

REPO = Path(__file__).resolve().parents[2]


def _cfg(root: Path, out: Path, name: str | None = "r", method: str = "ce", **train) -> dict:
    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": method},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 64},
        "optim": {"lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "progress": False, "tensorboard": False, "seed": 0, **train},
        "output_dir": str(out),
        "name": name,
    }
    return cfg


def _write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(args)
    return code, err.getvalue()


def _one_line_exit_2(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("relkd: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(relkd.__file__).resolve().parents[1])  # the relkd under test
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=src)
    return env


# --- names -------------------------------------------------------------------------------------

TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "transfer" not in p.parts)


def _folder(cfg) -> Path:
    from relkd.engine.rundir import run_path

    return run_path(cfg)


def test_every_shipped_config_has_its_own_run_folder():
    """relkd 0.1: 128 folders were shared by 2+ shipped configs (no teacher in the default
    name), and the Fashion-MNIST configs' hard-coded names ignored the seed."""
    assert len(TRAIN_CONFIGS) > 400
    seen: dict[Path, str] = {}
    for seed in (0, 1):
        for p in TRAIN_CONFIGS:
            folder = _folder(load_config(p, [f"train.seed={seed}"])).resolve()
            rel = f"{p.relative_to(REPO / 'configs')} seed {seed}"
            assert folder not in seen, f"{rel} and {seen.get(folder)} share {folder}"
            seen[folder] = rel


def test_default_name_has_method_teacher_student_and_seed():
    from relkd.engine.rundir import default_name

    cfg = load_config(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")
    assert default_name(cfg) == "kd_resnet56_resnet20_s0"
    cfg = load_config({"student": {"name": "timm:resnet18"}, "method": {"name": "ce"}})
    assert default_name(cfg) == "ce_timm-resnet18_s0"


@pytest.mark.parametrize(
    "name", ["../../escaped", "a/../../escaped", "<tmp>/escaped-abs", "${oc.env:HOME}", "."]
)
def test_a_name_never_leaves_output_dir(name, fmnist_root, tmp_path):
    out = tmp_path / "a" / "b" / "runs"
    cfg = _write(tmp_path / "c.yaml", _cfg(fmnist_root, out, name=None))
    name = name.replace("<tmp>", str(tmp_path))
    before = set(tmp_path.rglob("*"))
    code, err = _cli(["train", cfg, f"name={name}"])
    _one_line_exit_2(code, err)
    assert "name=" in err and "output_dir" in err
    assert set(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("<tmp>/escaped-abs").exists()


def test_a_name_through_a_symlink_out_of_output_dir_is_refused(fmnist_root, tmp_path):
    out, outside = tmp_path / "runs", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (out / "link").symlink_to(outside)
    with pytest.raises(RelkdError, match="symlink"):
        relkd.train(_cfg(fmnist_root, out, name="link/x"), quiet=True)
    assert not any(outside.iterdir())


# --- folders that are not (resumable) runs -----------------------------------------------------


def test_a_folder_that_is_not_a_relkd_run_is_never_written_into(fmnist_root, tmp_path):
    """relkd 0.1 overwrote five of a user's files in a folder that happened to have the run's
    name, and exited 0."""
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "student.pt", "notes.txt"):
        (folder / name).write_text(f"the user's own {name}\n")
    before = _snapshot(folder)
    for resume in ([], ["--resume"]):
        code, err = _cli(["train", _write(tmp_path / "c.yaml", _cfg(fmnist_root, tmp_path / "runs")),
                          *resume])  # fmt: skip
        _one_line_exit_2(code, err)
        assert "is not a relkd run" in err and "notes.txt" in err
        assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(
            n for n in before
        )


def test_the_grid_runners_files_do_not_make_a_folder_foreign(fmnist_root, tmp_path):
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / "bench.json").write_text("{}")
    (folder / ".lock").write_text("{}")  # relkd <= 0.2's OS lock file
    (folder / ".relkd.claim.new-0123456789abcdef").write_text("{}")  # a crashed claim create
    res = relkd.train(_cfg(fmnist_root, tmp_path / "runs"), quiet=True)
    assert Path(res["run_dir"]) == folder and (folder / "summary.json").exists()


def test_a_failed_build_writes_nothing(fmnist_root, tmp_path, tiny_teacher_ckpt):
    """relkd 0.1 left config.yaml and tb/ behind (counted as 'unfinished' by relkd report)."""
    cfg = _cfg(fmnist_root, tmp_path / "runs", method="kd")
    cfg["teacher"] = {"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)}
    cfg["train"]["tensorboard"] = True
    code, err = _cli(["train", _write(tmp_path / "c.yaml", cfg), "method.args.temprature=2"])
    _one_line_exit_2(code, err)
    assert "temprature" in err
    assert not (tmp_path / "runs").exists()


def test_history_without_a_checkpoint_is_not_restarted_silently(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path / "runs")
    run = Path(relkd.train(cfg, quiet=True)["run_dir"])
    for name in (CKPT, PREV):
        (run / name).unlink(missing_ok=True)
    before = _snapshot(run)
    code, err = _cli(["train", _write(tmp_path / "c.yaml", cfg), "--resume"])
    _one_line_exit_2(code, err)
    assert "no checkpoint" in err and "metrics.jsonl" in err
    code, err = _cli(["train", _write(tmp_path / "c.yaml", cfg)])
    _one_line_exit_2(code, err)
    assert "already holds a run" in err
    assert _snapshot(run) == before


# --- resume rules ------------------------------------------------------------------------------


def test_resume_with_another_config_is_refused_naming_every_change(
    fmnist_root, tmp_path, tiny_teacher_ckpt
):
    """relkd 0.1: a CE run resumed with method.name=kd silently became a KD run and rewrote
    config.yaml; train.epochs changes silently stretched the schedule."""
    cfg = _cfg(fmnist_root, tmp_path / "runs")
    run = Path(relkd.train(cfg, quiet=True)["run_dir"])
    before = _snapshot(run)
    path = _write(tmp_path / "c.yaml", cfg)
    changed = ["method.name=kd", "teacher.name=cnn_small", f"teacher.checkpoint={tiny_teacher_ckpt}",
               "train.epochs=2", "data.num_workers=0"]  # fmt: skip
    code, err = _cli(["train", path, *changed, "--resume"])
    _one_line_exit_2(code, err)
    assert '"ce" -> "kd"' in err and "method.name" in err
    assert "train.epochs: 1 -> 2" in err and "teacher.name" in err and "teacher.checkpoint" in err
    assert "data.num_workers" not in err  # the machine's, not the experiment's
    assert "--allow-change" in err
    # allowing one change is not allowing the others
    code, err = _cli(["train", path, *changed, "--resume", "--allow-change", "train.epochs"])
    _one_line_exit_2(code, err)
    assert "method.name" in err and "train.epochs" not in err.split("pass")[0]
    assert _snapshot(run) == before  # refused: not one byte changed
    code, err = _cli(["train", path, "--resume", "--allow-change", "train.epoch"])
    _one_line_exit_2(code, err)
    assert "'train.epoch' is not a config key" in err


def test_an_allowed_change_is_applied_and_recorded(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path / "runs")
    run = Path(relkd.train(cfg, quiet=True)["run_dir"])
    path = _write(tmp_path / "c.yaml", cfg)
    code, err = _cli(["train", path, "train.epochs=2", "data.num_workers=0", "--resume",
                      "--allow-change", "train.epochs", "--quiet"])  # fmt: skip
    assert code == 0, err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert [s["kind"] for s in sessions] == ["start", "resume"]
    changes = {c["key"]: c for c in sessions[1]["config_changes"]}
    assert changes["train.epochs"] == {"key": "train.epochs", "old": 1, "new": 2, "why": "allowed"}
    assert changes["data.num_workers"]["why"] == "env"
    assert sessions[1]["start_epoch"] == 1
    # The summary's training time covers both sessions (each epoch's own time, from history).
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in records))
    assert summary["train_time_s"] > records[1]["epoch_time_s"]


def test_config_changes_lists_leaves():
    from relkd.engine.rundir import config_changes

    old = {"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}
    new = {"a": {"b": 2, "c": [1, 2]}, "d": {"x": 1}, "e": {}}
    assert config_changes(old, new) == [
        ("a.b", 1, 2),
        ("d", None, "<absent>"),
        ("d.x", "<absent>", 1),
    ]


def _state_with(run: Path, edit) -> None:
    from relkd.engine.checkpoint import CheckpointStore

    store = CheckpointStore(run, log=lambda m: None)
    state = store.load_latest()
    edit(state["distiller"])
    store.save(state)


@pytest.mark.parametrize("what", ["model", "classes"])
def test_resume_with_a_checkpoint_of_another_model_is_one_line(what, fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path / "runs")
    run = Path(relkd.train(cfg, quiet=True)["run_dir"])
    if what == "model":  # another architecture's checkpoint in this folder
        ocfg = _cfg(fmnist_root, tmp_path / "o")
        ocfg["student"] = {"name": "cnn_small"}
        orun = Path(relkd.train(ocfg, quiet=True)["run_dir"])
        for name in (CKPT, PREV, "checkpoint.json", CKPT + ".sha256", PREV + ".sha256"):
            (run / name).unlink(missing_ok=True)
            if (orun / name).exists():
                (run / name).write_bytes((orun / name).read_bytes())
    else:  # the same model with a 100-class head

        def widen(sd):
            k = [k for k in sd if k.startswith("student.") and k.endswith(".weight")][-1]
            b = k[: -len("weight")] + "bias"
            sd[k] = torch.zeros(100, sd[k].shape[1])
            sd[b] = torch.zeros(100)

        _state_with(run, widen)
    before = _snapshot(run)
    code, err = _cli(["train", _write(tmp_path / "c.yaml", cfg), "--resume"])
    _one_line_exit_2(code, err)
    assert "does not fit this run's model" in err
    assert (
        ("size mismatch" in err) if what == "classes" else ("Missing key" in err or "size" in err)
    )
    assert _snapshot(run) == before


# --- one process per folder --------------------------------------------------------------------


def test_a_second_process_on_the_same_folder_is_refused_until_the_first_dies(fmnist_root, tmp_path):
    """A live ``relkd train`` holds its folder: a second start or resume is refused naming its
    pid; once it is killed (no clean-up), the folder can be opened again. The first process is
    parked at its first training step (tests/engine/parked_model.py), so the test waits for that
    state instead of betting on how long training takes (a short run could finish, or be killed
    in the middle of a write, before the test looks)."""
    cfg = _cfg(fmnist_root, tmp_path / "runs", epochs=2, max_steps_per_epoch=1)
    cfg["student"] = {"name": "tests.engine.parked_model:parked_net"}
    path = _write(tmp_path / "c.yaml", cfg)
    parked = tmp_path / "parked.pid"
    env = _env()
    env.update(RELKD_TEST_PARKED=str(parked), PYTHONPATH=f"{env['PYTHONPATH']}{os.pathsep}{REPO}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relkd", "train", path, "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    run = tmp_path / "runs" / "r"
    try:
        t_end = time.time() + 300
        while not parked.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < t_end, "the first process never reached its first step"
            time.sleep(0.05)
        pid = int(parked.read_text())
        assert pid == proc.pid
        # parked after opening the folder: its claim is taken and its session recorded
        assert json.loads((run / "run.json").read_text())["sessions"][-1]["pid"] == pid
        for resume in (False, True):
            with pytest.raises(RelkdError, match=f"in use by another relkd process \\(pid {pid}"):
                relkd.train(cfg, resume=resume, quiet=True)
        assert proc.poll() is None  # still parked: the refusals were of a live holder
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the crashed holder does not keep the lock
    from relkd.engine.rundir import RunFolder, run_path

    folder = RunFolder(run_path(load_config(cfg)))
    folder.open(load_config(cfg), resume=True)
    folder.close()


# --- provenance and exports --------------------------------------------------------------------


def test_the_folder_records_what_produced_it(fmnist_root, tmp_path):
    cfg = _cfg(fmnist_root, tmp_path / "runs")
    cmd = [sys.executable, "-m", "relkd", "train", _write(tmp_path / "c.yaml", cfg), "--quiet"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "runs" / "r"
    s = json.loads((run / "run.json").read_text())["sessions"][0]
    assert s["relkd"] == relkd.__version__ and s["torch"] == torch.__version__
    assert s["device"] == "cpu" and s["world_size"] == 1 and s["global_batch"] == 64
    assert s["host"] and s["pid"] and s["kind"] == "start"
    assert s["command"].endswith(f"train {tmp_path / 'c.yaml'} --quiet")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True)  # fmt: skip
    if git.returncode == 0:
        assert s["git_commit"].split("+")[0] == git.stdout.strip()


def test_student_safetensors_carries_metadata_and_the_pt_files_mode(fmnist_root, tmp_path):
    from safetensors import safe_open

    run = Path(relkd.train(_cfg(fmnist_root, tmp_path / "runs"), quiet=True)["run_dir"])
    with safe_open(str(run / "student.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
    assert meta["architecture"] == "cnn_tiny" and meta["num_classes"] == 10
    assert meta["in_chans"] == 1 and meta["image_size"] == 28
    assert len(meta["mean"]) == len(meta["std"]) == 1 and 0 < meta["std"][0] < 1
    modes = {n: (run / n).stat().st_mode & 0o777 for n in ("student.pt", "student.safetensors")}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    model = relkd.create_model("cnn_tiny", 10, in_chans=1)
    relkd.load_checkpoint(model, run / "student.safetensors")
    assert torch.load(run / "student.pt", weights_only=True)["meta"] == meta


def test_what_counts_as_a_run_folder(tmp_path):
    """run.json marks a run; a relkd 0.1 folder (no run.json) counts when it holds its
    checkpoint / metrics / summary, or nothing but relkd's own files (a failed build's
    config.yaml and tb/); anything else is someone else's folder."""
    from relkd.config import to_yaml
    from relkd.engine.rundir import RunFolder

    cfg_text = to_yaml(load_config({"student": {"name": "cnn_tiny"}}))
    cases = {
        "marked": ({"run.json": '{"relkd_run": 1, "sessions": []}', "mine.txt": "x"}, True),
        "relkd01_run": ({"config.yaml": cfg_text, "metrics.jsonl": "", "x.png": "x"}, True),
        "relkd01_failed_build": ({"config.yaml": cfg_text, "tb/e": "x"}, True),
        "user_with_a_relkd_config": ({"config.yaml": cfg_text, "notes.txt": "x"}, False),
        "user": ({"config.yaml": "lr: 1\n", "metrics.jsonl": "{}\n"}, False),
        "grid_only": (
            {"bench.json": "{}", "failed.json": "{}", ".lock": "{}", ".relkd.claim": "{}"},
            False,
        ),
    }
    for name, (files, is_run) in cases.items():
        d = tmp_path / name
        for rel, text in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        st = RunFolder(d).state()
        assert st.is_run == is_run, name
        assert bool(st.foreign) == (not is_run and name != "grid_only"), (name, st.foreign)


@pytest.mark.parametrize("bytes_", [255, 256])
def test_a_name_longer_than_name_max_is_refused_by_print_config_as_by_train(
    bytes_, fmnist_root, tmp_path
):
    """A 256-byte name passed --print-config and `relkd train` then failed at mkdir, leaving
    an empty output_dir. Now the config check refuses it (both commands, the same line, nothing
    written); 255 bytes (two-byte characters count twice) is a valid folder name."""
    name = "é" * (bytes_ // 2) + "a" * (bytes_ % 2)  # bytes_ bytes in UTF-8
    assert len(name.encode()) == bytes_
    out = tmp_path / "new" / "runs"
    cfg = _write(tmp_path / "c.yaml", _cfg(fmnist_root, out, name=name, max_steps_per_epoch=1))
    code_p, err_p = _cli(["train", cfg, "--print-config"])
    if bytes_ == 255:
        assert code_p == 0, err_p
        return
    code_t, err_t = _cli(["train", cfg])
    for code, err in ((code_p, err_p), (code_t, err_t)):
        _one_line_exit_2(code, err)
        assert (
            "name='éééé" in err
            and (
                "is 256 bytes long, more than the 255 bytes a file name may have on this file "
                "system (NAME_MAX)"
            )
            in err
        )
    assert err_p == err_t
    assert not (tmp_path / "new").exists()  # no empty output_dir
    with pytest.raises(RelkdError, match="NAME_MAX"):
        load_config(cfg, [f"output_dir={tmp_path / ('x' * 256)}", "name=r"])


def test_a_run_folder_that_cannot_be_made_leaves_no_empty_folders(
    fmnist_root, tmp_path, monkeypatch
):
    """The disk fills (ENOSPC) as `relkd train` makes the run folder: one line naming it, and
    the parent folders it had just made are gone again (those that existed stay)."""
    import errno

    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "r":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "runs"
    code, err = _cli(["train", _write(tmp_path / "c.yaml", _cfg(fmnist_root, out))])
    _one_line_exit_2(code, err)
    assert f"cannot write the run folder {str(out / 'r')!r}" in err and "No space left" in err
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
