"""Claims on shared file systems (relkd.claims): exclusion, heartbeat, takeover, fencing.

Cross-node semantics are simulated on one machine with an LD_PRELOAD shim (compiled here with
gcc) that makes every flock / fcntl / lockf lock succeed, as on an NFS mount with local locks or
Lustre without ``-o flock``: whatever excludes workers there is the claim protocol, not the OS.
Two layers: light worker processes that run the grid runner's real loop
(``relkd.bench.accuracy._work``) and the real claims, with a stand-in for ``relkd.train`` that
writes a run folder's files the way the engine does (fenced by the run claim, atomically; they
load relkd's modules without the package ``__init__``: ~0.2 s a process), and the real
``relkd bench accuracy`` CLI (the slow tests below), 20 rounds of 2 and 4 workers included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import relkd
from relkd import claims
from relkd.claims import Claim, ClaimLost
from relkd.registry import RelkdError

SRC = Path(relkd.__file__).resolve().parents[1]

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/file.h>
#include <sys/types.h>
#include <unistd.h>

/* Every OS file lock "succeeds" without excluding anyone (node-local locks on a shared FS). */
int flock(int fd, int op) { (void)fd; (void)op; return 0; }
int lockf(int fd, int cmd, off_t len) { (void)fd; (void)cmd; (void)len; return 0; }

static int is_lock(int cmd) {
    return cmd == F_SETLK || cmd == F_SETLKW
#ifdef F_OFD_SETLK
        || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW
#endif
        ;
}

typedef int (*fcntl_fn)(int, int, ...);

static int forward(const char *name, int fd, int cmd, void *arg) {
    fcntl_fn real = (fcntl_fn)dlsym(RTLD_NEXT, name);
    if (!real) real = (fcntl_fn)dlsym(RTLD_NEXT, "fcntl");
    return real(fd, cmd, arg);
}

int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return is_lock(cmd) ? 0 : forward("fcntl", fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    return is_lock(cmd) ? 0 : forward("fcntl64", fd, cmd, arg);
}
"""

HOLD_OS_LOCK = """
import sys, time
from filelock import FileLock, Timeout
lock = FileLock(sys.argv[1])  # kept referenced: a collected FileLock releases
try:
    lock.acquire(timeout=0)
    print("got", flush=True)
except Timeout:
    print("refused", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(scope="session")
def oslock_shim(tmp_path_factory) -> Path:
    """The shared object that makes OS file locks succeed in every process it is preloaded in."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the LD_PRELOAD lock shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM_C)
    r = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O1", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
        capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"the lock shim does not build here: {r.stderr.strip().splitlines()[-1:]}")
    return d / "shim.so"


def _env(shim: Path | None = None, stale: float | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **extra}
    if shim is not None:
        env["LD_PRELOAD"] = str(shim)
    if stale is not None:
        env[claims.STALE_ENV] = str(stale)
    return env


def test_the_shim_makes_os_locks_useless(oslock_shim, tmp_path):
    """Without the shim a second process is refused filelock's lock; with it both 'hold' it:
    the situation of two nodes on a mount whose locks are node-local."""
    lock = tmp_path / "x.lock"
    answers = []
    for shim in (None, oslock_shim):
        procs = []
        for _ in range(2):  # the first answers (and holds the lock) before the second starts
            p = subprocess.Popen(
                [sys.executable, "-c", HOLD_OS_LOCK, str(lock), "30"],
                stdout=subprocess.PIPE, text=True, env=_env(shim),
            )  # fmt: skip
            procs.append((p, p.stdout.readline().strip()))
        answers.append([answer for _, answer in procs])
        for p, _ in procs:
            p.kill()
            p.wait()
    assert answers == [["got", "refused"], ["got", "got"]]


# ----------------------------------------------------------------------------- in-process
def test_claim_record_heartbeat_and_exclusion(tmp_path, monkeypatch):
    monkeypatch.setenv(claims.STALE_ENV, "0.6")
    a = Claim(tmp_path / "c.claim", what="thing")
    assert a.try_acquire() and a.took_over is None
    rec = claims.read_record(a.path)
    assert rec["host"] == os.uname().nodename and rec["pid"] == os.getpid()
    assert rec["token"] == a.token and len(a.token) == 32 and rec["what"] == "thing"
    assert abs(rec["start"] - time.time()) < 5 and rec["stale_s"] == 0.6
    beats = rec["beat"]
    time.sleep(0.5)  # heartbeat every stale_s / 6 = 0.1 s
    assert claims.read_record(a.path)["beat"] >= beats + 2
    b = Claim(tmp_path / "c.claim")
    time.sleep(0.8)
    assert not b.try_acquire()  # a live holder (this process) keeps it however long
    assert claims.held(a.path) is a
    a.check("writing")  # still ours: no exception
    a.release()
    assert not a.path.exists() and claims.held(a.path) is None
    assert b.try_acquire()
    b.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_staleness_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(claims.STALE_ENV, "soon")
    with pytest.raises(RelkdError, match=r"RELKD_CLAIM_STALE_S='soon' is not a positive number"):
        Claim("x")


def _foreign_claim(path: Path, host: str = "node-b", age: float = 0.0) -> bytes:
    """A claim file as a worker on another node writes it (its pid means nothing here)."""
    rec = {"relkd_claim": 1, "host": host, "pid": 1, "start": time.time() - age,
           "stale_s": 1.0, "token": "f" * 32, "what": "x"}  # fmt: skip
    data = json.dumps(rec).encode() + b"\nbeat " + b"0" * 20 + b"\n"
    path.write_bytes(data)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return data


def test_a_remote_claim_is_taken_over_only_after_the_staleness_timeout(tmp_path, monkeypatch):
    """Another node's claim: fresh by the file system's clock, so it is waited for; once seen
    unchanged for stale_s (this process's monotonic clock) it is taken over. An old one (mtime
    older than stale_s by the file system's clock) is taken over at first sight."""
    monkeypatch.setenv(claims.STALE_ENV, "1")
    path = tmp_path / "c.claim"
    _foreign_claim(path)
    c = Claim(path)
    t0 = time.monotonic()
    while not c.try_acquire():
        assert time.monotonic() - t0 < 10
        time.sleep(0.1)
    assert time.monotonic() - t0 >= 1.0 and "not refreshed for" in c.took_over
    assert claims.read_record(path)["token"] == c.token
    c.release()
    path2 = tmp_path / "d.claim"
    _foreign_claim(path2, age=30)
    d = Claim(path2)
    assert d.try_acquire() and "by the file system's clock" in d.took_over
    d.release()


def test_a_refreshed_claim_is_put_back_not_taken(tmp_path, monkeypatch):
    """A taker that judged a claim stale but finds it changed after renaming it away (a beat
    landed in between) links it back and backs off; the holder keeps its claim."""
    monkeypatch.setenv(claims.STALE_ENV, "60")
    holder = Claim(tmp_path / "c.claim")
    assert holder.try_acquire()
    judged = holder.path.read_bytes()
    holder._beat()  # the beat the taker did not see
    taker = Claim(tmp_path / "c.claim")
    assert taker._take_over(judged) is False
    assert claims.read_record(holder.path)["token"] == holder.token
    holder.check("writing")
    holder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_fencing_stops_a_holder_whose_claim_was_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv(claims.STALE_ENV, "60")
    a = Claim(tmp_path / "c.claim", what="run folder R")
    assert a.try_acquire()
    judged = a.path.read_bytes()
    a._stop.set()  # as if this process were paused: no more beats
    b = Claim(tmp_path / "c.claim")
    assert b._take_over(judged)  # what a taker does once it judged the claim stale
    with pytest.raises(ClaimLost) as e:
        a.check("writing the checkpoint")
    msg = str(e.value)
    assert "lost its claim on run folder R" in msg and f"pid {os.getpid()}" in msg
    assert "stopping before writing the checkpoint" in msg and "\n" not in msg
    assert isinstance(e.value, RelkdError)
    a.release()  # never removes the new holder's claim
    assert claims.read_record(b.path)["token"] == b.token
    b.release()


# ----------------------------------------------------------- light workers: the real loop
WORKER = r"""
import json, os, sys, time, types
from pathlib import Path
src, out, journal, n_runs, epochs, mode = sys.argv[1:7]
pkg = types.ModuleType("relkd"); pkg.__path__ = [os.path.join(src, "relkd")]
sys.modules["relkd"] = pkg  # the package __init__ (torch) is not needed by the runner loop
from relkd import claims
from relkd.bench import accuracy as acc
from relkd.bench.suite import Job

out = Path(out)
log = open(journal, "a")
go = out / "go"
while not go.exists():  # start together
    time.sleep(0.002)


def write(claim, run_dir, name, text, action):
    claim.check(action)  # as RunFolder fences each write
    tmp = run_dir / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / name)
    log.write(f"{run_dir.relative_to(out)}\t{name}\n")
    log.flush()


def train(config, overrides=(), resume=False, quiet=True):
    run_dir = Path(config["run_dir"])
    claim = claims.held(run_dir / claims.RUN_CLAIM)  # the runner's, as RunFolder takes it
    write(claim, run_dir, "config.yaml", "x", "writing config.yaml")
    lines = ""
    hold = mode == "hold" and run_dir.parent.name == "runs"  # the teacher trains normally
    n = 10**6 if hold else int(epochs)
    for epoch in range(n):
        time.sleep(0.01)
        write(claim, run_dir, "checkpoint.pt", str(epoch), "writing the checkpoint")
        lines += json.dumps({"epoch": epoch}) + "\n"
        write(claim, run_dir, "metrics.jsonl", lines, "writing the metrics line")
        if hold:
            print("idle", epoch, flush=True)
            time.sleep(0.5)  # paused here by the test (SIGSTOP)
    write(claim, run_dir, "student.pt", "w", "exporting the student")
    write(claim, run_dir, "summary.json", '{"best_top1": 1.0, "last_top1": 1.0}', "writing summary.json")
    log.write(f"{run_dir.relative_to(out)}\tTRAINED\n")
    log.flush()
    return {"best_top1": 1.0, "last_top1": 1.0}


pkg.train = train
acc._config_changed = lambda job: False
teacher = Job(id="teacher", kind="teacher", run_dir=out / "teachers/t",
              config={"run_dir": str(out / "teachers/t")}, overrides=[], student="t")
jobs = [teacher] + [
    Job(id=f"r{i}", kind="run", run_dir=out / f"runs/r{i}", config={"run_dir": str(out / f"runs/r{i}")},
        overrides=[], index=i + 1, total=int(n_runs), label=f"r{i}", needs="teacher")
    for i in range(int(n_runs))
]
try:
    for _ in acc._work(jobs, "tok", True, lambda m: None, poll_s=0.02):
        pass
except claims.ClaimLost as e:
    print("LOST", e, flush=True)
    sys.exit(3)
"""


def _start_worker(out: Path, journal: Path, shim: Path, stale: float, n_runs: int, mode="run"):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(SRC), str(out), str(journal), str(n_runs), "3", mode],
        env=_env(shim, stale), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _writers(out: Path) -> dict[tuple[str, str], list[str]]:
    """(run, file) -> the journals (one per process) that wrote it, one entry per write."""
    seen: dict[tuple[str, str], list[str]] = {}
    for j in sorted(out.glob("journal-*")):
        for line in j.read_text().splitlines():
            run, name = line.split("\t")
            seen.setdefault((run, name), []).append(j.name)
    return seen


@pytest.mark.slow  # 20 x (2 or 4) light processes: ~6 s of CPU, ~20 s wall on 2 busy cores
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_started_together_train_every_run_exactly_once(oslock_shim, tmp_path, workers):
    """20 times: ``workers`` processes start the same grid (a teacher + 6 runs) at the same
    instant with OS locks that exclude nothing; every run (and the teacher) is trained exactly
    once, and every file of a run folder is written by one process only."""
    n_runs, reps = 6, 20
    expected = {"teachers/t"} | {f"runs/r{i}" for i in range(n_runs)}
    for rep in range(reps):
        out = tmp_path / f"rep{rep}"
        out.mkdir()
        procs = [
            _start_worker(out, out / f"journal-{w}", oslock_shim, 30, n_runs)
            for w in range(workers)
        ]
        (out / "go").touch()
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        seen = _writers(out)
        trained = {run: ws for (run, name), ws in seen.items() if name == "TRAINED"}
        assert set(trained) == expected and all(len(ws) == 1 for ws in trained.values()), rep
        for (run, name), ws in seen.items():
            assert len(set(ws)) == 1, f"rep {rep}: {run}/{name} written by {sorted(set(ws))}"
        assert len(seen[("runs/r0", "metrics.jsonl")]) == 3  # three epochs, one writer
        assert not list(out.rglob(".relkd.claim*")), "every claim released"


def test_a_paused_worker_loses_its_claim_and_stops_without_writing(oslock_shim, tmp_path):
    """A worker holding a run is paused (SIGSTOP) past the staleness timeout; another worker
    takes the run over and finishes it; resumed (SIGCONT), the first stops with one line
    and leaves every file of the run folder as the second wrote it."""
    stale = 1.0
    out = tmp_path / "out"
    out.mkdir()
    (out / "go").touch()
    a = _start_worker(out, out / "journal-a", oslock_shim, stale, 1, mode="hold")
    try:
        assert a.stdout.readline().startswith("idle 0")  # teacher done, r0 claimed and written
        assert a.stdout.readline().startswith("idle 1")
        a.send_signal(signal.SIGSTOP)  # while it sleeps between two writes
        t_stop = time.monotonic()
        b = _start_worker(out, out / "journal-b", oslock_shim, stale, 1)
        _, err = b.communicate(timeout=60)
        assert b.returncode == 0, err
        assert time.monotonic() - t_stop >= stale  # not before the timeout
        run = out / "runs/r0"
        snap = {p.name: p.read_bytes() for p in run.iterdir()}
        assert json.loads(snap["summary.json"])["best_top1"] == 1.0
        a.send_signal(signal.SIGCONT)
        a_out, a_err = a.communicate(timeout=60)
    finally:
        a.kill()
    assert a.returncode == 3, a_err
    line = [x for x in a_out.splitlines() if x.startswith("LOST")]
    assert len(line) == 1 and "lost its claim on run folder" in line[0]
    assert "stopping before writing the checkpoint" in line[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == snap
    seen = _writers(out)
    assert seen[("runs/r0", "TRAINED")] == ["journal-b"]
    assert seen[("runs/r0", "metrics.jsonl")].count("journal-a") == 2  # before the pause only


# ------------------------------------------------------------------ the real CLI (slow)
def _suite(path: Path, fmnist_root: Path, teacher: dict, methods, seeds, epochs=2, **kw) -> Path:
    suite = {
        "name": "tiny",
        "base": {
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "schedule": {"name": "constant"},
            "train": {"epochs": epochs, "max_steps_per_epoch": 2, "progress": False,
                      "tensorboard": False},
        },
        "teachers": {"cnn_small": teacher},
        "pairs": [["cnn_small", "cnn_tiny"]],
        "methods": methods,
        "seeds": seeds,
        **kw,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _cli(suite: Path, out: Path, shim: Path | None, stale: float, *extra: str, **env: str):
    cmd = [sys.executable, "-m", "relkd", "bench", "accuracy", str(suite), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--no-report", *extra], env=_env(shim, stale, **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


ZYGOTE = r"""
import json, os, sys, time
from pathlib import Path

import relkd.cli  # relkd and torch imported once; every round runs in a fresh fork of this
from relkd import claims

argv, base, w, reps = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for rep in range(reps):
    out = base / f"rep{rep}"
    while not (out / "go").exists():  # all workers of a round start together
        time.sleep(0.002)
    pid = os.fork()
    if pid == 0:  # the round's worker: `relkd bench accuracy ...` through the CLI's entry point
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(out / f"w{w}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        journal = open(out / f"journal-{w}", "a")
        real = claims.Claim.check

        def check(self, action="writing", _real=real):  # every fenced write, journaled
            _real(self, action)
            journal.write(f"{self.path}\t{action}\n")
            journal.flush()

        claims.Claim.check = check
        try:
            rc = relkd.cli.main([*argv, "--out", str(out)])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    _, status = os.waitpid(pid, 0)
    (out / f".done-{w}").write_text(str(os.waitstatus_to_exitcode(status)))
    os.replace(out / f".done-{w}", out / f"done-{w}")  # seen whole or not at all
"""


@pytest.mark.slow  # 20 rounds x (2 + 4) CLI workers: ~2-3 min on 2 cores
@pytest.mark.parametrize("workers", [2, 4])
def test_cli_workers_started_together_20_times_train_each_run_once(
    oslock_shim, tmp_path, fmnist_root, workers
):
    """The issue's acceptance as written, through the CLI: 20 times, ``workers`` processes run
    ``relkd bench accuracy SUITE --out SAME`` on one tiny suite (a teacher, ce / kd / dkd sharing
    a teacher cache), started at the same instant, with OS locks that exclude nothing. Each round's
    workers are fresh processes (forks of one interpreter per worker that imported relkd and
    torch once, so a round costs no imports) calling the CLI's entry point with the same argv as
    the console command. Every round: the teacher and each run trained exactly once (one session,
    one metrics line per epoch), the workers' tallies add up to the grid, the teacher cache built
    once, no claim left behind, and every fenced write (checkpoint, metrics, summary, student,
    cache commit: each ``Claim.check``, journaled per worker) made by a single worker."""
    teacher = {"train": {"train": {"epochs": 1}}}
    suite = _suite(tmp_path / "s.yaml", fmnist_root, teacher, ["ce", "kd", "dkd"], [0],
                   teacher_cache="auto")  # fmt: skip
    spec = yaml.safe_load(suite.read_text())
    spec["base"]["data"]["augment"] = False  # a cache of one outcome per image: built in ~1 s
    suite.write_text(yaml.safe_dump(spec, sort_keys=False))
    reps = int(os.environ.get("RELKD_TEST_REPS", "20"))
    argv = ["bench", "accuracy", str(suite), "--no-report", "--verbose"]
    zygotes = [
        subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, json.dumps(argv), str(tmp_path), str(w), str(reps)],
            env=_env(oslock_shim, 30, RELKD_CACHE_DIR=str(tmp_path / "home")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    try:
        for rep in range(reps):
            out = tmp_path / f"rep{rep}"
            out.mkdir()
            shutil.rmtree(tmp_path / "home", ignore_errors=True)  # each round builds its cache
            (out / "go").touch()
            deadline = time.monotonic() + 300
            while not all((out / f"done-{w}").exists() for w in range(workers)):
                # a worker that ended before this round's done file is a crash (after the last
                # round's done file it ends normally: not one)
                dead = [z for w, z in enumerate(zygotes)
                        if z.poll() is not None and not (out / f"done-{w}").exists()]  # fmt: skip
                assert not dead, dead[0].communicate()
                assert time.monotonic() < deadline, f"round {rep} did not finish"
                time.sleep(0.05)
            errs = {w: (out / f"w{w}.err").read_text() for w in range(workers)}
            rcs = [int((out / f"done-{w}").read_text()) for w in range(workers)]
            assert rcs == [0] * workers, (rep, rcs, errs)
            last = [
                (out / f"w{w}.out").read_text().strip().splitlines()[-1] for w in range(workers)
            ]
            tallies = [re.search(r"suite tiny in \d+ s: (.*)$", x) for x in last]
            assert all(tallies), (rep, last)
            counts = [dict(reversed(x.split(" ")) for x in t.group(1).split(", ")) for t in tallies]
            assert sum(int(c.get("trained", 0)) for c in counts) == 3, (rep, last)
            folders = [out / "teachers/cnn_small", *sorted(out.glob("runs/*/*/s*"))]
            assert len(folders) == 4, rep
            for f in folders:
                sessions = json.loads((f / "run.json").read_text())["sessions"]
                assert [s["kind"] for s in sessions] == ["start"], (rep, f)
                lines = (f / "metrics.jsonl").read_text().splitlines()
                assert len(lines) == (1 if "teachers" in str(f) else 2), (rep, f)
            assert not list(out.rglob(".relkd.claim*")), rep
            builds = [
                x for e in errs.values() for x in e.splitlines() if "teacher cache: building" in x
            ]
            assert len(builds) == 1, (rep, builds)
            writers: dict[tuple[str, str], set[str]] = {}
            for j in out.glob("journal-*"):
                for line in j.read_text().splitlines():
                    writers.setdefault(tuple(line.split("\t")), set()).add(j.name)
            assert writers, "no fenced write was journaled"
            shared = {k: v for k, v in writers.items() if len(v) > 1}
            assert not shared, f"round {rep}: written by two workers: {shared}"
            touched = {Path(k[0]).parent for k in writers}
            assert set(folders) <= touched, rep  # every folder's writes were seen
    finally:
        for z in zygotes:
            z.kill()
            z.wait()


def _safetensors(path: Path) -> tuple[dict, bytes]:
    """(parsed header, tensor bytes) of a .safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if len(path.read_text().splitlines()) >= n:
                return
        except OSError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {n} lines")


@pytest.mark.slow  # three real CLI processes
def test_cli_a_killed_holder_on_another_node_is_taken_over_and_resumed_exactly(
    oslock_shim, tmp_path, fmnist_root, tiny_teacher_ckpt
):
    """A worker is SIGKILLed mid-run; its claim (made to look like another node's, so no pid
    check applies) is taken over once stale, the run resumes from the checkpoint and ends with
    the same student bytes as an uninterrupted run."""
    suite = _suite(tmp_path / "s.yaml", fmnist_root, {"checkpoint": str(tiny_teacher_ckpt)},
                   ["kd"], [0], epochs=5)  # fmt: skip
    ref = _cli(suite, tmp_path / "ref", None, 30)
    a = _cli(suite, tmp_path / "out", oslock_shim, 2)
    run = tmp_path / "out/runs/kd/cnn_small_cnn_tiny/s0"
    try:
        _wait_for_lines(run / "metrics.jsonl", 2, a)
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
    claim = run / claims.RUN_CLAIM
    data = claim.read_bytes()
    head, rest = data.split(b"\n", 1)
    rec = json.loads(head)
    rec["host"] = "node-b"  # a dead holder on another node: only staleness can free the run
    claim.write_bytes(json.dumps(rec, sort_keys=True).encode() + b"\n" + rest)
    b = _cli(suite, tmp_path / "out", oslock_shim, 2, "--verbose")
    b_out, b_err = b.communicate(timeout=300)
    assert b.returncode == 0, b_err
    # Judged by the file system's clock at first sight (B's start takes longer than 2 s), or
    # after watching it unchanged for 2 s: either way not by a pid check (host is node-b).
    taken = [x for x in b_out.splitlines() if "taken over from a stale claim" in x]
    assert len(taken) == 1 and "pid" not in taken[0], b_out
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    ref_run = tmp_path / "ref/runs/kd/cnn_small_cnn_tiny/s0"
    sessions = json.loads((run / "run.json").read_text())["sessions"]
    assert [s["kind"] for s in sessions] == ["start", "resume"]
    assert (run / "student.pt").read_bytes() == (ref_run / "student.pt").read_bytes()
    # safetensors: the tensor bytes are identical; its header is a JSON object whose key order
    # the library leaves to a hash map (it differs between processes), so it is compared parsed.
    (h1, d1), (h2, d2) = (_safetensors(d / "student.safetensors") for d in (run, ref_run))
    assert h1 == h2 and d1 == d2
    s, r = (json.loads((d / "summary.json").read_text()) for d in (run, ref_run))
    assert (s["best_top1"], s["last_top1"]) == (r["best_top1"], r["last_top1"])


@pytest.mark.slow  # two real CLI processes
def test_cli_a_paused_worker_stops_without_writing(oslock_shim, tmp_path, fmnist_root,
                                                    tiny_teacher_ckpt):  # fmt: skip
    """The real CLI: a worker paused (SIGSTOP) past the timeout loses its run to a second
    worker, which finishes it; after SIGCONT the first exits 2 with one line and the run
    folder is as the second left it."""
    suite = _suite(tmp_path / "s.yaml", fmnist_root, {"checkpoint": str(tiny_teacher_ckpt)},
                   ["kd"], [0], epochs=12)  # fmt: skip
    out = tmp_path / "out"
    a = _cli(suite, out, oslock_shim, 2)
    run = out / "runs/kd/cnn_small_cnn_tiny/s0"
    try:
        _wait_for_lines(run / "metrics.jsonl", 1, a)
        a.send_signal(signal.SIGSTOP)  # just after an epoch's writes: the next are an epoch away
        b = _cli(suite, out, oslock_shim, 2)
        _, b_err = b.communicate(timeout=300)
        assert b.returncode == 0, b_err
        snap = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        assert len(json.loads(snap["run.json"])["sessions"]) == 2
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 2, a_err
    lines = [x for x in a_err.splitlines() if "lost its claim" in x]
    assert len(lines) == 1 and "stopping before" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == snap
