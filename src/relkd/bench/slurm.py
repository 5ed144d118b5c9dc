"""``relkd bench accuracy SUITE --launcher slurm``: a suite's grid as Slurm jobs.

What is submitted (``sbatch`` scripts written into ``OUT/slurm/``, readable and resubmittable):

1. one job per teacher the suite trains (``teachers:`` with ``train:``);
2. one job per teacher-cache group (``teacher_cache: auto``): builds the exact teacher-output
   cache the group's runs read (``relkd.engine.trainer.build_teacher_cache``), after its teacher;
3. the student runs as one job array, ``--max-parallel N`` -> ``%N``, one run per task
   (``--runs-per-task K``: K runs one after the other), after every job above
   (``--dependency=afterok:...``, ``--kill-on-invalid-dep=yes``: a failed teacher cancels the
   runs waiting for it instead of leaving them pending forever);
4. without ``--wait``, a last job that writes the report once the array is over (``afterany``).

Every task runs ``relkd bench task SUITE --out OUT --job ID ...``: exactly those grid jobs, with
the same run folders, claims and resume rules as ``relkd bench accuracy``. Resources: the
suite's ``slurm:`` mapping, then ``--slurm key=value`` (later wins), each written as
``#SBATCH --key=value`` (``key=`` with no value: a bare ``--key``).

Preemption and time limits: the scripts ask for ``--requeue`` and ``--signal=B:USR1@90``; the
script passes USR1 to relkd, which stops at its next safe point (:mod:`relkd.engine.preempt`)
and exits 75; the script then runs ``scontrol requeue`` on its own job and the requeued task
resumes the run from its checkpoint. A requeue from outside (``scontrol requeue ID``, a
preempting job) sends SIGTERM: the run stops as on Ctrl-C and resumes from its last epoch.

Submitting again is safe: finished runs are skipped, runs whose recorded job is still queued or
running are left alone, everything else (failed, cancelled, never submitted) is submitted again,
and the failure is shown. ``OUT/slurm/state.json`` records the suite, the overrides and the job id
of every grid job; the scheduler is read with ``squeue`` only (no accounting database needed).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.bench.suite import Job, _read_json, _write_json
from relkd.registry import RelkdError

#: Slurm job states of a job that is still going to run (or running).
ACTIVE = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED",
}  # fmt: skip
#: Seconds of warning before the time limit (``--signal=B:USR1@SIGNAL_S``).
SIGNAL_S = 90


# ------------------------------------------------------------------------------ the scheduler
def _slurm(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RelkdError(
            f"{cmd[0]} not found: the Slurm launcher needs Slurm's commands on this machine "
            "(sbatch, squeue, scontrol); run without --launcher slurm to train here"
        ) from None
    if p.returncode != 0:
        # every line: sbatch says what is wrong first and "Try sbatch --help" last
        msg = [x.strip() for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
        said = "; ".join(x for x in msg if not x.startswith("Try ")) or "; ".join(msg)
        raise RelkdError(f"{shlex.join(cmd)} failed: {said or f'exit status {p.returncode}'}")
    return p.stdout


def queue() -> dict[str, dict[str, str]]:
    """Every job and array task Slurm still knows as queued or running: ``{job id: {state,
    reason, nodes}}``, array tasks as ``<array job>_<task>``."""
    out = _slurm(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%N"])
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[1] in ACTIVE:
            jobs[parts[0]] = {"state": parts[1], "reason": parts[2], "nodes": parts[3]}
    return jobs


def sbatch(script: Path, dependency: Sequence[str] = (), kind: str = "afterok") -> str:
    """Submit ``script``; returns the job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency={kind}:" + ":".join(dependency))
    out = _slurm([*cmd, str(script)]).strip()
    return out.split(";")[0]


# ------------------------------------------------------------------------------ the scripts
def parse_options(items: Sequence[str], where: str = "--slurm") -> dict[str, str | None]:
    """``["partition=gpu", "gres=gpu:1", "exclusive="]`` -> ``{"partition": "gpu", ...}``;
    an empty value means a bare flag (``#SBATCH --exclusive``)."""
    opts: dict[str, str | None] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not eq or not _OPTION_NAME.fullmatch(key):
            raise RelkdError(
                f"{where} {item!r} is not key=value (e.g. partition=gpu, gres=gpu:1, "
                "time=08:00:00, account=NAME; key= for a flag such as exclusive=)"
            )
        if any(c in value for c in "\n\r\0"):  # a second #SBATCH line would slip in
            raise RelkdError(f"{where} {key}: the value {value!r} has a line break; one line only")
        opts[key] = value.strip() or None
    return opts


#: An sbatch long option's name: lower-case words joined by dashes.
_OPTION_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


def _owned(key: str) -> bool:
    """Whether ``key`` names (or abbreviates: sbatch takes any unambiguous prefix of a long
    option, so ``arr`` is ``array``) one of relkd's own options or their negations."""
    return (any(o.startswith(key) for o in _OWN) and len(key) >= 2) or key in _OWN


def _suite_options(raw: Any) -> dict[str, str | None]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RelkdError(f"suite key slurm must be a mapping of sbatch options, got {raw!r}")
    return parse_options([f"{k}={'' if v is None else v}" for k, v in raw.items()], "suite slurm:")


#: Options relkd sets itself; the user's may not replace them (they make the launcher work).
_OWN = {"array", "dependency", "output", "error", "open-mode", "requeue", "no-requeue", "signal",
        "parsable", "kill-on-invalid-dep"}  # fmt: skip


def _header(name: str, log: str, opts: dict[str, str | None], array: str | None) -> list[str]:
    lines = [f"#SBATCH --job-name={name}", f"#SBATCH --output={log}", "#SBATCH --open-mode=append"]
    if array is not None:
        lines.append(f"#SBATCH --array={array}")
    lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{SIGNAL_S}"]
    lines.append("#SBATCH --kill-on-invalid-dep=yes")
    for k, v in opts.items():
        lines.append(f"#SBATCH --{k}" + ("" if v is None else f"={v}"))
    return lines


_BODY = """\
# USR1 (sent by Slurm {signal_s} s before the time limit, or by `scancel --signal=USR1 --batch`)
# is passed on to relkd, which stops at its next safe point and exits 75 ("requeue me"); the
# job then requeues itself and the next start resumes from the run's checkpoint.
export RELKD_PREEMPT_FINISH_S=${{RELKD_PREEMPT_FINISH_S:-{finish_s}}}
# torch threads: the CPUs Slurm gave the task (torch would otherwise start one per core)
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}
# relkd starts with USR1 ignored, so a signal that comes while it is still starting up (a short
# time limit) cannot kill it; the signal is passed on once relkd's handler is in place.
usr1_ignored() {{
  local m
  m=$(sed -n 's/^SigIgn:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null) && [ -n "$m" ] \
    && (( (16#$m >> 9) & 1 ))
}}
pass_usr1() {{
  ( while kill -0 "$pid" 2>/dev/null && usr1_ignored "$pid"; do sleep 0.5; done
    kill -USR1 "$pid" 2>/dev/null ) &
}}
trap pass_usr1 USR1
( trap '' USR1; exec {command} ) &
pid=$!
wait "$pid"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done
if [ "$rc" -eq 75 ]; then
  echo "relkd: requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60  # the requeue ends this job; exiting first would record it as finished
fi
exit "$rc"
"""


def _python() -> str:
    return sys.executable or "python3"


def write_script(
    path: Path,
    *,
    title: str,
    name: str,
    log: str,
    opts: dict[str, str | None],
    task_args: list[str],
    chunks: list[list[str]] | None = None,
    jobs: list[str] | None = None,
    cwd: Path,
    command: list[str] | None = None,
) -> str:
    """Write one batch script; returns its text. ``chunks``: an array job, task i runs the grid
    jobs ``chunks[i]``; ``jobs``: a single job running those grid jobs; ``command``: a plain
    command instead (the report)."""
    array = None
    if chunks is not None:
        array = f"0-{len(chunks) - 1}"
        if opts.get("max-parallel"):
            array += f"%{opts['max-parallel']}"
    hdr_opts = {k: v for k, v in opts.items() if k != "max-parallel"}
    lines = [
        "#!/bin/bash",
        f"# {title}",
        "# generated by relkd (relkd bench accuracy --launcher slurm)",
    ]
    lines += _header(name, log, hdr_opts, array)
    lines += ["set -u", f"cd {shlex.quote(str(cwd))}"]
    if command is not None:
        lines += [shlex.join(command)]
        text = "\n".join(lines) + "\n"
    else:
        if chunks is not None:
            lines.append("# one line per array task: the grid jobs it runs")
            lines.append("TASKS=(")
            lines += [f"  {shlex.quote(','.join(c))}" for c in chunks]
            lines.append(")")
            lines.append('IDS="${TASKS[$SLURM_ARRAY_TASK_ID]}"')
        else:
            lines.append(f"IDS={shlex.quote(','.join(jobs or []))}")
        cmd = shlex.join([_python(), "-m", "relkd", "bench", "task", *task_args])
        body = _BODY.format(
            signal_s=SIGNAL_S, finish_s=SIGNAL_S // 2, command=cmd + ' --job "$IDS"'
        )
        text = "\n".join(lines) + "\n" + body
    if path is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create it
        path.write_text(text)
    return text


# ------------------------------------------------------------------------------ the plan
@dataclass
class Submission:
    """What one ``--launcher slurm`` call submits (or would, with ``--dry-run``)."""

    scripts: list[dict[str, Any]] = field(default_factory=list)  # name, path, text, deps
    skipped: dict[str, str] = field(default_factory=dict)  # grid job id -> why (done / queued)
    resubmitted: dict[str, str] = field(default_factory=dict)  # grid job id -> earlier failure


def _failure(job: Job, rec: dict[str, Any] | None, teacher: Job | None = None) -> str | None:
    """Why an earlier attempt of ``job`` (whose suite teacher is ``teacher``) did not finish,
    or None if it never ran."""
    failed = _read_json(job.run_dir / "failed.json")
    if isinstance(failed, dict) and failed.get("error"):
        return str(failed["error"])
    if rec and rec.get("job_id"):
        log = rec.get("log", "")
        if log and not Path(log).exists():  # Slurm writes the log when the job starts
            why = "cancelled before it started"
            if teacher and isinstance(t := _read_json(teacher.run_dir / "failed.json"), dict):
                why += f": its teacher failed ({t.get('error', 'see relkd bench status')})"
            return f"its job {rec['job_id']} never ran ({why})"
        return f"its job {rec['job_id']} ended without finishing it (log: {log})"
    return None


def _log_path(out: Path, name: str, array: bool) -> str:
    return str(out / "slurm" / "logs" / (f"{name}-%A_%a.out" if array else f"{name}-%j.out"))


def _resolved_log(template: str, job_id: str) -> str:
    if "_" in job_id:
        a, t = job_id.split("_", 1)
        return template.replace("%A", a).replace("%a", t)
    return template.replace("%j", job_id)


def submit(
    suite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    slurm: Sequence[str] = (),
    max_parallel: int | None = None,
    runs_per_task: int = 1,
    only: str | None = None,
    dry_run: bool = False,
    report: bool = True,
    say=print,
) -> Submission:
    """Write the batch scripts of what is missing from the suite's output folder and submit them
    (module docstring). Returns what was (or, with ``dry_run``, would be) submitted."""
    from relkd.bench.suite import _check_names, _select, _validate_configs, build_grid, load_suite

    if runs_per_task < 1:
        raise RelkdError(f"--runs-per-task must be >= 1, got {runs_per_task}")
    if max_parallel is not None and max_parallel < 1:
        raise RelkdError(f"--max-parallel must be >= 1, got {max_parallel}")
    suite = load_suite(suite_path)
    _check_names(suite)
    out = Path(out_dir).resolve()
    suite_file = Path(suite_path).resolve()
    teachers, runs = build_grid(suite, out, overrides)
    runs = _select(runs, only)
    if not runs:
        raise RelkdError(f"no run of suite {suite.name} matches --only {only!r}")
    teachers = [t for t in teachers if t.id in {j.needs for j in runs}]
    missing = _validate_configs(teachers, runs)
    ckpts = sorted(
        {
            str(j.config["teacher"]["checkpoint"])
            for j in runs
            if j.needs is None and j.teacher
            and not Path(j.config["teacher"]["checkpoint"]).expanduser().is_file()
        }
    )  # fmt: skip
    for what, items in (("data root(s)", sorted(missing)), ("teacher checkpoint(s)", ckpts)):
        if items and not dry_run:
            raise RelkdError(
                f"{what} not found: {', '.join(items)} (the jobs read the same paths: use a "
                "file system the nodes share)"
            )
        for item in items:
            say(f"warning: {what} not found: {item} (a real submission would stop here)")
    opts = {**_suite_options(getattr(suite, "slurm", None)), **parse_options(slurm)}
    if bad := sorted(k for k in opts if _owned(k)):
        raise RelkdError(
            f"--slurm {', '.join(bad)}: set by relkd itself ({', '.join(sorted(_OWN))}, or an "
            "abbreviation of one); the other sbatch options are passed through"
        )
    sdir = out / "slurm"
    state = (_read_json(sdir / "state.json") or {}) if sdir.is_dir() else {}
    records: dict[str, dict[str, Any]] = dict(state.get("jobs") or {})
    try:
        active = queue()
    except RelkdError:
        if not dry_run:
            raise
        active = {}  # a dry run on a machine without Slurm: nothing is queued

    seq = int(state.get("submissions", 0)) + 1
    prefix = f"{seq:02d}"
    sub = Submission()
    task_args = [str(suite_file), "--out", str(out), *overrides]
    base = f"relkd-{suite.name}"

    def pending(job_key: str) -> str | None:
        rec = records.get(job_key) or {}
        jid = rec.get("job_id")
        return jid if jid and jid in active else None

    new_ids: dict[str, str] = {}  # grid job / cache key -> job id (or placeholder in dry runs)

    def put(key: str, name: str, text_args: dict[str, Any], deps: list[str], log: str) -> str:
        path = sdir / f"{prefix}-{name}.sh"
        text = write_script(None if dry_run else path, **text_args)  # type: ignore[arg-type]
        dep_s = f"--dependency=afterok:{':'.join(deps)} " if deps else ""
        entry = {"name": name, "path": str(path), "text": text, "deps": deps, "log": log}
        entry["command"] = f"sbatch --parsable {dep_s}{path}"
        jid = f"<{name}>" if dry_run else sbatch(path, deps)
        entry["job_id"] = jid
        sub.scripts.append(entry)
        new_ids[key] = jid
        return jid

    # 1. teachers
    teacher_dep: dict[str, str | None] = {}
    for t in teachers:
        if t.finished():
            sub.skipped[t.id] = "done"
            teacher_dep[t.id] = None
            continue
        if jid := pending(t.id):
            sub.skipped[t.id] = f"queued or running as job {jid}"
            teacher_dep[t.id] = jid
            continue
        if why := _failure(t, records.get(t.id)):
            sub.resubmitted[t.id] = why
        name = f"teacher-{t.id.split('/', 1)[1]}"
        log = _log_path(out, name, False)
        args = dict(title=f"teacher {t.student} of suite {suite.name}", name=f"{base}-{name}",
                    log=log, opts=opts, task_args=task_args, jobs=[t.id], cwd=Path.cwd())  # fmt: skip
        teacher_dep[t.id] = put(t.id, name, args, [], log)

    todo: list[Job] = []
    teacher_of = {t.id: t for t in teachers}
    for j in runs:
        if j.finished():
            sub.skipped[j.id] = "done"
        elif jid := pending(j.id):
            sub.skipped[j.id] = f"queued or running as job {jid}"
        else:
            if why := _failure(j, records.get(j.id), teacher_of.get(j.needs or "")):
                sub.resubmitted[j.id] = why
            todo.append(j)

    # 2. teacher caches: one job per group whose runs are still to run and none has started
    cache_dep: dict[str, str | None] = {}
    for j in todo:
        g = j.cache_group
        if g is None or str(g) in cache_dep:
            continue
        key = f"cache/{g.stem}"
        group = [r for r in runs if r.cache_group == g]
        if any(r.started() for r in group) or (sdir / f"{g.stem}.built").is_file():
            cache_dep[str(g)] = None
            continue
        if jid := pending(key):
            cache_dep[str(g)] = jid
            continue
        deps = [d for d in [teacher_dep.get(j.needs or "")] if d]
        name = g.stem
        log = _log_path(out, name, False)
        args = dict(title=f"teacher cache of {len(group)} run(s) (first: {j.id})",
                    name=f"{base}-{name}", log=log, opts=opts,
                    task_args=[*task_args, "--build-cache"], jobs=[j.id], cwd=Path.cwd())  # fmt: skip
        cache_dep[str(g)] = put(key, name, args, deps, log)

    # 3. the runs, one array
    if todo:
        chunks = [
            [j.id for j in todo[i : i + runs_per_task]] for i in range(0, len(todo), runs_per_task)
        ]
        deps: list[str] = []
        for j in todo:
            for d in (teacher_dep.get(j.needs or ""), cache_dep.get(str(j.cache_group))):
                if d and d not in deps:
                    deps.append(d)
        aopts = dict(opts)
        if max_parallel:
            aopts["max-parallel"] = str(max_parallel)
        name = "runs"
        log = _log_path(out, name, True)
        args = dict(title=f"{len(todo)} run(s) of suite {suite.name} in {len(chunks)} task(s)",
                    name=f"{base}-{name}", log=log, opts=aopts, task_args=task_args,
                    chunks=chunks, cwd=Path.cwd())  # fmt: skip
        aid = put("runs", name, args, deps, log)
        for i, c in enumerate(chunks):
            for rid in c:
                new_ids[rid] = f"{aid}_{i}"
        # 4. the report, when the array is over
        if report:
            rlog = _log_path(out, "report", False)
            cmd = [_python(), "-m", "relkd", "report", str(out)]
            rargs = dict(title=f"report of suite {suite.name}", name=f"{base}-report", log=rlog,
                         opts={k: v for k, v in opts.items() if k in ("partition", "account", "qos")},
                         task_args=[], command=cmd, cwd=Path.cwd())  # fmt: skip
            path = sdir / f"{prefix}-report.sh"
            text = write_script(None if dry_run else path, **rargs)  # type: ignore[arg-type]
            jid = "<report>" if dry_run else sbatch(path, [aid], kind="afterany")
            sub.scripts.append({"name": "report", "path": str(path), "text": text, "deps": [aid],
                                "log": rlog, "job_id": jid,
                                "command": f"sbatch --parsable --dependency=afterany:{aid} {path}"})  # fmt: skip
            new_ids["report"] = jid

    if not dry_run and sub.scripts:
        for key, jid in new_ids.items():
            entry = next((s for s in sub.scripts if s["job_id"] == jid.split("_")[0]), None)
            log = _resolved_log(entry["log"], jid) if entry else ""
            records[key] = {"job_id": jid, "log": log, "submitted": time.time(), "submission": seq}
        _write_json_dir(sdir / "state.json", {
            "suite": str(suite_file), "overrides": list(overrides), "only": only,
            "submissions": seq, "jobs": records,
        })  # fmt: skip
    return sub


def _write_json_dir(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, obj)


def _have_slurm() -> bool:
    import shutil

    return shutil.which("squeue") is not None


# ------------------------------------------------------------------------------ one task
def run_task(
    suite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    ids: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    build_cache: bool = False,
    quiet: bool = False,
) -> int:
    """Run exactly the grid jobs ``ids`` (teacher ids ``teacher/NAME`` or run ids) of a suite, in
    order, as ``relkd bench accuracy`` would (claims, resume, failure records); with
    ``build_cache``, only build the teacher cache the first of them reads. Returns 0 if all
    finished, 1 if one failed; raises :class:`relkd.engine.preempt.Preempted` on a preemption
    request (USR1), after the current run stopped at a safe point."""
    from relkd.bench.accuracy import _printer, _work
    from relkd.bench.suite import _check_names, build_grid, load_suite
    from relkd.engine import preempt

    preempt.install()
    suite = load_suite(suite_path)
    _check_names(suite)
    out = Path(out_dir)
    teachers, runs = build_grid(suite, out, overrides)
    by_id = {j.id: j for j in [*teachers, *runs]}
    if bad := [i for i in ids if i not in by_id]:
        raise RelkdError(f"no job {', '.join(bad)} in suite {suite.name} (ids: relkd bench status)")
    jobs = [by_id[i] for i in ids]
    say = _printer()
    if build_cache:
        from relkd.engine.trainer import build_teacher_cache

        job = jobs[0]
        if job.started():
            say(f"{job.id}: a run of this cache group has started, so its cache exists")
        else:
            say(f"building the teacher cache of {job.id}")
            build_teacher_cache(job.config, job.overrides, quiet=quiet)
        if job.cache_group is not None:
            (out / "slurm").mkdir(parents=True, exist_ok=True)
            (out / "slurm" / f"{job.cache_group.stem}.built").write_text(job.id + "\n")
        return 0
    token = "slurm-" + os.environ.get("SLURM_JOB_ID", str(os.getpid()))
    failed = 0
    for res in _work(jobs, token, quiet, say):
        failed += res["status"] == "failed"
        if preempt.requested():
            raise preempt.Preempted("stopped between runs")
    return 1 if failed else 0
