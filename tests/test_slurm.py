"""relkd on Slurm: the launcher, preemption / requeue, resubmission, srun-native DDP.

The tests marked ``slurm`` run against a real one-node Slurm cluster (``scripts/slurm-local.sh``,
started by ``.ci/run``; the fixture starts it when it can). Where it cannot be started (not
root, no slurm-wlm / munge packages) they skip with the reason, except in CI (``CI=true``) as
root, where they fail: there the cluster must run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from relkd import distributed as D
from relkd.progress import LineProgress

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------- without a scheduler
def test_expand_nodelist_matches_scontrols_forms():
    assert D.expand_nodelist("node[01-03,07],gpu-a") == [
        "node01",
        "node02",
        "node03",
        "node07",
        "gpu-a",
    ]
    assert D.expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert D.expand_nodelist("vm") == ["vm"]
    assert D.expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]
    with pytest.raises(ValueError):
        D.expand_nodelist("n[3-1]")


def _srun_env(**kw) -> dict:
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "2"}  # fmt: skip
    env.update(kw)
    return env


def test_slurm_process_group_from_an_srun_task():
    g = D.slurm_process_group(_srun_env())
    assert g == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu12",
                 "MASTER_PORT": str(20000 + (4321 % 4000) * 10 + 2)}  # fmt: skip
    # torchrun's environment wins; the batch script itself (no step) is one process
    assert D.slurm_process_group(_srun_env(RANK="0")) is None
    env = _srun_env()
    del env["SLURM_STEP_NUM_TASKS"]
    assert D.slurm_process_group(env) is None
    assert D.slurm_process_group(_srun_env(SLURM_STEP_NUM_TASKS="1")) is None
    assert D.slurm_process_group(_srun_env(MASTER_PORT="29555"))["MASTER_PORT"] == "29555"


def test_scheduler_info_of_an_array_task():
    env = {"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "5",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": "1"}  # fmt: skip
    info = D.scheduler_info(env)
    assert info == {"name": "slurm", "job_id": "17", "array_job_id": "12", "array_task_id": "5",
                    "node_list": "n[1-2]", "restart_count": "1"}  # fmt: skip
    assert D.scheduler_info({}) is None


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_line_progress_prints_quarters_of_long_loops_only(capsys):
    clock = _Clock()
    bar = LineProgress(total=100, desc="epoch 1/3", unit="step", min_s=10, clock=clock)
    for _ in range(100):
        clock.t += 0.5  # 50 s in all: a long epoch
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[1].split(",")[0].strip() for ln in lines] == [
        "25/100 (25%)", "50/100 (50%)", "75/100 (75%)"
    ]  # fmt: skip
    assert lines[0] == "epoch 1/3: 25/100 (25%), 2.0 step/s, ETA 38 s"
    short = LineProgress(total=100, desc="e", min_s=10, clock=clock)
    for _ in range(100):
        clock.t += 0.01  # 1 s: nothing printed
        short.update(1)
    assert capsys.readouterr().err == ""


def _tiny_config(root: Path, out: Path, name: str, **train) -> Path:
    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 16, "augment": False},
        "schedule": {"name": "constant"},
        "train": {
            "epochs": 2,
            "max_steps_per_epoch": 4,
            "tensorboard": False,
            "seed": 3,
            "device": "cpu",
            **train,
        },
        "output_dir": str(out),
        "name": name,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_progress_in_a_log_file_is_plain_lines(tmp_path, fmnist_root):
    """`relkd train ... 2> log`: no carriage-return redraws; per-epoch lines with rate and ETA,
    and (RELKD_PROGRESS_MIN_S=0: every epoch counts as long) lines within each epoch."""
    cfg = _tiny_config(fmnist_root, tmp_path / "runs", "p")
    env = {**os.environ, "RELKD_PROGRESS_MIN_S": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RELKD_PROGRESS", None)
    with open(tmp_path / "log", "w") as log:
        p = subprocess.run([PY, "-m", "relkd", "train", str(cfg)], stdout=log, stderr=log, env=env)
    assert p.returncode == 0
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    epoch_lines = [x for x in text.splitlines() if x.startswith("main epoch")]
    assert len(epoch_lines) == 2
    assert all(re.search(r"\(\d+\.\d s, [\d.]+ step/s, ETA \d+ s\)$", x) for x in epoch_lines)
    inner = [x for x in text.splitlines() if x.startswith("epoch 1/2:")]
    assert [x.split(",")[0] for x in inner] == [
        "epoch 1/2: 1/4 (25%)", "epoch 1/2: 2/4 (50%)", "epoch 1/2: 3/4 (75%)"
    ]  # fmt: skip
    assert all("step/s, ETA" in x for x in inner)


def test_dry_run_prints_the_scripts_and_submits_nothing(tmp_path, fmnist_root):
    """--dry-run: the batch scripts with the suite's and the command line's sbatch options, the
    array throttle and the dependency chain, printed; nothing written or submitted."""
    suite = _suite(tmp_path / "s.yaml", fmnist_root, teacher_cache="auto",
                   slurm={"partition": "gpu", "time": "01:00:00"})  # fmt: skip
    out = tmp_path / "out"
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--dry-run",
               "--slurm", "time=08:00:00", "--slurm", "gres=gpu:1", "--slurm", "exclusive=",
               "--max-parallel", "3", "--runs-per-task", "4")  # fmt: skip
    assert not out.exists()
    text = p.stdout
    assert "dry run: 4 job(s) would be submitted; 0 finished before" in text
    heads = re.findall(r"^# ---- (\S+) \(would run: (.*)\)$", text, re.M)
    names = [Path(h[0]).name for h in heads]
    assert names[0] == "01-teacher-cnn_small.sh" and names[1].startswith("01-cache-")
    assert names[2:] == ["01-runs.sh", "01-report.sh"]
    assert heads[1][1].startswith("sbatch --parsable --dependency=afterok:<teacher-cnn_small> ")
    assert "--dependency=afterok:<teacher-cnn_small>:<cache-" in heads[2][1]
    assert "--dependency=afterany:<runs>" in heads[3][1]
    runs = text.split("# ---- ")[3]
    for line in ("#SBATCH --array=0-1%3", "#SBATCH --partition=gpu", "#SBATCH --time=08:00:00",
                 "#SBATCH --gres=gpu:1", "#SBATCH --exclusive\n", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@90"):  # fmt: skip
        assert line in runs, line
    assert runs.count("#SBATCH --time=") == 1  # the command line replaced the suite's
    # 6 runs, 4 per task: two tasks
    assert re.search(r"TASKS=\(\n  ce/cnn_tiny/s0,ce/cnn_tiny/s1,kd/[^\n]+\n  dkd/[^\n]+\n\)", runs)
    for s in text.split("# ---- ")[1:]:
        script = s.split("\n", 1)[1].split("\ndry run:")[0]
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


SLOW_START = """
import signal, sys, time
time.sleep(float(sys.argv[2]))  # relkd importing torch: no handler yet
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(time.monotonic()))
open(sys.argv[1], "w").write("handler in place")
t0 = time.monotonic()
while not got and time.monotonic() - t0 < 20:
    time.sleep(0.02)
sys.exit(75 if got else 0)  # 75: stopped on the request, as relkd does
"""


@pytest.mark.parametrize("start_s", [0.0, 1.5])
def test_the_batch_script_holds_a_warning_back_until_relkd_can_act_on_it(tmp_path, start_s):
    """Slurm's warning (USR1 to the batch shell) may come while relkd is still starting, before
    its handler is in place; a plain ``kill -USR1`` would then kill it (the run recorded as
    failed instead of requeued). The generated script starts relkd with USR1 ignored and passes
    the signal on once relkd has its handler: the stand-in (a process that installs its
    handler after ``start_s`` s) gets it, exits 75, and the script runs ``scontrol requeue``."""
    from relkd.bench.slurm import write_script

    text = write_script(None, title="t", name="n", log=str(tmp_path / "log"), opts={},
                        task_args=["SUITE"], jobs=["ce/x/s0"], cwd=tmp_path)  # fmt: skip
    ready = tmp_path / "ready"
    stand_in = shlex.join([PY, "-c", SLOW_START, str(ready), str(start_s)])
    text, n = re.subn(r"exec [^\n]* -m relkd bench task [^\n]*\) &", f"exec {stand_in} ) &", text)
    assert n == 1, text
    (tmp_path / "job.sh").write_text(text)
    fake = tmp_path / "bin"
    fake.mkdir()
    # the requeue ends the job: the fake scontrol stops the script as Slurm would
    scontrol = f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol.args\nkill -TERM "$PPID"\n'
    (fake / "scontrol").write_text(scontrol)
    (fake / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    time.sleep(0.3)  # the stand-in has started: a fork of the script, USR1 ignored
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert "relkd: requeueing job 4242 to resume" in out, out
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert ready.exists()


@pytest.mark.slow  # the CRD suite's configs are all loaded and checked (~40 s on 2 cores)
def test_readme_dry_run_command(tmp_path, capsys, monkeypatch):
    """The README's first Slurm command (--dry-run on the packaged CRD suite) runs as printed."""
    from relkd.cli import main

    text = (REPO / "README.md").read_text()
    block = text.split("### Run a table on a Slurm cluster", 1)[1].split("```bash\n", 1)[1]
    cmd = block.split("# print the batch scripts")[0].replace("\\\n", " ").split()
    assert cmd[0] == "relkd" and "--dry-run" in cmd
    cmd = [str(tmp_path / "crd") if a == "/shared/runs/crd" else a for a in cmd[1:]]
    monkeypatch.chdir(REPO)
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:1" in out and "#SBATCH --partition=gpu" in out
    from relkd.bench.suite import build_grid, load_suite

    _, runs = build_grid(load_suite(REPO / "benchmarks/suites/cifar100-crd.yaml"), tmp_path)
    groups = {r.cache_group for r in runs if r.cache_group is not None}
    n = int(re.search(r"dry run: (\d+) job\(s\)", out).group(1))
    assert n == len(groups) + 2  # a cache job per group, the runs' array, the report
    assert f"#SBATCH --array=0-{len(runs) - 1}%16" in out
    assert not (tmp_path / "crd").exists()


def test_launcher_option_errors(tmp_path, fmnist_root, capsys):
    from relkd.cli import main

    suite = _suite(tmp_path / "s.yaml", fmnist_root)
    base = ["bench", "accuracy", str(suite), "--out", str(tmp_path / "o"), "--launcher", "slurm"]
    for extra, words in (
        (["--slurm", "array=0-3"], "--slurm array: set by relkd itself"),
        (["--slurm", "partition"], "--slurm 'partition' is not key=value"),
        (["--workers", "2"], "--workers applies to the local launcher"),
        (["--max-parallel", "0"], "--max-parallel must be >= 1, got 0"),
        (["--runs-per-task", "0"], "--runs-per-task must be >= 1, got 0"),
        # sbatch takes unambiguous abbreviations of long options: arr is array, out is output
        (["--slurm", "arr=0-3"], "--slurm arr: set by relkd itself"),
        (["--slurm", "out=/tmp/x"], "--slurm out: set by relkd itself"),
        (["--slurm", "depend=afterok:1"], "--slurm depend: set by relkd itself"),
        (["--slurm", "no-requeue="], "--slurm no-requeue: set by relkd itself"),
        (["--slurm", "kill-on-invalid-dep=no"], "--slurm kill-on-invalid-dep: set by relkd"),
        (["--slurm", "x=a\n#SBATCH --array=9"], "--slurm x: the value 'a\\n#SBATCH --array=9' has"),
        (["--slurm", "Time=1"], "--slurm 'Time=1' is not key=value"),
    ):
        assert main([*base, "--dry-run", *extra]) == 2
        assert words in capsys.readouterr().err, extra
    local = ["bench", "accuracy", str(suite), "--out", str(tmp_path / "o")]
    for extra in (["--wait"], ["--runs-per-task", "0"], ["--max-parallel", "0"]):
        assert main([*local, *extra]) == 2
        assert f"{extra[0]} applies to --launcher slurm only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # legitimate options still pass, the report job taking only where it runs
    assert main([*base, "--dry-run", "--slurm", "partition=gpu", "--slurm", "gres=gpu:1"]) == 0
    text = capsys.readouterr().out
    report = text.split("-report.sh")[-1]
    assert "#SBATCH --partition=gpu" in report and "--gres" not in report


def test_a_failing_sbatch_is_reported_with_its_own_words(tmp_path, monkeypatch):
    """sbatch prints what is wrong first and a "Try sbatch --help" line last; the error
    keeps the first (it used to show only the last)."""
    from relkd.bench import slurm
    from relkd.registry import RelkdError

    fake = tmp_path / "sbatch"
    fake.write_text("#!/bin/bash\necho \"sbatch: unrecognized option '--bogus-opt=3'\" >&2\n"
                    "echo 'Try \"sbatch --help\" for more information' >&2\nexit 1\n")  # fmt: skip
    fake.chmod(0o755)
    with pytest.raises(RelkdError, match=r"failed: sbatch: unrecognized option '--bogus-opt=3'$"):
        slurm._slurm([str(fake), "--parsable", "job.sh"])


# ------------------------------------------------------------------------------ the cluster
def _cluster_reason() -> str | None:
    """None when a Slurm cluster answers (started here if possible), else why not."""
    if (
        shutil.which("sinfo")
        and subprocess.run(
            ["bash", str(REPO / "scripts/slurm-local.sh"), "status"], capture_output=True
        ).returncode
        == 0
    ):
        return None
    if os.geteuid() != 0:
        return "no Slurm cluster, and starting one (scripts/slurm-local.sh) needs root"
    if not (shutil.which("slurmctld") and shutil.which("munged")):
        return "no Slurm packages: apt-get install -y slurm-wlm munge"
    p = subprocess.run(["bash", str(REPO / "scripts/slurm-local.sh"), "start"],
                       capture_output=True, text=True)  # fmt: skip
    return None if p.returncode == 0 else f"scripts/slurm-local.sh start failed: {p.stderr[-500:]}"


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _cluster_reason()
    if reason is not None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI runs as root, so the Slurm tests must run: {reason}")
        pytest.skip(reason)


def _suite(path: Path, root: Path, methods=("ce", "kd", "dkd"), seeds=(0, 1), **kw) -> Path:
    suite = {
        "name": "tiny",
        "base": {
            "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
            "schedule": {"name": "constant"},
            "train": {"epochs": 2, "max_steps_per_epoch": 3, "tensorboard": False, "device": "cpu"},
        },
        "teachers": {"cnn_small": {"train": {"train": {"epochs": 1}}}},
        "pairs": [["cnn_small", "cnn_tiny"]],
        "methods": list(methods),
        "seeds": list(seeds),
    }
    suite.update(kw)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _relkd(*args, check=True, timeout=600, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "RELKD_SLURM_POLL_S": "1", **env}
    p = subprocess.run([PY, "-m", "relkd", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)  # fmt: skip
    if check and p.returncode != 0:
        raise AssertionError(
            f"relkd {' '.join(map(str, args))} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
        )
    return p


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _sessions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["sessions"]


@pytest.mark.slow
def test_slurm_suite_equals_local_workers(tmp_path, fmnist_root, slurm_cluster):
    """Teacher + 3 methods x 2 seeds with a teacher cache: --launcher slurm --wait gives the
    same top-1 and student bytes per run as --workers 2 here; run.json names the Slurm job."""
    suite = _suite(tmp_path / "s.yaml", fmnist_root, teacher_cache="auto")
    local, remote = tmp_path / "local", tmp_path / "slurm"
    _relkd("bench", "accuracy", suite, "--out", local, "--workers", "2", "--no-report")
    p = _relkd("bench", "accuracy", suite, "--out", remote, "--launcher", "slurm", "--wait",
               "--max-parallel", "2", "--runs-per-task", "2")  # fmt: skip
    assert "7 done" in p.stdout and (remote / "report.md").is_file()
    scripts = sorted(x.name for x in (remote / "slurm").glob("*.sh"))
    assert scripts == ["01-cache-" + scripts[0][9:], "01-runs.sh", "01-teacher-cnn_small.sh"]
    runs_sh = (remote / "slurm/01-runs.sh").read_text()
    assert "#SBATCH --array=0-2%2" in runs_sh and "#SBATCH --requeue" in runs_sh
    state = json.loads((remote / "slurm/state.json").read_text())
    rids = [
        str(p.parent.relative_to(local / "runs")) for p in (local / "runs").rglob("summary.json")
    ]
    assert len(rids) == 6
    for rid in rids:
        a, b = local / "runs" / rid, remote / "runs" / rid
        assert _summary(a)["last_top1"] == _summary(b)["last_top1"], rid
        assert (a / "student.pt").read_bytes() == (b / "student.pt").read_bytes(), rid
        sched = _sessions(b)[0]["scheduler"]
        assert state["jobs"][rid]["job_id"] == f"{sched['array_job_id']}_{sched['array_task_id']}"
        assert sched["node_list"] and sched["job_id"]
    t = remote / "teachers/cnn_small"
    assert (local / "teachers/cnn_small/student.pt").read_bytes() == (t / "student.pt").read_bytes()
    # the cache job built the cache; every kd/dkd run read it
    assert list((remote / "slurm").glob("cache-*.built"))
    for rid in [r for r in rids if not r.startswith("ce/")]:
        plan = json.loads((remote / "runs" / rid / "plan.json").read_text())
        assert "cache" in json.dumps(plan).lower(), rid
    # status: every run done with its job id and last epoch
    st = json.loads(_relkd("bench", "status", remote, "--json").stdout)
    assert {r["state"] for r in st} == {"done"} and all(r["last_epoch"] for r in st)


def _wait_until(cond, timeout=120.0, step=0.2, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _epochs_done(run_dir: Path) -> int:
    try:
        return sum(1 for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip())
    except OSError:
        return 0


@pytest.fixture(scope="module")
def long_root(tmp_path_factory) -> Path:
    """2560 training images: 40 steps of 64 per epoch (the session's set has 4)."""
    from tests.conftest import make_fmnist

    return make_fmnist(tmp_path_factory.mktemp("fmnist-long"), n_train=2560, n_test=128)


def _long_run_suite(tmp_path, root) -> Path:
    """One teacher-free run long enough (6 epochs of 40 steps) to be stopped in the middle."""
    return _suite(tmp_path / "long.yaml", root, methods=["ce"], seeds=[0],
                  overrides=["train.epochs=6", "train.max_steps_per_epoch=40",
                             "data.batch_size=64"])  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, long_root):
    """The long run trained here, without interruption: the bytes to compare with."""
    tmp = tmp_path_factory.mktemp("ref")
    suite = _long_run_suite(tmp, long_root)
    _relkd("bench", "accuracy", suite, "--out", tmp / "out", "--no-report")
    return (tmp / "out/runs/ce/cnn_tiny/s0/student.pt").read_bytes()


def _log_text(out: Path) -> str:
    rec = json.loads((out / "slurm/state.json").read_text())["jobs"]["ce/cnn_tiny/s0"]
    try:
        return Path(rec["log"]).read_text()
    except OSError:
        return ""


def _submit_and_interrupt(tmp_path, root, interrupt, mid_epoch=False) -> tuple[Path, str]:
    suite = _long_run_suite(tmp_path, root)
    out = tmp_path / "out"
    _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--no-report")
    run = out / "runs/ce/cnn_tiny/s0"
    jid = json.loads((out / "slurm/state.json").read_text())["jobs"]["ce/cnn_tiny/s0"]["job_id"]
    if mid_epoch:  # a quarter into epoch 2 (the progress line in the job's log)
        _wait_until(lambda: "epoch 2/6: 10/40 (25%)" in _log_text(out), timeout=300,
                    step=0.05, what="a quarter of epoch 2")  # fmt: skip
    else:
        _wait_until(lambda: _epochs_done(run) >= 1, timeout=300, what="the first epoch")
    interrupt(jid)
    again = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--no-report")
    assert "left alone: ce/cnn_tiny/s0" in again.stdout  # the requeued task, not a second one
    # (Slurm starts a requeued job cred_expire s later: 5 s on the test cluster, 120 by default)
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--wait",
               "--no-report")  # fmt: skip
    assert "0 job(s) submitted" in p.stdout and "1 done" in p.stdout
    return run, jid


def _squeue(jid: str) -> str:
    p = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T %r"], capture_output=True, text=True)
    return p.stdout.strip()


@pytest.mark.slow
def test_scontrol_requeue_resumes_byte_identical(tmp_path, long_root, slurm_cluster, uninterrupted):
    """A running task preempted with `scontrol requeue` (SIGTERM, then requeued by Slurm)
    resumes from its checkpoint and ends with the uninterrupted run's bytes."""
    run, _ = _submit_and_interrupt(
        tmp_path, long_root, lambda j: subprocess.run(["scontrol", "requeue", j], check=True)
    )
    assert (run / "student.pt").read_bytes() == uninterrupted
    kinds = [s["kind"] for s in _sessions(run)]
    assert kinds[0] == "start" and "resume" in kinds
    assert _sessions(run)[-1]["scheduler"].get("restart_count") == "1"
    assert _epochs_done(run) == 6  # every epoch recorded once


@pytest.mark.slow
@pytest.mark.parametrize("finish_s", ["45", "0"])
def test_time_limit_signal_checkpoints_and_requeues(
    tmp_path, long_root, slurm_cluster, uninterrupted, finish_s, monkeypatch
):
    """The pre-time-limit signal (`--signal=B:USR1@90`; simulated with `scancel --signal=USR1
    --batch`, which delivers the same signal to the same shell, since Slurm's own sends it at
    least 60 s into a job): relkd stops at a safe point and exits 75, the job requeues itself
    and the resumed run ends with the uninterrupted run's bytes. finish_s=45 (the scripts'
    default): the epoch under way is finished and checkpointed; 0: the run stops after the
    current step and the partial epoch is trained again after the requeue."""
    monkeypatch.setenv("RELKD_PREEMPT_FINISH_S", finish_s)  # sbatch passes it to the job
    monkeypatch.setenv("RELKD_PROGRESS_MIN_S", "0")  # quarter lines in every epoch

    def usr1(jid: str) -> None:
        subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)

    run, _ = _submit_and_interrupt(tmp_path, long_root, usr1, mid_epoch=finish_s == "0")
    assert (run / "student.pt").read_bytes() == uninterrupted
    assert [s["kind"] for s in _sessions(run)][:1] == ["start"] and len(_sessions(run)) == 2
    log = Path(
        json.loads((run.parents[3] / "slurm/state.json").read_text())["jobs"]["ce/cnn_tiny/s0"][
            "log"
        ]
    )
    text = log.read_text()
    how = "stopped after main epoch 2/6" if finish_s == "45" else "stopped in main epoch 2/6 at"
    assert f"relkd: stopped for requeueing: {how}" in text and "requeueing job" in text
    assert "\r" not in text


@pytest.fixture(scope="module")
def limit_root(tmp_path_factory) -> Path:
    """10240 training images: 160 steps of 64 per epoch."""
    from tests.conftest import make_fmnist

    return make_fmnist(tmp_path_factory.mktemp("fmnist-limit"), n_train=10240, n_test=128)


@pytest.mark.slow  # ~2 min: a run longer than its one-minute limit, in one-minute jobs
def test_a_task_that_hits_its_time_limit_is_requeued_and_completes(
    tmp_path, limit_root, slurm_cluster
):
    """Slurm's own time limit, nothing sent by the test: the task runs with ``--slurm time=1``
    (one minute, Slurm's smallest) and the scripts' ``--signal=B:USR1@90``, so Slurm warns it
    at its first sweep (10-30 s into each job) and would kill it at the minute. The run (30
    epochs of 160 steps: ~75 s on an idle core, more under load) does not fit in one job, and
    outlasts the first sweep even on a machine twice as fast, so every job of it but the last
    ends by the warning: relkd stops at a safe point, the task requeues
    itself and the next job resumes, until the run completes with every epoch recorded once.
    The warning may come while relkd is still starting (before its handler is installed): the
    script holds the signal back until relkd can act on it (a kill there fails the run)."""
    suite = _suite(tmp_path / "limit.yaml", limit_root, methods=["ce"], seeds=[0],
                   overrides=["train.epochs=30", "train.max_steps_per_epoch=160",
                              "data.batch_size=64"])  # fmt: skip
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--slurm",
               "time=1", "--wait", "--no-report", timeout=900)  # fmt: skip
    took = time.monotonic() - t0
    assert "1 done" in p.stdout, p.stdout
    assert "#SBATCH --time=1\n" in next((out / "slurm").glob("*-runs.sh")).read_text()
    run = out / "runs/ce/cnn_tiny/s0"
    sessions = _sessions(run)
    n = len(sessions)
    assert n >= 2, f"the run finished in its first one-minute job ({took:.0f} s in all)"
    assert [s["kind"] for s in sessions] == ["start"] + ["resume"] * (n - 1)
    assert sessions[-1]["scheduler"].get("restart_count") == str(n - 1)
    assert len({s["scheduler"]["job_id"] for s in sessions}) == 1  # one job, requeued
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))  # every epoch once, in order
    assert _summary(run)["epochs"] == 30
    log = _log_text(out)
    assert log.count("relkd: stopped for requeueing") == n - 1, log[-2000:]
    assert log.count("requeueing job") == n - 1
    assert "TIME LIMIT" not in log and "Traceback" not in log  # never killed at the limit


@pytest.mark.slow
def test_resubmission_trains_only_the_rest(tmp_path, fmnist_root, slurm_cluster, capsys):
    """After a partial local run, --launcher slurm submits only what is missing; queued jobs
    are left alone; a failed run is resubmitted with its failure shown; --wait exits 1 naming
    the run that failed again."""
    from relkd.cli import main

    suite = _suite(tmp_path / "s.yaml", fmnist_root, methods=["ce", "kd"], seeds=[0, 1])
    out = tmp_path / "out"
    _relkd("bench", "accuracy", suite, "--out", out, "--only", "kd/*/s0", "--no-report")
    done = out / "runs/kd/cnn_small_cnn_tiny/s0"
    before = (done / "summary.json").stat().st_mtime_ns
    failed = out / "runs/ce/cnn_tiny/s1"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"token": "x", "error": "RuntimeError: boom"}))
    (failed / "checkpoint.pt").write_bytes(b"not a checkpoint")  # it fails again on the cluster
    assert main(["bench", "status", str(out)]) == 0  # a folder without Slurm state: the folders
    st = capsys.readouterr().out
    assert re.search(r"kd/cnn_small_cnn_tiny/s0\s+done\s+-\s+2", st)
    assert re.search(r"ce/cnn_tiny/s1\s+failed\s+-\s+RuntimeError: boom", st)
    # held jobs stay pending: a second submission must leave them alone
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--slurm", "hold=")
    assert "resubmitting ce/cnn_tiny/s1: RuntimeError: boom" in p.stdout
    assert "submitted teacher" not in p.stdout  # the teacher was trained by the local run
    tasks = re.search(r"TASKS=\(\n(.*?)\n\)", (out / "slurm/01-runs.sh").read_text(), re.S)
    assert tasks.group(1).split() == [
        "ce/cnn_tiny/s0",
        "ce/cnn_tiny/s1",
        "kd/cnn_small_cnn_tiny/s1",
    ]
    again = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm")
    assert "0 job(s) submitted" in again.stdout and again.stdout.count("left alone:") == 3
    st = _relkd("bench", "status", out).stdout
    assert re.search(r"kd/cnn_small_cnn_tiny/s0\s+done", st)
    assert re.search(r"ce/cnn_tiny/s0\s+pending\s+\d+_0", st)
    jobs = json.loads((out / "slurm/state.json").read_text())["jobs"]
    for key in ("runs", "report"):
        subprocess.run(["scontrol", "release", jobs[key]["job_id"]], check=True)
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--wait",
               check=False)  # fmt: skip
    # Released, the array may run before this call looks: ce/cnn_tiny/s1 then has already failed
    # again (its bad checkpoint.pt is refused at once) and is resubmitted, naming the new
    # failure; nothing else is submitted either way.
    assert p.returncode == 1, p.stdout
    assert "0 job(s) submitted" in p.stdout or re.search(
        r"resubmitting ce/cnn_tiny/s1: RelkdError: run folder .* is not a relkd run", p.stdout
    ), p.stdout
    assert re.findall(r"resubmitting (\S+):", p.stdout) in ([], ["ce/cnn_tiny/s1"]), p.stdout
    assert "4 done, 1 failed" in p.stdout and "1 run(s) not finished: ce/cnn_tiny/s1" in p.stdout
    assert "RuntimeError: boom" not in p.stdout  # the new failure is shown, not the old one
    assert (done / "summary.json").stat().st_mtime_ns == before  # not trained again
    assert (out / "report.md").is_file()  # written by the report job (afterany on the array)
    assert len(_sessions(done)) == 1


BOOM = """
import os
from torch import nn


class Boom(nn.Module):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.fc = nn.Linear(in_chans * 28 * 28, num_classes)

    def forward(self, x):
        if os.environ.get("SLURM_JOB_ID") and os.environ.get("BOOM"):  # in the job only
            raise RuntimeError("boom: this teacher fails on the cluster")
        return self.fc(x.flatten(1))


def make(num_classes=10, in_chans=1):
    return Boom(num_classes, in_chans)
"""


@pytest.mark.slow
def test_a_failed_teacher_cancels_its_runs_and_the_fix_resubmits_them(
    tmp_path, fmnist_root, slurm_cluster
):
    """The teacher (a user's model given by import path) fails inside its job: Slurm cancels
    the dependent run array (``--kill-on-invalid-dep=yes``) instead of leaving it pending
    forever, ``--wait`` exits 1 naming every unfinished run, and ``relkd bench status`` shows
    the teacher failed with its error and the runs cancelled, never started, because of it.
    Run again once the teacher is fixed, the same command resubmits all three, saying why."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods/boom.py").write_text(BOOM)
    suite = _suite(tmp_path / "s.yaml", fmnist_root, methods=["kd", "dkd"], seeds=[0],
                   teachers={"boom:make": {"train": {"train": {"epochs": 1}}}},
                   pairs=[["boom:make", "cnn_tiny"]])  # fmt: skip
    out = tmp_path / "out"
    env = {"PYTHONPATH": f"{tmp_path / 'mods'}:{os.environ.get('PYTHONPATH', '')}"}
    p = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--wait",
               "--no-report", check=False, BOOM="1", **env)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    runs = ["kd/boom-make_cnn_tiny/s0", "dkd/boom-make_cnn_tiny/s0"]
    unfinished = p.stdout.strip().splitlines()[-1]
    assert unfinished.startswith("3 run(s) not finished:")
    assert all(r in unfinished for r in ["teacher/boom-make", *runs]), unfinished
    st = {r["id"]: r for r in json.loads(_relkd("bench", "status", out, "--json", **env).stdout)}
    assert st["teacher/boom-make"]["state"] == "failed"
    assert "boom: this teacher fails on the cluster" in st["teacher/boom-make"]["detail"]
    for r in runs:
        assert st[r]["state"] == "cancelled", st[r]
        assert st[r]["detail"].startswith("never started: its teacher failed"), st[r]
        assert not (out / "runs" / r / "summary.json").exists()
    again = _relkd("bench", "accuracy", suite, "--out", out, "--launcher", "slurm", "--wait",
                   "--no-report", **env)  # fmt: skip
    said = again.stdout
    assert "resubmitting teacher/boom-make: " in said and "boom: this teacher fails" in said
    for r in runs:
        assert f"resubmitting {r}: its job " in said
        assert "never ran (cancelled before it started: its teacher failed (" in said, said
    assert "3 done" in said
    assert all((out / "runs" / r / "summary.json").is_file() for r in runs)


def _docs_example() -> str:
    text = (REPO / "docs/distributed.md").read_text()
    m = re.search(r"<!-- srun-example -->\n```bash\n(.*?)```", text, re.S)
    assert m, "docs/distributed.md lost its srun example"
    return m.group(1)


@pytest.mark.slow
def test_srun_ddp_equals_torchrun(tmp_path, fmnist_root, slurm_cluster):
    """The sbatch example of docs/distributed.md (`srun relkd train CONFIG`), on one node with
    2 tasks and gloo, ends with the same student bytes as torchrun with 2 processes."""
    cfg_t = _tiny_config(fmnist_root, tmp_path / "torchrun", "ddp", sync_bn=True, progress=False)
    cfg_s = _tiny_config(fmnist_root, tmp_path / "srun", "ddp", sync_bn=True, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "relkd", "train", str(cfg_t)], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    script = _docs_example()
    script = re.sub(r"--nodes=\d+", "--nodes=1", script)
    script = re.sub(r"--ntasks-per-node=\d+", "--ntasks-per-node=2", script)
    script = re.sub(r"#SBATCH --(gpus-per-node|cpus-per-task|time|partition)=.*\n", "", script)
    script = script.replace("relkd train CONFIG", f"{PY} -m relkd train {cfg_s}")
    script = script.replace("#SBATCH --output=", f"#SBATCH --output={tmp_path}/")
    (tmp_path / "ddp.sh").write_text(script)
    jid = subprocess.run(["sbatch", "--parsable", "--wait", str(tmp_path / "ddp.sh")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert jid.returncode == 0, (jid.stdout, jid.stderr)
    a = (tmp_path / "torchrun/ddp/student.pt").read_bytes()
    b = (tmp_path / "srun/ddp/student.pt").read_bytes()
    assert a == b
    s = _sessions(tmp_path / "srun/ddp")[0]
    assert s["world_size"] == 2 and s["scheduler"]["job_id"] == jid.stdout.strip().split(";")[0]
