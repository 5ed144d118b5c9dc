"""Accuracy benchmark suites: methods x (teacher, student) pairs x seeds, resumable and shareable.

This module runs a suite's grid; :mod:`relkd.bench.suite` defines the YAML format, checks it and
expands it into jobs (its names are re-exported here).

Resuming and sharing: a run folder with ``summary.json`` is finished and never redone; one with a
checkpoint but no summary is resumed (``relkd.train(..., resume=True)``); otherwise the run starts
fresh. A run is claimed with a :mod:`relkd.claims` claim on ``<run>/.relkd.claim`` (an exclusive
create refreshed by a heartbeat; no OS lock, which would not exclude across the nodes of a
shared file system), so several ``relkd bench accuracy`` processes (``workers=N`` starts N of
them, or invocations on other machines sharing the folder) can work through one grid: a run held
by another live process is waited for, never trained twice. A claim whose holder is gone (a
SIGKILLed worker on this host at once; elsewhere after ``RELKD_CLAIM_STALE_S`` seconds without a
heartbeat) is taken over and the run resumed from its checkpoint; a worker whose claim was taken
over stops before its next write (:class:`relkd.claims.ClaimLost`). ``relkd.train`` in the same
process uses the runner's claim for the run folder. A run that fails is recorded in
``<run>/failed.json`` and not retried by the same invocation; the next invocation retries it.

Progress: after every job it finishes, a runner prints ``[ 7/66] finished; ETA 12 min (...)``:
runs of the selected grid done (finished by anyone, or failed in this invocation) out of all, and
the time left estimated as mean wall time of the runs *this process* finished in this invocation
x runs left / workers (``ETA unknown`` until the first). Teachers still to train and runs resumed
from a checkpoint (shorter) are not modelled, so the estimate is rough early on.

Teacher reuse: a teacher is trained once per suite output folder and read by every run. With
``teacher_cache: auto`` in the suite, every distillation run also sets ``train.teacher_cache=auto``:
the exact teacher-output cache (:mod:`relkd.data.teacher_cache`) is keyed by teacher, data,
transform and taps, so the first run that needs it builds it (under a claim beside the cache:
concurrent workers wait instead of building twice) and every later method and seed of that teacher reads
it. It pays when the grid's online teacher passes outnumber the K augmentation outcomes per
image (162 on CIFAR): yes for 240-epoch tables, not for 3-epoch CPU mini-suites. Runs that read
one cache form a group; while another process runs a group's first run (and so probably builds
its cache) and no run of the group is through an epoch yet, a worker runs other jobs of the grid
first and comes back to the group's runs, instead of idling in the build claim; with nothing else
left it polls until the cache is there.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from relkd.bench.suite import (  # noqa: F401  (public names and those tests use stay importable here)
    _ENV_KEYS,
    SUITE_KEYS,
    Job,
    MethodEntry,
    Suite,
    TeacherSpec,
    _check_names,
    _read_json,
    _requires_teacher,
    _select,
    _validate_configs,
    _write_json,
    build_grid,
    load_suite,
    parse_suite,
)
from relkd.claims import RUN_CLAIM, Claim, ClaimLost, describe, read_record
from relkd.registry import RelkdError


# ------------------------------------------------------------------------------------ running
def run_claim(run_dir: Path) -> Claim:
    """The claim on a run folder (``<run>/.relkd.claim``), held while the run trains; the
    run folder's own one-writer rule (``relkd.train``) uses the same claim."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Claim(Path(run_dir) / RUN_CLAIM, what=f"run folder {run_dir}")


def _comparable(yaml_text: str) -> Any:
    from relkd._yaml import strict_load

    d = strict_load(yaml_text) or {}
    d.pop("output_dir", None)  # the same folder, spelled relative or absolute
    for sect, key in (k.split(".") for k in _ENV_KEYS):
        if isinstance(d.get(sect), dict):
            d[sect].pop(key, None)
    return d


def _config_changed(job: Job) -> bool:
    from relkd.config import load_config, to_yaml

    saved = job.run_dir / "config.yaml"
    if not saved.is_file():
        return False
    want = to_yaml(load_config(job.config, job.overrides))
    try:
        # The saved config read through today's schema: a key added since, at its default,
        # is not a change (a run recorded before ``train.ema_decay`` existed still resumes).
        have = to_yaml(load_config(str(saved)))
    except Exception:  # unreadable or no longer valid: compare the raw text, which differs
        have = saved.read_text()
    return _comparable(have) != _comparable(want)


#: The clock that times runs (monkeypatched by tests of the ETA arithmetic).
_clock = time.time


def format_eta(seconds: float | None) -> str:
    """``ETA 45 s`` / ``ETA 12 min`` / ``ETA 3.4 h``; ``ETA unknown`` for ``None``."""
    if seconds is None:
        return "ETA unknown"
    if seconds < 60:
        return f"ETA {seconds:.0f} s"
    if seconds < 100 * 60:
        return f"ETA {seconds / 60:.0f} min"
    return f"ETA {seconds / 3600:.1f} h"


def eta_seconds(run_times: Sequence[float], left: int, workers: int = 1) -> float | None:
    """Time left for ``left`` runs on ``workers`` processes at the mean of ``run_times`` (the
    wall times of the runs finished so far in this invocation); ``None`` before the first."""
    if not run_times:
        return None
    return sum(run_times) / len(run_times) * left / max(1, workers)


class _Progress:
    """Counts the selected grid's runs done (on disk, so runs finished by other workers count)
    and times the runs this process trains, for the ``[ k/N] finished; ETA ...`` lines."""

    def __init__(self, runs: list[Job], token: str, workers: int = 1):
        self.runs, self.token, self.workers = runs, token, workers
        self.run_times: list[float] = []

    def add(self, res: dict[str, Any]) -> None:
        if res["kind"] == "run" and res["status"] in ("trained", "resumed"):
            self.run_times.append(float(res["elapsed_s"]))

    def line(self) -> str:
        total = len(self.runs)
        done = sum(j.finished() or j.failed_in(self.token) is not None for j in self.runs)
        eta = eta_seconds(self.run_times, total - done, self.workers)
        text = f"[{done:>{len(str(total))}}/{total}] finished; {format_eta(eta)}"
        if self.run_times:
            n = len(self.run_times)
            mean = sum(self.run_times) / n
            text += f" (mean {mean:.1f} s over {n} run(s) here"
            text += f", {self.workers} workers)" if self.workers > 1 else ")"
        return text


def _tag(job: Job) -> str:
    if job.kind == "teacher":
        return f"[teacher] {job.student}"
    return f"[{job.index:>{len(str(job.total))}}/{job.total}] {job.id}"


def _result(job: Job, status: str, **kw: Any) -> dict[str, Any]:
    s = (_read_json(job.run_dir / "summary.json") or {}) if status != "failed" else {}
    out = {"id": job.id, "kind": job.kind, "method": job.label, "teacher": job.teacher}
    out.update(student=job.student, seed=job.seed, run_dir=str(job.run_dir), status=status)
    out.update(best_top1=s.get("best_top1"), last_top1=s.get("last_top1"), **kw)
    out.update(eval_split=s.get("eval_split"), eval_images=s.get("eval_images"))
    return out


def _execute(job: Job, token: str, quiet: bool, say, claim: Claim | None = None) -> dict[str, Any]:
    """Train (or resume) one claimed job; failures are recorded, not raised. ``claim`` (the
    run folder's) is checked before every write; a lost claim (:class:`ClaimLost`) is raised:
    this process must stop, not record anything."""
    import relkd

    def fence(action: str) -> None:
        if claim is not None:
            claim.check(action)

    resume = job.state() == "resume"
    t0 = _clock()
    say(f"{_tag(job)} start ({'resume' if resume else 'new'})")
    try:
        if resume and _config_changed(job):
            raise RelkdError(
                f"{job.run_dir}/config.yaml differs from the suite's config for this run; "
                "restore the suite or delete the run folder to start it again"
            )
        if job.kind == "run":
            fence("writing bench.json")
            _write_json(job.run_dir / "bench.json", job.meta)
        res = relkd.train(job.config, overrides=job.overrides, resume=resume, quiet=quiet)
    except ClaimLost:
        raise
    except Exception as e:  # one failed run must not stop the grid
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        rec = {
            "token": token,
            "error": msg,
            "traceback": traceback.format_exc(),
            "time": time.time(),
        }
        fence("writing failed.json")
        _write_json(job.run_dir / "failed.json", rec)
        dt = _clock() - t0
        say(f"{_tag(job)} FAILED after {dt:.1f} s: {msg}")
        return _result(job, "failed", elapsed_s=dt, error=msg)
    dt = _clock() - t0
    fence("removing failed.json")
    (job.run_dir / "failed.json").unlink(missing_ok=True)
    on = f" top-1 on {res.get('eval_split', 'test')}, {res.get('eval_images', '?')} images"
    say(
        f"{_tag(job)} done in {dt:.1f} s: best {res['best_top1']:.2f} last "
        f"{res['last_top1']:.2f} ({on.strip()})"
    )
    return _result(job, "resumed" if resume else "trained", elapsed_s=dt, error=None)


def _claim_group(job: Job, groups: dict[Path, list[Job]]) -> Claim | bool | None:
    """Before ``job`` is claimed: ``None`` if it needs no group claim (no cache, or a run of its
    group is through an epoch, so the cache exists), the acquired group claim if ``job`` may be
    the run that builds the cache, ``False`` if another process holds that claim. Workers thus
    never sit in the cache's build claim while other runs of the grid are waiting; a worker with
    nothing else left polls until the cache is built, as it would have waited for the build."""
    if job.cache_group is None or any(j.started() for j in groups.get(job.cache_group, [job])):
        return None
    glock = Claim(job.cache_group, what=f"teacher-cache group {job.cache_group.stem}")
    return glock if glock.try_acquire() else False


def _work(
    jobs: list[Job],
    token: str,
    quiet: bool,
    say,
    poll_s: float = 2.0,
    progress: _Progress | None = None,
) -> Iterator[dict[str, Any]]:
    """Work through ``jobs`` (teachers first), claiming each with its lock; yields the result of
    every job this process ran or failed. Waits for jobs held by other processes and for teachers
    being trained elsewhere, and returns when nothing is left to do. With ``progress``, prints
    its ``[ k/N] finished; ETA ...`` line after each job this process ran."""
    by_id = {j.id: j for j in jobs}
    groups: dict[Path, list[Job]] = {}
    for j in jobs:
        if j.cache_group is not None:
            groups.setdefault(j.cache_group, []).append(j)
    handled: set[str] = set()
    noted: set[str] = set()
    while True:
        waiting = ran = False
        for job in jobs:
            if job.id in handled or job.finished() or job.failed_in(token):
                handled.add(job.id)
                continue
            dep = by_id.get(job.needs) if job.needs else None
            if dep is not None and (failed := dep.failed_in(token)):
                msg = f"teacher {dep.student} failed: {failed.get('error')}"
                job.run_dir.mkdir(parents=True, exist_ok=True)
                # Same content from whichever worker writes it (atomic replace): no claim.
                _write_json(job.run_dir / "failed.json", {"token": token, "error": msg})
                handled.add(job.id)
                say(f"{_tag(job)} skipped: {msg}")
                yield _result(job, "failed", elapsed_s=0.0, error=msg)
                continue
            if dep is not None and not dep.finished():
                waiting = True  # its teacher is being trained (here or elsewhere)
                continue
            glock = _claim_group(job, groups)
            if glock is False:
                # Another process runs the first run of this run's cache group, i.e. is
                # probably building the cache this run would block on: run other jobs first.
                if str(job.cache_group) not in noted:
                    say(
                        f"{_tag(job)} reads a teacher cache another process is building; "
                        "running other jobs first"
                    )
                noted.add(str(job.cache_group))
                waiting = True
                continue
            claim = run_claim(job.run_dir)
            if not claim.try_acquire():
                if glock is not None:
                    glock.release()
                if job.id not in noted:
                    who = describe(read_record(claim.path))
                    say(f"{_tag(job)} is being run by another process{who}; waiting")
                noted.add(job.id)
                waiting = True
                continue
            if claim.took_over:
                say(f"{_tag(job)} taken over from a stale claim: {claim.took_over}")
            try:
                res = None if job.finished() else _execute(job, token, quiet, say, claim)
            finally:
                claim.release()
                if glock is not None:
                    glock.release()
            handled.add(job.id)
            if res is not None:
                ran = True
                if progress is not None:
                    progress.add(res)
                    say(progress.line())
                yield res
        if not waiting:
            return
        if not ran:
            time.sleep(poll_s)


def _printer(prefix: str = ""):
    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {prefix}{msg}", flush=True)

    return say


def _silent(msg: str) -> None:
    pass


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_env(wid: int, threads: int, gpus: list[str]) -> dict[str, str]:
    """Environment of worker ``wid``: its torch threads and, with GPUs, one GPU (round-robin)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[wid % len(gpus)]
    return env


def _run_pool(
    suite_path, out: Path, todo: list[Job], token: str, workers: int, opts: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``workers`` independent ``relkd bench accuracy`` processes on the same grid: they share it
    through the run claims, as separate invocations do. CPU: ``cpu_count // workers`` torch
    threads each; GPUs: CUDA_VISIBLE_DEVICES round-robin."""
    import subprocess

    gpus = _visible_gpus()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cpus or 1) // workers)
    cmd = [sys.executable, "-m", "relkd", "bench", "accuracy", str(suite_path), *opts["overrides"]]
    cmd += ["--out", str(out), "--no-report", *([] if opts["quiet"] else ["--verbose"])]
    if opts["only"]:
        only = opts["only"]
        cmd += ["--only", only if isinstance(only, str) else ",".join(only)]
    before = {j.id: j.state() for j in todo}
    procs = []
    for wid in range(workers):
        env = {**os.environ, **worker_env(wid, threads, gpus), "RELKD_BENCH_TOKEN": token}
        env["RELKD_BENCH_PREFIX"] = f"[w{wid}] "
        env["RELKD_BENCH_WORKERS"] = str(workers)  # for the workers' ETA
        stdout = None if opts["progress"] else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=stdout))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if dead := [f"w{i} (exit {c})" for i, c in enumerate(codes) if c not in (0, 1)]:
        print(f"warning: worker(s) {', '.join(dead)} exited abnormally", file=sys.stderr)
    done = [j for j in todo if j.kind == "run" and j.finished()]
    return {j.id: _result(j, "resumed" if before[j.id] == "resume" else "trained") for j in done}


def run_suite(
    suite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    only: str | Sequence[str] | None = None,
    dry_run: bool = False,
    quiet: bool = True,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or continue) every run of a suite; returns one dict per selected run, grid order.

    Args:
        suite_path: the suite YAML (format in the module docstring).
        out_dir: where ``teachers/`` and ``runs/`` go; a second call with the same folder
            continues: finished runs are kept, interrupted ones resumed.
        workers: processes to spread the runs over (1: this process). Independent invocations
            on the same ``out_dir``, on this machine or others sharing it, also share the work
            (run folders are claimed, see :mod:`relkd.claims`).
        only: glob(s) on run ids ``<method>/<teacher>_<student>/s<seed>`` (comma separated or a
            list), e.g. ``"kd/*"`` or ``"*/s0"``; teachers are trained only if a selected run
            needs them.
        dry_run: validate and print the plan (state of every run), train nothing.
        quiet: silence relkd.train's own per-epoch output (progress lines are still printed).
        overrides: ``key=value`` applied to every run after the suite's own ``overrides``.
        progress: print one line per run start / finish, and after each finished run
            ``[ k/N] finished; ETA ...`` (runs done / all selected; time left from the mean
            wall time of the runs finished so far by this process in this call).

    Each dict holds ``id, kind, method, teacher, student, seed, run_dir, status, best_top1,
    last_top1`` (+ ``elapsed_s``, ``error``). ``status``: ``trained`` / ``resumed`` (by this
    call), ``skipped`` (finished before, or by another process meanwhile), ``failed``,
    ``incomplete`` (left unfinished, e.g. a worker was killed) or, with ``dry_run``,
    ``planned`` (with ``state``: finished / resume / new).

    Raises:
        RelkdError: an invalid suite (unknown methods or models, bad keys...), before training.
    """
    if workers < 1:
        raise RelkdError(f"workers must be >= 1, got {workers}")
    suite = load_suite(suite_path)
    _check_names(suite)
    out = Path(out_dir)
    teachers, runs = build_grid(suite, out, overrides)
    runs = _select(runs, only)
    if not runs:
        raise RelkdError(f"no run of suite {suite.name} matches --only {only!r}")
    teachers = [t for t in teachers if t.id in {j.needs for j in runs}]
    missing = {
        "data root(s) not found: ": sorted(_validate_configs(teachers, runs)),
        "teacher checkpoint(s) not found: ": sorted(
            {
                str(j.config["teacher"]["checkpoint"])
                for j in runs
                if j.needs is None
                and j.teacher
                and not Path(j.config["teacher"]["checkpoint"]).expanduser().is_file()
            }
        ),
    }
    hints = [
        " (set data.root=DIR on the command line or the variable the suite reads)",
        " (download the RepDistiller / mdistiller teachers or change `teachers` in the suite)",
    ]
    say = _printer(os.environ.get("RELKD_BENCH_PREFIX", "")) if progress else _silent
    if dry_run:
        say(f"suite {suite.name}: {len(runs)} run(s) in {out} (dry run, nothing is trained)")
        for t in teachers:
            say(f"  teacher {t.student}: {t.state().replace('new', 'train')} -> {t.run_dir}")
        for what, items in missing.items():
            for m in items:
                say(f"  warning: {what.strip()} {m} (a real run would stop here)")
        for j in runs:
            say(f"  {_tag(j)}: {j.state()}")
        return [_result(j, "planned", state=j.state()) for j in runs]
    for (what, items), hint in zip(missing.items(), hints):
        if items:
            raise RelkdError(what + ", ".join(items) + hint)
    # Workers of a pool (below) record failures under their parent's token.
    token = os.environ.get("RELKD_BENCH_TOKEN") or uuid.uuid4().hex
    t0 = time.time()
    todo = [j for j in [*teachers, *runs] if not j.finished()]
    say(
        f"suite {suite.name}: {len(runs)} run(s), {sum(j.finished() for j in runs)} finished "
        f"before, {len(teachers)} teacher(s) to train or reuse; output {out}"
    )
    if not todo:
        results: dict[str, dict[str, Any]] = {}
    elif workers <= 1:
        # A pool worker (its parent set RELKD_BENCH_WORKERS) shares the grid with the others.
        shared = int(os.environ.get("RELKD_BENCH_WORKERS") or 1)
        prog = _Progress(runs, token, shared)
        if shared <= 1:
            say(prog.line())
        results = {res["id"]: res for res in _work(todo, token, quiet, say, progress=prog)}
    else:
        opts = {"overrides": list(overrides), "only": only, "quiet": quiet, "progress": progress}
        results = _run_pool(suite_path, out, todo, token, workers, opts)
    final = []
    for job in runs:
        if job.id in results:
            final.append(results[job.id])
        elif job.finished():
            final.append(_result(job, "skipped"))
        elif (rec := job.failed_in(token)) is not None:
            final.append(_result(job, "failed", error=rec.get("error")))
        else:
            final.append(_result(job, "incomplete"))
    counts: dict[str, int] = {}
    for r in final:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    say(f"suite {suite.name} in {time.time() - t0:.0f} s: {tally}")
    return final
