"""Accuracy suites: grid, validation before training, resume without redoing finished runs, claims."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import relkd
from relkd.bench import accuracy as acc
from relkd.bench import load_suite, run_suite
from relkd.claims import Claim
from relkd.registry import RelkdError


def write_suite(path: Path, fmnist_root: Path, teacher: dict, **kw) -> Path:
    suite = {
        "name": "tiny",
        "base": {
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 2,
                "max_steps_per_epoch": 2,
                "progress": False,
                "tensorboard": False,
            },
        },
        "teachers": {"cnn_small": teacher},
        "pairs": [["cnn_small", "cnn_tiny"]],
        "methods": ["ce", "kd"],
        "seeds": [0, 1],
    }
    suite.update(kw)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.fixture
def suite_file(tmp_path, fmnist_root, tiny_teacher_ckpt) -> Path:
    return write_suite(tmp_path / "tiny.yaml", fmnist_root, {"checkpoint": str(tiny_teacher_ckpt)})


class Counter:
    """Wraps relkd.train, recording (run folder name, resume) of every call."""

    def __init__(self, fail_on: int | None = None, exc: type[BaseException] = KeyboardInterrupt):
        self.calls: list[tuple[str, bool]] = []
        self.fail_on, self.exc = fail_on, exc
        self.real = relkd.train

    def __call__(self, config, **kw):
        self.calls.append((config["name"], kw.get("resume", False)))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise self.exc("simulated interruption")
        return self.real(config, **kw)


def claim_is_free(run_dir: Path) -> bool:
    """Nobody holds the run's claim (and its file is gone: released, not left behind)."""
    claim = acc.run_claim(run_dir)
    if claim.path.exists() or not claim.try_acquire():
        return False
    claim.release()
    return True


def summaries(out: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("summary.json")}


def test_grid_runs_then_resume_redoes_nothing_finished(suite_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    res = run_suite(suite_file, out, progress=False)
    # ce needs no teacher: it runs once per student, in runs/ce/<student>/
    assert [r["id"] for r in res] == [
        "ce/cnn_tiny/s0",
        "ce/cnn_tiny/s1",
        "kd/cnn_small_cnn_tiny/s0",
        "kd/cnn_small_cnn_tiny/s1",
    ]
    assert {r["status"] for r in res} == {"trained"}
    for r in res:
        run = Path(r["run_dir"])
        summary = json.loads((run / "summary.json").read_text())
        assert r["best_top1"] == summary["best_top1"]
        assert json.loads((run / "bench.json").read_text())["method"] == r["method"]
        assert claim_is_free(run)
    cfg = yaml.safe_load((out / "runs/kd/cnn_small_cnn_tiny/s1/config.yaml").read_text())
    assert cfg["train"]["seed"] == 1 and cfg["teacher"]["name"] == "cnn_small"

    # A run left with a checkpoint but no summary (interrupted after its last epoch) resumes;
    # every finished run is left alone.
    victim = out / "runs/kd/cnn_small_cnn_tiny/s0"
    old = json.loads((victim / "summary.json").read_text())
    (victim / "summary.json").unlink()
    before = summaries(out)
    counter = Counter()
    monkeypatch.setattr(relkd, "train", counter)
    res2 = run_suite(suite_file, out, progress=False)
    assert counter.calls == [("runs/kd/cnn_small_cnn_tiny/s0", True)]
    assert [r["status"] for r in res2] == ["skipped", "skipped", "resumed", "skipped"]
    after = summaries(out)
    assert all(after[k] == v for k, v in before.items()), "finished runs untouched"
    assert json.loads((victim / "summary.json").read_text())["best_top1"] == old["best_top1"]

    # Nothing left to do: no training at all.
    counter.calls.clear()
    assert {r["status"] for r in run_suite(suite_file, out, progress=False)} == {"skipped"}
    assert counter.calls == []


def test_interrupted_suite_continues_where_it_stopped(suite_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(relkd, "train", Counter(fail_on=2))
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite_file, out, progress=False)
    done = summaries(out)
    assert list(done) == ["runs/ce/cnn_tiny/s0"]
    assert all(map(claim_is_free, out.glob("runs/*/*/s*"))), "an interrupted run releases its claim"
    counter = Counter()
    monkeypatch.setattr(relkd, "train", counter)
    res = run_suite(suite_file, out, progress=False)
    assert [c[0] for c in counter.calls] == [
        "runs/ce/cnn_tiny/s1",
        "runs/kd/cnn_small_cnn_tiny/s0",
        "runs/kd/cnn_small_cnn_tiny/s1",
    ]
    assert [r["status"] for r in res] == ["skipped", "trained", "trained", "trained"]
    assert summaries(out)["runs/ce/cnn_tiny/s0"] == done["runs/ce/cnn_tiny/s0"]


def test_only_and_failures(suite_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    counter = Counter(fail_on=1, exc=RuntimeError)
    monkeypatch.setattr(relkd, "train", counter)
    res = run_suite(suite_file, out, only="kd/*", progress=False)
    assert [r["id"] for r in res] == ["kd/cnn_small_cnn_tiny/s0", "kd/cnn_small_cnn_tiny/s1"]
    # a failed run is recorded and does not stop the grid
    assert [r["status"] for r in res] == ["failed", "trained"]
    assert "simulated interruption" in res[0]["error"]
    assert (out / "runs/kd/cnn_small_cnn_tiny/s0/failed.json").is_file()
    counter = Counter()
    monkeypatch.setattr(relkd, "train", counter)
    res = run_suite(suite_file, out, only="*/s0", progress=False)  # the next call retries it
    assert [r["status"] for r in res] == ["trained", "trained"]
    assert sorted(c[0] for c in counter.calls) == [
        "runs/ce/cnn_tiny/s0",
        "runs/kd/cnn_small_cnn_tiny/s0",
    ]
    assert not (out / "runs/kd/cnn_small_cnn_tiny/s0/failed.json").exists()
    with pytest.raises(RelkdError, match="no run"):
        run_suite(suite_file, out, only="nothing/*", progress=False)


def test_teacher_trained_once_and_reused(tmp_path, fmnist_root, monkeypatch):
    teacher = {"train": {"train": {"epochs": 1}, "data": {"batch_size": 64}}}
    suite = write_suite(tmp_path / "s.yaml", fmnist_root, teacher, methods=["kd", "dkd"], seeds=[0])
    counter = Counter()
    monkeypatch.setattr(relkd, "train", counter)
    out = tmp_path / "out"
    res = run_suite(suite, out, progress=False)
    assert [c[0] for c in counter.calls] == [
        "cnn_small",
        "runs/kd/cnn_small_cnn_tiny/s0",
        "runs/dkd/cnn_small_cnn_tiny/s0",
    ]
    tcfg = yaml.safe_load((out / "teachers/cnn_small/config.yaml").read_text())
    assert tcfg["method"]["name"] == "ce" and tcfg["train"]["epochs"] == 1
    assert tcfg["data"]["batch_size"] == 64
    for r in res:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["teacher"]["checkpoint"] == str(out / "teachers/cnn_small/student.pt")
    counter.calls.clear()
    run_suite(suite, out, progress=False)
    assert counter.calls == []


def test_bad_names_fail_before_training(suite_file, tmp_path, fmnist_root, monkeypatch):
    counter = Counter(fail_on=1, exc=AssertionError)
    monkeypatch.setattr(relkd, "train", counter)
    ck = {"checkpoint": "nowhere.pt"}
    bad = write_suite(tmp_path / "bad.yaml", fmnist_root, ck, methods=["kd", "fitnez", "rrd+kdd"])
    with pytest.raises(RelkdError, match=r"unknown method\(s\): fitnez, kdd") as e:
        run_suite(bad, tmp_path / "o1", progress=False)
    assert "registered:" in str(e.value)
    assert "or your own method by its import path package.module:Name" in str(e.value)
    bad = write_suite(tmp_path / "bad2.yaml", fmnist_root, ck, pairs=[["cnn_small", "cnn_tinyy"]])
    with pytest.raises(RelkdError, match=r"unknown model.*cnn_tinyy"):
        run_suite(bad, tmp_path / "o2", progress=False)
    bad = write_suite(
        tmp_path / "bad3.yaml",
        fmnist_root,
        ck,
        methods=[{"name": "kd", "method": {"args": {"tau": 2}}}],
    )
    with pytest.raises(RelkdError, match="'kd' has no argument 'tau'"):
        run_suite(bad, tmp_path / "o3", progress=False)
    bad = write_suite(tmp_path / "bad4.yaml", fmnist_root, ck, overrides=["train.epochz=3"])
    with pytest.raises(RelkdError, match="epochz"):
        run_suite(bad, tmp_path / "o4", progress=False)
    with pytest.raises(RelkdError, match=r"teacher checkpoint.*nowhere\.pt"):
        run_suite(
            write_suite(tmp_path / "b5.yaml", fmnist_root, ck), tmp_path / "o5", progress=False
        )
    bad = tmp_path / "bad6.yaml"
    bad.write_text(suite_file.read_text() + "methodz: [kd]\n")
    with pytest.raises(RelkdError, match=r"unknown key.*methodz"):
        load_suite(bad)
    assert counter.calls == []
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
    # a dry run validates and lists, trains nothing, and tolerates a missing checkpoint
    res = run_suite(
        write_suite(tmp_path / "ok.yaml", fmnist_root, ck),
        tmp_path / "o6",
        dry_run=True,
        progress=False,
    )
    assert {r["status"] for r in res} == {"planned"} and counter.calls == []


def test_resume_refuses_a_changed_config(suite_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_suite(suite_file, out, only="kd/*/s0", progress=False)
    (out / "runs/kd/cnn_small_cnn_tiny/s0/summary.json").unlink()
    res = run_suite(suite_file, out, only="kd/*/s0", overrides=["optim.lr=0.5"], progress=False)
    assert res[0]["status"] == "failed" and "differs" in res[0]["error"]
    # machine-specific keys (data root, devices) may change
    res = run_suite(
        suite_file, out, only="kd/*/s0", overrides=["data.num_workers=0"], progress=False
    )
    assert res[0]["status"] == "resumed"


HOLD = """
import sys, time
from relkd.bench.accuracy import run_claim
assert run_claim(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_claim(run_dir: Path) -> subprocess.Popen:
    """A separate process that holds the run's claim until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(acc.__file__).parents[2])}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_claim_is_exclusive_and_taken_over_when_its_holder_is_killed(tmp_path):
    a, b = acc.run_claim(tmp_path), acc.run_claim(tmp_path)
    assert a.try_acquire()
    assert not b.try_acquire()  # a live holder keeps the run, also within one process
    a.release()
    assert b.try_acquire()
    b.release()
    holder = hold_claim(tmp_path)
    assert not a.try_acquire()
    holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the claim file stays
    holder.wait()
    assert a.try_acquire() and "is gone" in a.took_over  # its pid is gone on this host
    a.release()


def test_a_run_held_elsewhere_is_waited_for_then_run(suite_file, tmp_path, monkeypatch):
    """A second runner does not train a run another process holds; it waits, and a holder that
    dies (SIGKILL) does not block the grid: its claim is taken over and the run trained."""
    out = tmp_path / "out"
    run_dir = out / "runs/ce/cnn_tiny/s0"
    holder = hold_claim(run_dir)
    counter = Counter()
    monkeypatch.setattr(relkd, "train", counter)
    lines: list[str] = []
    real_sleep = acc.time.sleep

    def sleep(s: float) -> None:  # the runner polls: kill the holder at its first wait
        if holder.poll() is None:
            assert counter.calls == [], "a held run must not be trained"
            assert any("being run by another process" in x for x in lines)
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        real_sleep(0.01)

    monkeypatch.setattr(acc.time, "sleep", sleep)
    monkeypatch.setattr(acc, "_printer", lambda prefix="": lines.append)
    res = run_suite(suite_file, out, only="ce/*/s0")
    assert holder.returncode == -signal.SIGKILL
    assert [r["status"] for r in res] == ["trained"] and counter.calls == [
        ("runs/ce/cnn_tiny/s0", False)
    ]


def test_worker_env_round_robin():
    envs = [acc.worker_env(w, 1, ["0", "1", "2"]) for w in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "0"]
    assert envs[0]["OMP_NUM_THREADS"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in acc.worker_env(0, 2, [])


@pytest.mark.slow  # spawns two Python processes that import torch (~10 s on 2 idle cores)
def test_two_worker_processes_share_the_grid(suite_file, tmp_path):
    out = tmp_path / "out"
    res = run_suite(suite_file, out, workers=2, only="ce/*", progress=False)
    assert [r["status"] for r in res] == ["trained", "trained"]
    for r in res:
        lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, "each run trained exactly once (2 epochs)"
    assert all(claim_is_free(Path(r["run_dir"])) for r in res)


SUITES = Path(__file__).resolve().parents[1] / "benchmarks" / "suites"


@pytest.mark.parametrize(
    "name",
    [
        "fmnist-mini",
        "cifar10jpg-mini",
        "cifar10jpg-long",
        "cifar10jpg-val-study",
        "cifar100-crd",
        "imagenet",
    ],
)
def test_shipped_suites_are_valid(name):
    suite = load_suite(SUITES / f"{name}.yaml")
    acc._check_names(suite)  # every method and model is registered
    teachers, runs = acc.build_grid(suite, "out")
    assert len({r.id for r in runs}) == len(runs)
    if name == "cifar100-crd":
        assert len(suite.pairs) == 13 and suite.seeds == [0, 1, 2, 3, 4]
        assert not teachers  # released checkpoints, no teacher training
        beta = {
            (r.teacher, r.student): r.config["method"].get("args", {}).get("beta", 8.0)
            for r in runs
            if r.label == "dkd"
        }
        assert len(beta) == 13 and beta[("resnet56", "resnet20")] == 2.0
        assert beta[("vgg13", "vgg8")] == 6.0 and beta[("resnet32x4", "resnet8x4")] == 8.0
    if name.endswith("-mini") or name.startswith("cifar10jpg-"):
        assert [t.student for t in teachers] == [suite.pairs[0][0]]
        acc._validate_configs(teachers, runs[:: len(suite.seeds)])
    if name.startswith("cifar10jpg-") and not name.endswith("-mini"):
        _check_long_cifar10jpg(name, suite, teachers, runs)


def _taps(method_name: str) -> set[str]:
    from relkd.methods import METHODS

    return {t for p in method_name.split("+") for t in METHODS.get(p).teacher_taps(None)}


def _check_long_cifar10jpg(name, suite, teachers, runs):
    """The long CIFAR-10 JPEG suites (issue 17): the recipe their headers' cost arithmetic
    assumes, distinct run ids per variant, the cache settings and the method order the 2-worker
    schedule relies on."""
    (teacher,) = teachers
    assert teacher.config["train"]["epochs"] == 7 and teacher.config["data"]["train_subset"] is None
    assert suite.teacher_cache == "auto" and len(suite.seeds) == 3
    for r in runs:
        assert r.config["train"]["epochs"] == 16 and r.config["data"]["train_subset"] == 10000
        assert r.config["train"]["channels_last"] is True
        assert r.config["train"]["teacher_cache_dtype"] == "fp32"
        assert r.config["train"].get("teacher_cache") == (
            None if r.teacher is None else "auto"
        ) or (r.label.startswith("rrd-") and r.config["train"]["teacher_cache"] == "off")
    labels = list(dict.fromkeys(r.label for r in runs))
    if name == "cifar10jpg-long":
        want = {"ce", "kd", "dkd", "dist", "clkd", "cmkd", "rrd", "rrd+kd", "crd", "corsd"}
        extra = {"crd+kd", "rkd", "rrd-v5", "rrd+kd-v5"}  # -v5: the study's choice, on test
        assert want | extra == set(labels) and len(runs) == 42
        rrd = {r.label: r.config["method"]["args"] for r in runs if r.label.startswith("rrd")}
        # the recorded rows pin the preset they ran with; the -v5 rows run the new default
        assert rrd["rrd"]["version"] == rrd["rrd+kd"]["rrd"]["version"] == "v4"
        assert rrd["rrd-v5"]["version"] == rrd["rrd+kd-v5"]["rrd"]["version"] == "v5"
        assert all("val_split" not in r.config["data"] for r in runs)  # test-set table
        # logits-cache methods, then the teacher-free runs, then the pooled-feature ones
        names = list(dict.fromkeys(r.config["method"]["name"] for r in runs))
        kinds = [
            "free" if not acc._requires_teacher(m) else ("pooled" if _taps(m) else "logits")
            for m in names
        ]
        assert kinds == sorted(kinds, key=["logits", "free", "pooled"].index), labels
    else:
        assert len(runs) == 33 and len(labels) == 11
        for job in [teacher, *runs]:  # nothing trains on or evaluates anything but the split
            assert job.config["data"]["val_split"] == 0.1 and job.config["data"]["val_seed"] == 0
        sections = {r.label: r.config["method"] for r in runs}
        assert sections["clkd-default"] == {
            "name": "clkd",
            "ce_weight": 0.1,
            "args": {"corr": "class", "corr_squared": True},
        }
        assert sections["clkd-ce1"]["ce_weight"] == 1.0
        assert sections["clkd-sample"]["args"]["corr"] == "sample"
        assert sections["clkd-unsquared"]["args"]["corr_squared"] is False
        diff = {
            sections[f"cmkd-{v}"]["args"]["difficulty"] for v in ("default", "inverse", "nodiff")
        }
        assert diff == {"teacher_entropy", "teacher_entropy_inverse", "none"}
        assert sections["cmkd-sortnet"]["args"]["rank"] == "sorting_network"
        assert [sections[f"rrd-{v}"]["args"]["version"] for v in ("v4", "v5")] == ["v4", "v5"]


def test_cli_bench_accuracy(suite_file, tmp_path, capsys):
    import argparse

    from relkd.bench.cli import add_bench_parsers

    p = argparse.ArgumentParser(prog="relkd")
    sub = p.add_subparsers(dest="cmd", required=True)
    group = add_bench_parsers(sub)
    assert "accuracy" in group.choices  # `bench speed` can be added to the same group
    out = tmp_path / "out"
    cmd = ["bench", "accuracy", str(suite_file), "train.epochs=1", "--out", str(out)]
    args = p.parse_args([*cmd, "--only", "ce/*"])
    assert args.fn(args) == 0
    assert "report:" in capsys.readouterr().out
    assert (out / "report.html").is_file() and (out / "runs/ce/cnn_tiny/s1/summary.json").is_file()
    cfg = yaml.safe_load((out / "runs/ce/cnn_tiny/s0/config.yaml").read_text())
    assert cfg["train"]["epochs"] == 1
    args = p.parse_args(["bench", "accuracy", str(suite_file), "--out", str(out), "--dry-run"])
    assert args.fn(args) == 0
    text = capsys.readouterr().out
    assert "ce/cnn_tiny/s0: finished" in text and "kd/cnn_small_cnn_tiny/s0: new" in text
    args = p.parse_args(["report", str(out), "--out", str(tmp_path / "rep")])
    assert args.fn(args) == 0 and (tmp_path / "rep/report.md").is_file()


def test_suite_teacher_cache_shared_by_the_grid(
    tmp_path, fmnist_root, tiny_teacher_ckpt, monkeypatch
):
    """``teacher_cache: auto``: every distillation run reads one exact cache (built by the first
    run that needs it), teacher-free runs and suite teachers do not ask for one, a CLI override
    wins, and a bad value is refused naming the choices."""
    monkeypatch.setenv("RELKD_CACHE_DIR", str(tmp_path / "home"))
    ck = {"checkpoint": str(tiny_teacher_ckpt)}
    suite = write_suite(tmp_path / "s.yaml", fmnist_root, ck, methods=["ce", "kd", "dkd"],
                        seeds=[0], teacher_cache="auto")  # fmt: skip
    res = run_suite(suite, tmp_path / "out", progress=False)
    assert {r["status"] for r in res} == {"trained"}
    cache = {}
    for r in res:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        cache[r["method"]] = cfg["train"]["teacher_cache"]
    assert cache == {"ce": "off", "kd": "auto", "dkd": "auto"}
    (folder,) = (tmp_path / "home" / "teacher").iterdir()  # one cache for kd and dkd
    assert json.loads((folder / "manifest.json").read_text())["parts"]["taps"] == ["logits"]
    _, runs = acc.build_grid(load_suite(suite), tmp_path / "o2", ["train.teacher_cache=off"])
    assert all(j.overrides[-1] == "train.teacher_cache=off" for j in runs)
    bad = write_suite(tmp_path / "bad.yaml", fmnist_root, ck, teacher_cache="yes")
    with pytest.raises(RelkdError, match=r"teacher_cache='yes'.*off, auto"):
        load_suite(bad)
    off = write_suite(tmp_path / "off.yaml", fmnist_root, ck, teacher_cache=False)  # YAML `off`
    assert load_suite(off).teacher_cache == "off"


def test_suite_data_label_reaches_bench_json_and_the_report(suite_file, tmp_path):
    from relkd.bench import write_report

    text = suite_file.read_text() + "data_label: Gratings-10 (synthetic)\n"
    (tmp_path / "l.yaml").write_text(text)
    out = tmp_path / "out"
    run_suite(tmp_path / "l.yaml", out, only="ce/*/s0", progress=False)
    meta = json.loads((out / "runs/ce/cnn_tiny/s0/bench.json").read_text())
    assert meta["data_label"] == "Gratings-10 (synthetic)"
    md = write_report(out).read_text()
    assert "## cnn_tiny, no teacher (Gratings-10 (synthetic))" in md
    assert "Recipe: Gratings-10 (synthetic), full training set, 2 epochs, batch 32" in md


def test_eta_arithmetic():
    assert acc.eta_seconds([], 5) is None and acc.format_eta(None) == "ETA unknown"
    assert acc.eta_seconds([100.0, 200.0], 4, workers=2) == 300.0  # mean 150 x 4 left / 2
    assert acc.eta_seconds([30.0], 0) == 0.0
    assert [acc.format_eta(s) for s in (0.0, 59.0, 720.0, 5940.0, 12240.0)] == [
        "ETA 0 s",
        "ETA 59 s",
        "ETA 12 min",
        "ETA 99 min",
        "ETA 3.4 h",
    ]


def test_progress_lines_show_the_eta_from_this_invocations_runs(tmp_path, fmnist_root, monkeypatch):
    """Fake runs on a stubbed clock (60, 180, 120, 40 s): after each one the runner prints runs
    done / all and mean-so-far x runs left; a second call counts the runs finished before in
    `done` but times only its own runs."""
    suite = write_suite(
        tmp_path / "s.yaml",
        fmnist_root,
        {"checkpoint": "unused.pt"},
        pairs=[[None, "cnn_tiny"]],
        methods=["ce"],
        seeds=[0, 1, 2, 3, 4],
    )
    now = [1000.0]
    durations = iter([60.0, 180.0, 120.0, 40.0, 600.0])

    def fake_train(config, **kw):
        now[0] += next(durations)
        run_dir = Path(config["output_dir"]) / config["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({"best_top1": 1.0, "last_top1": 1.0}))
        return {"best_top1": 1.0, "last_top1": 1.0}

    monkeypatch.setattr(relkd, "train", fake_train)
    monkeypatch.setattr(acc, "_clock", lambda: now[0])
    monkeypatch.delenv("RELKD_BENCH_WORKERS", raising=False)
    lines: list[str] = []
    monkeypatch.setattr(acc, "_printer", lambda prefix="": lines.append)
    out = tmp_path / "out"
    run_suite(suite, out, only=["ce/*/s0", "ce/*/s1", "ce/*/s2", "ce/*/s3"])
    eta = [x for x in lines if "finished;" in x]
    assert eta == [
        "[0/4] finished; ETA unknown",
        "[1/4] finished; ETA 3 min (mean 60.0 s over 1 run(s) here)",  # 60 x 3
        "[2/4] finished; ETA 4 min (mean 120.0 s over 2 run(s) here)",  # 120 x 2
        "[3/4] finished; ETA 2 min (mean 120.0 s over 3 run(s) here)",  # 120 x 1
        "[4/4] finished; ETA 0 s (mean 100.0 s over 4 run(s) here)",
    ]
    assert any("done in 180.0 s" in x for x in lines)  # the same clock times the run lines
    lines.clear()
    run_suite(suite, out)  # s0..s3 finished before: only s4 (600 s) is timed by this call
    assert [x for x in lines if "finished;" in x] == [
        "[4/5] finished; ETA unknown",
        "[5/5] finished; ETA 0 s (mean 600.0 s over 1 run(s) here)",
    ]
    # A pool worker divides by the number of workers sharing the grid.
    prog = acc._Progress(acc.build_grid(load_suite(suite), tmp_path / "o2")[1], "t", workers=2)
    prog.run_times = [100.0, 200.0]
    assert prog.line() == "[0/5] finished; ETA 6 min (mean 150.0 s over 2 run(s) here, 2 workers)"


HOLD_FILES = """
import sys, time
from relkd.claims import Claim
claims = [Claim(p) for p in sys.argv[1:]]
assert all(c.try_acquire() for c in claims)
print("held", flush=True)
time.sleep(600)
"""


def hold_files(*paths: Path) -> subprocess.Popen:
    """A separate process that holds claims on ``paths`` until it is killed."""
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(acc.__file__).parents[2])}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_FILES, *map(str, paths)], stdout=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    assert p.stdout.readline().strip() == "held"
    return p


def _cached_grid(tmp_path, fmnist_root, tiny_teacher_ckpt, methods, overrides=()):
    ck = {"checkpoint": str(tiny_teacher_ckpt)}
    suite = write_suite(tmp_path / "c.yaml", fmnist_root, ck, methods=methods, seeds=[0],
                        teacher_cache="auto")  # fmt: skip
    return acc.build_grid(load_suite(suite), tmp_path / "out", overrides)[1]


def test_cache_groups_follow_the_teacher_taps(tmp_path, fmnist_root, tiny_teacher_ckpt):
    """Runs that read one teacher cache (same teacher, data, taps) share a group; teacher-free
    runs and runs with the cache off have none."""
    methods = ["ce", "kd", "dkd", "rkd", "crd", "rrd+kd",
               {"name": "kd-online", "method": {"name": "kd"},
                "config": {"train": {"teacher_cache": "off"}}}]  # fmt: skip
    runs = {j.label: j.cache_group for j in _cached_grid(tmp_path, fmnist_root,
                                                        tiny_teacher_ckpt, methods)}  # fmt: skip
    assert runs["ce"] is None and runs["kd-online"] is None
    assert runs["kd"] == runs["dkd"] and runs["rkd"] == runs["crd"] == runs["rrd+kd"]
    assert runs["kd"] != runs["rkd"] and runs["kd"].parent == tmp_path / "out" / ".locks"
    off = _cached_grid(
        tmp_path, fmnist_root, tiny_teacher_ckpt, ["kd"], ["train.teacher_cache=off"]
    )
    assert [j.cache_group for j in off] == [None]


def _fake_execute(order, held_by_us):
    def execute(job, token, quiet, say, claim=None):
        order.append(job.label)
        assert claim is not None and claim.holds()  # the run's own claim
        if job.cache_group is not None and not any(held_by_us):
            held_by_us.append(job.label)  # the group's first run holds the group claim
            assert not Claim(job.cache_group).try_acquire()
        (job.run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
        (job.run_dir / "summary.json").write_text('{"best_top1": 1.0, "last_top1": 1.0}')
        return acc._result(job, "trained", elapsed_s=0.0, error=None)

    return execute


def test_runs_of_a_cache_being_built_elsewhere_wait_behind_other_work(
    tmp_path, fmnist_root, tiny_teacher_ckpt, monkeypatch
):
    """With the first run of a cache group held by another worker (which builds the cache), a
    worker runs the other jobs first instead of blocking in the cache's build claim, polls when
    only those runs are left, and runs them once the holder is gone; the first run it then
    claims holds the group claim itself."""
    jobs = _cached_grid(tmp_path, fmnist_root, tiny_teacher_ckpt, ["kd", "dkd", "ce"])
    holder = hold_files(jobs[0].cache_group)
    order: list[str] = []
    lines: list[str] = []
    monkeypatch.setattr(acc, "_execute", _fake_execute(order, []))

    def sleep(s: float) -> None:
        if holder.poll() is None:
            assert order == ["ce"], "only the run outside the group may run meanwhile"
            assert sum("another process is building" in x for x in lines) == 1, lines
            holder.send_signal(signal.SIGKILL)
            holder.wait()

    monkeypatch.setattr(acc.time, "sleep", sleep)
    res = list(acc._work(jobs, "tok", True, lines.append))
    assert holder.returncode == -signal.SIGKILL
    assert order == ["ce", "kd", "dkd"] and [r["status"] for r in res] == ["trained"] * 3


def test_a_started_cache_group_is_not_waited_for(
    tmp_path, fmnist_root, tiny_teacher_ckpt, monkeypatch
):
    """Once a run of the group is through an epoch (its cache exists), the other runs of the
    group go ahead although the group's first run is still held elsewhere."""
    jobs = _cached_grid(tmp_path, fmnist_root, tiny_teacher_ckpt, ["kd", "dkd"])
    kd = jobs[0]
    holder = hold_files(kd.cache_group, kd.run_dir / ".relkd.claim")
    (kd.run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    order: list[str] = []
    monkeypatch.setattr(acc, "_execute", _fake_execute(order, ["kd"]))

    def sleep(s: float) -> None:
        if holder.poll() is None:
            assert order == ["dkd"]
            holder.send_signal(signal.SIGKILL)
            holder.wait()

    monkeypatch.setattr(acc.time, "sleep", sleep)
    list(acc._work(jobs, "tok", True, lambda m: None))
    assert order == ["dkd", "kd"]


def test_resume_check_ignores_keys_added_at_their_default(suite_file, tmp_path):
    """A run folder written before a config key existed (here ``train.ema_decay``) is not
    "changed" while the suite leaves that key at its default; a real change still is."""
    from relkd.bench.accuracy import _config_changed
    from relkd.bench.suite import build_grid
    from relkd.config import load_config, to_yaml

    _, runs = build_grid(load_suite(suite_file), tmp_path / "out")
    job = runs[0]
    job.run_dir.mkdir(parents=True)
    cfg = yaml.safe_load(to_yaml(load_config(job.config, job.overrides)))
    assert cfg["train"].pop("ema_decay") == 0.0  # off; an older relkd wrote no such key
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert not _config_changed(job)
    cfg["optim"]["lr"] = cfg["optim"]["lr"] * 2
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert _config_changed(job)


def test_suite_overrides_read_yes_as_a_config_file_does(tmp_path, fmnist_root):
    """A suite's ``overrides:`` reach a suite teacher's run as a config file reads them:
    ``student.kwargs.flag=yes`` is the string ``yes`` (OmegaConf's dotlist made it True)."""
    teacher = {"train": {"train": {"epochs": 1}}}
    suite = write_suite(tmp_path / "s.yaml", fmnist_root, teacher, methods=["kd"], seeds=[0],
                        overrides=["student.kwargs.flag=yes", "train.seed=3"])  # fmt: skip
    teachers, _ = acc.build_grid(load_suite(suite), tmp_path / "out", ["student.kwargs.n=off"])
    (job,) = teachers
    assert job.config["student"]["kwargs"] == {"flag": "yes", "n": "off"}
    assert job.config["train"]["seed"] == 3
