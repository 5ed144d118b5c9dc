"""``relkd bench status OUT``: the state of every run of a suite's output folder.

States: ``done`` (``summary.json``), ``running`` / ``pending`` (its Slurm job is in the queue;
pending shows Slurm's reason), ``failed`` (a failure record, or its job started and left the
queue without finishing the run: cancelled, killed, out of memory; its log is named),
``cancelled`` (its job left the queue without ever starting: ``scancel`` of a pending job, or a
run whose teacher failed; no log exists, Slurm's state and reason are shown while ``squeue``
still remembers the job), ``interrupted`` (a checkpoint, nothing queued: the next submission
resumes it) and ``new``. The last epoch comes from the run's ``metrics.jsonl``; the job id and
log from ``OUT/slurm/state.json`` (written by ``--launcher slurm``). Without that file (a folder
filled by local workers) the run folders alone are read. A folder that is neither (empty, a
single run's folder) is an error.

A job "never started" when Slurm created no log for it (the batch script's output file appears
when the job starts) and ``squeue`` names no node for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from relkd.bench.suite import _read_json
from relkd.registry import RelkdError


def _last_epoch(run_dir: Path) -> int | None:
    try:
        lines = [x for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "phase" not in rec and "epoch" in rec:
            return int(rec["epoch"])
    return 0 if lines else None


def _grid(out: Path, state: dict[str, Any]) -> list[Any]:
    from relkd.bench.suite import _select, build_grid, load_suite

    suite = load_suite(state["suite"])
    teachers, runs = build_grid(suite, out, state.get("overrides") or [])
    runs = _select(runs, state.get("only"))
    return [*[t for t in teachers if t.id in {j.needs for j in runs}], *runs]


def _scan(out: Path) -> list[tuple[str, Path]]:
    """Run folders of a suite output folder filled without the Slurm launcher."""
    found = []
    for d in sorted((out / "teachers").glob("*")):
        if d.is_dir():
            found.append((f"teacher/{d.name}", d))
    dirs = {p.parent for name in ("bench.json", "failed.json") for p in (out / "runs").rglob(name)}
    for d in sorted(dirs):
        meta = _read_json(d / "bench.json") or {}
        found.append((str(meta.get("id") or d.relative_to(out / "runs")), d))
    return found


def scheduler_jobs() -> dict[str, dict[str, str]]:
    """Every job and array task ``squeue`` shows, the ended ones it still remembers included
    (Slurm keeps them ``MinJobAge``, 300 s by default): ``{job id: {state, reason, nodes}}``,
    array tasks as ``<array job>_<task>``; ``nodes`` is empty for a job that never ran."""
    from relkd.bench.slurm import _slurm

    out = _slurm(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%N"])
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs[parts[0]] = {"state": parts[1], "reason": parts[2], "nodes": parts[3]}
    return jobs


def _not_a_suite_folder(out: Path) -> RelkdError:
    expected = (
        "expected the --out folder of relkd bench accuracy, with teachers/, runs/ or "
        "slurm/state.json"
    )
    if (out / "run.json").is_file() or (out / "config.yaml").is_file():
        return RelkdError(f"{out} is a run folder, not a suite output folder ({expected})")
    return RelkdError(f"{out} is not a suite output folder: {expected}")


def _ended(rec: dict[str, Any], sched: dict[str, str] | None) -> tuple[str, str]:
    """``(state, detail)`` of a job that left the queue without finishing its run and without
    a failure record: ``cancelled`` when it never started (no log, no node), else ``failed``."""
    log = str(rec.get("log") or "")
    has_log = bool(log) and Path(log).is_file()
    said = ""
    if sched is not None:
        reason = sched.get("reason") or ""
        said = f"Slurm: {sched['state']}" + (f", {reason}" if reason not in ("", "None") else "")
    if sched is not None:
        started: bool | None = bool(sched.get("nodes")) or has_log
    else:  # squeue forgot the job: the log alone tells
        started = has_log if log else None
    if started is False:
        return "cancelled", "never started" + (f" ({said})" if said else "")
    parts = [p for p in (said, f"log: {log}" if has_log else "") if p]
    detail = "job left the queue without finishing the run"
    return "failed", detail + (f" ({'; '.join(parts)})" if parts else "")


def suite_status(out_dir: str | Path, scheduler: bool = True) -> list[dict[str, Any]]:
    """One dict per teacher and run: ``id, state, job_id, last_epoch, detail`` (module
    docstring). Raises :class:`RelkdError` for a folder that is not a suite's output folder."""
    from relkd.bench.slurm import ACTIVE, _have_slurm

    out = Path(out_dir).resolve()
    if not out.is_dir():
        what = "is a file, not a folder" if out.exists() else "does not exist"
        raise RelkdError(f"{out} {what} (expected the --out folder of relkd bench accuracy)")
    state = _read_json(out / "slurm" / "state.json") or {}
    if not state.get("suite") and not any((out / d).is_dir() for d in ("teachers", "runs")):
        raise _not_a_suite_folder(out)
    records = state.get("jobs") or {}
    jobs = scheduler_jobs() if scheduler and records and _have_slurm() else {}
    q = {k: v for k, v in jobs.items() if v["state"] in ACTIVE}
    grid = _grid(out, state) if state.get("suite") else None
    items = [(j.id, j.run_dir) for j in grid] if grid is not None else _scan(out)
    needs = {j.id: j.needs for j in grid} if grid is not None else {}
    rows: list[dict[str, Any]] = []
    for rid, run_dir in items:
        rec = records.get(rid) or {}
        jid = rec.get("job_id")
        failed = _read_json(run_dir / "failed.json")
        row = {"id": rid, "job_id": jid, "last_epoch": _last_epoch(run_dir), "detail": ""}
        if (run_dir / "summary.json").is_file():
            row["state"] = "done"
        elif jid and jid in q:
            row["state"] = "running" if q[jid]["state"] in ("RUNNING", "COMPLETING") else "pending"
            row["detail"] = q[jid]["nodes"] if row["state"] == "running" else q[jid]["reason"]
        elif isinstance(failed, dict) and failed.get("error"):
            row["state"], row["detail"] = "failed", str(failed["error"])
        elif jid:
            row["state"], row["detail"] = _ended(rec, jobs.get(jid))
            teacher = next((r for r in rows if r["id"] == needs.get(rid)), None)
            if (
                row["state"] == "cancelled"
                and teacher is not None
                and teacher["state"] in ("failed", "cancelled")
            ):
                row["detail"] = (
                    f"never started: its teacher {teacher['state']} ({teacher['detail']})"
                )
        elif any((run_dir / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
            row["state"] = "interrupted"
        else:
            row["state"] = "new"
        rows.append(row)
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    w = max([len(r["id"]) for r in rows] + [2])
    lines = [f"{'run':<{w}}  {'state':<11} {'job':<12} {'epoch':>5}  detail"]
    for r in rows:
        ep = "" if r["last_epoch"] is None else str(r["last_epoch"])
        lines.append(
            f"{r['id']:<{w}}  {r['state']:<11} {r['job_id'] or '-':<12} {ep:>5}  {r['detail']}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def wait_for(out_dir: str | Path, poll_s: float = 10.0, say=print) -> list[dict[str, Any]]:
    """Block until no job recorded for ``out_dir`` is queued or running; returns the final
    :func:`suite_status` rows. Prints the counts whenever they change."""
    last = None
    while True:
        rows = suite_status(out_dir)
        active = [r for r in rows if r["state"] in ("running", "pending")]
        counts = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        line = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        if line != last:
            say(f"{time.strftime('%H:%M:%S')} {line}")
            last = line
        if not active and not _report_queued(Path(out_dir)):
            return rows
        time.sleep(poll_s)


def _report_queued(out: Path) -> bool:
    """The report job of an earlier submission is still queued or running (``--wait`` must
    not write the report beside it)."""
    from relkd.bench.slurm import queue

    rec = ((_read_json(out / "slurm" / "state.json") or {}).get("jobs") or {}).get("report")
    return bool(rec and rec.get("job_id") in queue())
