"""A report re-rendered from its ``report.json`` alone (``relkd report --from-json``): the run
folders may be gone (the committed records keep only the report), the accuracy rows are the
recorded ones and each pair's cost is measured now (:mod:`relkd.bench.report_cost`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from relkd.bench.report import _costs, _tables, _write
from relkd.bench.report_runs import Group, RunRecord
from relkd.registry import RelkdError


def write_report_from_json(
    report_json: str | Path,
    out_dir: str | Path,
    *,
    cost: bool = True,
    latency: bool = True,
    threads: int | None = None,
    input_shape: Any = None,
    num_classes: int | None = None,
) -> Path:
    """Re-render a report from its ``report.json`` alone (the run folders may be gone), with
    the cost of each pair's models measured now: same tables, notes and ``accuracy.png``;
    ``curves.png`` / ``.pdf`` / ``.svg`` (per-epoch curves are not in ``report.json``) are
    copied from beside the JSON when they are there. ``input_shape`` / ``num_classes``: the models' input where neither a run
    folder nor the data set's name tells it (see :mod:`relkd.bench.report_cost`)."""
    import shutil

    src = Path(report_json)
    try:
        data = json.loads(src.read_text())
        groups_json, tables_json = data["groups"], data["tables"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RelkdError(f"{str(src)!r} is not a relkd report.json ({type(e).__name__})") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = []
    for g in groups_json:
        times = g.get("train_time_s") or [None] * len(g["best"])
        runs = []
        images = g.get("eval_images") or [None] * len(g["best"])  # older records lack it
        for seed, b, la, t, rd, n in zip(
            g["seeds"], g["best"], g["last"], times, g["run_dirs"], images
        ):
            r = RunRecord(
                run_dir=src.parent / rd, method=g["method"], teacher=g["teacher"],
                student=g["student"], seed=int(seed), dataset=g["dataset"], best=b, last=la,
                method_name=g.get("method_name") or g["method"], recipe=g["recipe"], time_s=t,
                eval_images=n,
            )  # fmt: skip
            r.recorded_dir = rd  # type: ignore[attr-defined]
            runs.append(r)
        groups.append(
            Group(
                g["method"],
                g["teacher"],
                g["student"],
                g["dataset"],
                runs,
                unfinished=int(g.get("unfinished") or 0),
                method_name=g.get("method_name") or g["method"],
                recipe=g["recipe"],
            )
        )
    tables = _tables(groups)
    recorded = {(t["teacher"], t["student"], t["dataset"]): t for t in tables_json}
    for tab in tables:
        t = recorded.get((tab.teacher, tab.student, tab.dataset)) or {}
        if t.get("teacher_top1") is not None:
            tab.teacher_top1 = {"top1": t["teacher_top1"], "how": t.get("teacher_top1_source")}
    costs = _costs(
        tables, cost, latency=latency, threads=threads, input_shape=input_shape,
        num_classes=num_classes,
    )  # fmt: skip
    runs_rel = str(data.get("runs_dir") or ".")  # where the runs were, as recorded
    for ext in ("png", "pdf", "svg"):  # the curves are not in the JSON: keep the drawn ones
        curves = src.parent / f"curves.{ext}"
        if curves.is_file() and curves.resolve() != (out / curves.name).resolve():
            shutil.copyfile(curves, out / curves.name)
    return _write(out, groups, tables, runs_rel, costs, curves=(out / "curves.png").is_file(),
                  source=os.path.relpath(src, out))  # fmt: skip
