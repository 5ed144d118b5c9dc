"""``relkd bench status OUT``: the state of every run of a suite's output folder.

States: ``done`` (``summary.json``), ``running`` / ``pending`` (its Slurm job is in the queue;
pending shows Slurm's reason), ``failed`` (a failure record, or its job left the queue without
finishing the run: cancelled, killed, out of memory), ``interrupted`` (a checkpoint, nothing
queued: the next submission resumes it) and ``new``. The last epoch comes from the run's
``metrics.jsonl``; the job id from ``OUT/slurm/state.json`` (written by ``--launcher slurm``).
Without that file (a folder filled by local workers) the run folders alone are read.
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


def suite_status(out_dir: str | Path, scheduler: bool = True) -> list[dict[str, Any]]:
    """One dict per teacher and run: ``id, state, job_id, last_epoch, detail``."""
    from relkd.bench.slurm import _have_slurm, queue

    out = Path(out_dir).resolve()
    if not out.is_dir():
        raise RelkdError(f"{out} does not exist (the --out folder of relkd bench accuracy)")
    state = _read_json(out / "slurm" / "state.json") or {}
    records = state.get("jobs") or {}
    q = queue() if scheduler and records and _have_slurm() else {}
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
            row["state"] = "failed"
            row["detail"] = f"job left the queue without finishing the run (log: {rec.get('log')})"
            teacher = next((r for r in rows if r["id"] == needs.get(rid)), None)
            if teacher is not None and teacher["state"] == "failed":
                row["detail"] = f"cancelled: its teacher failed ({teacher['detail']})"
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
