"""``relkd bench status OUT`` without a cluster: the folders it refuses, and how it shows jobs that
left the queue. The scheduler's answer is faked (``relkd.bench.status.scheduler_jobs``, the one
place status asks ``squeue``); tests/test_slurm.py runs the same command on a real Slurm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from relkd.bench import slurm as slurm_mod
from relkd.bench import status as status_mod
from relkd.bench.status import format_status, suite_status
from relkd.cli import main
from relkd.registry import RelkdError


def _status_cli(out: Path, capsys) -> tuple[int, str, str]:
    code = main(["bench", "status", str(out)])
    got = capsys.readouterr()
    return code, got.out, got.err


# ----------------------------------------------------------------------------- not a suite folder


def test_empty_folder_is_refused_naming_it_and_what_was_expected(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _status_cli(empty, capsys)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"relkd: error: {empty.resolve()} is not a suite output folder: expected the --out "
        "folder of relkd bench accuracy, with teachers/, runs/ or slurm/state.json"
    )
    assert len(err.strip().splitlines()) == 1


def test_a_run_folder_is_refused_as_a_run_folder(tmp_path, capsys):
    run = tmp_path / "kd_r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"relkd_run": 1, "sessions": []}))
    (run / "config.yaml").write_text("name: kd_r\n")
    code, out, err = _status_cli(run, capsys)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"relkd: error: {run.resolve()} is a run folder, not a suite output folder (expected "
        "the --out folder of relkd bench accuracy, with teachers/, runs/ or slurm/state.json)"
    )


def test_a_missing_folder_is_refused(tmp_path, capsys):
    code, _, err = _status_cli(tmp_path / "nope", capsys)
    assert (
        code == 2
        and "nope does not exist (expected the --out folder of relkd bench accuracy)" in err
    )


def test_a_folder_filled_by_local_workers_is_read(tmp_path):
    """The refusal does not catch a real suite output without Slurm state: its run folders are
    listed (a finished run and a failure record)."""
    out = tmp_path / "out"
    done = out / "runs/kd/a_b/s0"
    done.mkdir(parents=True)
    (done / "bench.json").write_text(json.dumps({"id": "kd/a_b/s0"}))
    (done / "summary.json").write_text("{}")
    (done / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    bad = out / "runs/ce/b/s0"
    bad.mkdir(parents=True)
    (bad / "failed.json").write_text(json.dumps({"token": "x", "error": "RuntimeError: boom"}))
    rows = {r["id"]: r for r in suite_status(out)}
    assert rows["kd/a_b/s0"]["state"] == "done" and rows["kd/a_b/s0"]["last_epoch"] == 2
    assert rows["ce/b/s0"]["state"] == "failed"
    assert rows["ce/b/s0"]["detail"] == "RuntimeError: boom"


# ----------------------------------------------------------------------------- jobs that ended


def _suite_out(tmp_path: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """A suite output folder as ``--launcher slurm`` leaves it: one teacher job, one array of two
    runs (``kd`` seeds 0 and 1), ids in ``slurm/state.json``; logs under ``slurm/logs``. Returns
    the folder and ``{grid id: job id}``."""
    suite = {
        "name": "tiny",
        "base": {
            "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
            "schedule": {"name": "constant"},
            "train": {"epochs": 1, "tensorboard": False, "device": "cpu"},
        },
        "teachers": {"cnn_small": {"train": {"train": {"epochs": 1}}}},
        "pairs": [["cnn_small", "cnn_tiny"]],
        "methods": ["kd"],
        "seeds": [0, 1],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    out = tmp_path / "out"
    logs = out / "slurm" / "logs"
    logs.mkdir(parents=True)
    ids = {
        "teacher/cnn_small": "40",
        "kd/cnn_small_cnn_tiny/s0": "41_0",
        "kd/cnn_small_cnn_tiny/s1": "41_1",
    }
    log_of = {
        "teacher/cnn_small": logs / "teacher-cnn_small-40.out",
        "kd/cnn_small_cnn_tiny/s0": logs / "runs-41_0.out",
        "kd/cnn_small_cnn_tiny/s1": logs / "runs-41_1.out",
    }
    jobs = {k: {"job_id": ids[k], "log": str(log_of[k]), "submitted": 0.0, "submission": 1}
            for k in ids}  # fmt: skip
    state = {"suite": str(path), "overrides": [], "only": None, "submissions": 1, "jobs": jobs}
    (out / "slurm" / "state.json").write_text(json.dumps(state))
    return out, ids


def _fake_scheduler(monkeypatch, jobs: dict[str, dict[str, str]]) -> None:
    monkeypatch.setattr(slurm_mod, "_have_slurm", lambda: True)
    monkeypatch.setattr(status_mod, "scheduler_jobs", lambda: dict(jobs))


def test_runs_cancelled_because_their_teacher_failed_never_started(
    tmp_path, fmnist_root, monkeypatch, capsys
):
    """The teacher's job ran and failed (its log exists, Slurm: FAILED); the array was cancelled
    by Slurm before it started (--kill-on-invalid-dep): the runs are "cancelled", say why, and
    name no log (none exists)."""
    out, ids = _suite_out(tmp_path, fmnist_root)
    teacher_log = out / "slurm/logs/teacher-cnn_small-40.out"
    teacher_log.write_text("Traceback ...\n")
    _fake_scheduler(monkeypatch, {
        "40": {"state": "FAILED", "reason": "NonZeroExitCode", "nodes": "n1"},
        "41_0": {"state": "CANCELLED", "reason": "DependencyNeverSatisfied", "nodes": ""},
        "41_1": {"state": "CANCELLED", "reason": "DependencyNeverSatisfied", "nodes": ""},
    })  # fmt: skip
    rows = {r["id"]: r for r in suite_status(out)}
    t = rows["teacher/cnn_small"]
    assert t["state"] == "failed" and t["job_id"] == "40"
    assert t["detail"] == (
        "job left the queue without finishing the run (Slurm: FAILED, NonZeroExitCode; "
        f"log: {teacher_log})"
    )
    for rid in ("kd/cnn_small_cnn_tiny/s0", "kd/cnn_small_cnn_tiny/s1"):
        assert rows[rid]["state"] == "cancelled" and rows[rid]["job_id"] == ids[rid]
        assert rows[rid]["detail"] == f"never started: its teacher failed ({t['detail']})"
    # the table, through the CLI
    assert main(["bench", "status", str(out)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"kd/cnn_small_cnn_tiny/s1\s+cancelled\s+41_1\s+never started: its", table)
    assert "runs-41_" not in table  # no log path for a job that never started
    assert table.strip().splitlines()[-1] == "2 cancelled, 1 failed"


def test_a_pending_task_cancelled_by_the_user_shows_slurms_reason(
    tmp_path, fmnist_root, monkeypatch
):
    """``scancel`` of a pending array task: "cancelled" with Slurm's state and reason; the task
    that ran and was cancelled while running is "failed" with its log; the teacher is done."""
    out, _ = _suite_out(tmp_path, fmnist_root)
    teacher = out / "teachers/cnn_small"
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text("{}")
    ran = out / "slurm/logs/runs-41_0.out"
    ran.write_text("epoch 1 ...\n")
    _fake_scheduler(monkeypatch, {
        "41_0": {"state": "CANCELLED", "reason": "None", "nodes": "n2"},
        "41_1": {"state": "CANCELLED", "reason": "JobHeldUser", "nodes": ""},
    })  # fmt: skip
    rows = {r["id"]: r for r in suite_status(out)}
    assert rows["teacher/cnn_small"]["state"] == "done"
    assert rows["kd/cnn_small_cnn_tiny/s1"]["state"] == "cancelled"
    assert rows["kd/cnn_small_cnn_tiny/s1"]["detail"] == (
        "never started (Slurm: CANCELLED, JobHeldUser)"
    )
    assert rows["kd/cnn_small_cnn_tiny/s0"]["state"] == "failed"
    assert rows["kd/cnn_small_cnn_tiny/s0"]["detail"] == (
        f"job left the queue without finishing the run (Slurm: CANCELLED; log: {ran})"
    )


def test_after_squeue_forgets_the_job_the_log_decides(tmp_path, fmnist_root, monkeypatch):
    """Once Slurm no longer lists the jobs (MinJobAge), a job without its log never started
    ("cancelled", no reason known) and one with its log ran ("failed", log named); pending and
    running jobs are still read from the same answer."""
    out, _ = _suite_out(tmp_path, fmnist_root)
    t_log = out / "slurm/logs/teacher-cnn_small-40.out"
    t_log.write_text("killed\n")
    _fake_scheduler(monkeypatch, {
        "41_1": {"state": "PENDING", "reason": "Dependency", "nodes": ""},
    })  # fmt: skip
    rows = {r["id"]: r for r in suite_status(out)}
    assert rows["teacher/cnn_small"]["state"] == "failed"
    assert rows["teacher/cnn_small"]["detail"] == (
        f"job left the queue without finishing the run (log: {t_log})"
    )
    s0 = rows["kd/cnn_small_cnn_tiny/s0"]
    assert s0["state"] == "cancelled"
    assert s0["detail"] == "never started: its teacher failed (" + (
        f"job left the queue without finishing the run (log: {t_log}))"
    )
    s1 = rows["kd/cnn_small_cnn_tiny/s1"]
    assert (s1["state"], s1["detail"]) == ("pending", "Dependency")
    text = format_status(list(rows.values()))
    assert text.splitlines()[-1] == "1 cancelled, 1 failed, 1 pending"


def test_a_job_without_a_recorded_log_that_squeue_forgot_stays_failed(
    tmp_path, fmnist_root, monkeypatch
):
    """Nothing tells whether it started: "failed", and no "log: " with an empty path."""
    out, _ = _suite_out(tmp_path, fmnist_root)
    state = json.loads((out / "slurm/state.json").read_text())
    state["jobs"]["teacher/cnn_small"]["log"] = ""
    (out / "slurm/state.json").write_text(json.dumps(state))
    _fake_scheduler(monkeypatch, {})
    t = next(r for r in suite_status(out) if r["id"] == "teacher/cnn_small")
    assert (t["state"], t["detail"]) == ("failed", "job left the queue without finishing the run")


def test_scheduler_jobs_parses_squeue(monkeypatch):
    """Every line of ``squeue -h -r -t all -o %i|%T|%r|%N``, ended jobs included."""
    seen = []

    def fake(cmd):
        seen.append(cmd)
        return "41_1|CANCELLED|JobHeldUser|\n40|FAILED|NonZeroExitCode|n1\n42|PENDING|Priority|\n"

    monkeypatch.setattr(slurm_mod, "_slurm", fake)
    jobs = status_mod.scheduler_jobs()
    assert seen == [["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%N"]]
    assert jobs == {
        "41_1": {"state": "CANCELLED", "reason": "JobHeldUser", "nodes": ""},
        "40": {"state": "FAILED", "reason": "NonZeroExitCode", "nodes": "n1"},
        "42": {"state": "PENDING", "reason": "Priority", "nodes": ""},
    }


def test_status_api_raises_relkd_error_for_a_non_suite_folder(tmp_path):
    with pytest.raises(RelkdError, match=r"is not a suite output folder"):
        suite_status(tmp_path)
