"""Turn a folder of relkd runs into a report that reads like a paper's table: Markdown, JSON, PNG
plots and one HTML page.

:func:`write_report` reads every run folder (a folder holding ``config.yaml``) under the runs
folder: ``summary.json`` (best / last top-1, train time), ``metrics.jsonl`` (curves),
``config.yaml`` (method, teacher, student, seed, data set, recipe) and, for runs of a benchmark
suite, ``bench.json`` (the method label of the suite, which may differ from the registry name).
Runs are grouped by (method, teacher, student, data set); a table per (teacher, student, data
set) holds, like a paper's table:

* the teacher's own top-1 (trained by the suite, recorded by the run, read from the checkpoint's
  run folder or evaluated once: :mod:`relkd.bench.teachers`) and the plain CE student;
* per method: mean ± sample standard deviation (n - 1) over seeds of the best-epoch and the
  last-epoch top-1 (one column when they are equal everywhere), the difference from the CE
  student, the mean train time per run, and what its recipe changes against the table's;
* the published numbers of :mod:`relkd.bench.reference` only where the runs used the same recipe
  (epochs, batch, schedule, full training set) on the same pair and data set, labelled with the
  epoch the source reports.

The recipe (data, subset, epochs, batch, optimiser and lr, schedule) heads the report, or each
table when tables differ. Outputs in ``out_dir``: ``report.md``, ``report.json`` (the same numbers,
machine-readable, run folders relative to the report), ``report.csv`` and ``report.tex`` (LaTeX,
booktabs, best per column bold: :mod:`relkd.bench.report_export`), ``accuracy.png`` (dot plot per
pair, best method on top, every seed drawn, CE student and teacher as reference lines),
``curves.png`` (top-1 per epoch, mean over seeds), each figure also as PDF and SVG, and
``report.html`` (self-contained: tables and both images embedded). Every number says what it was
measured on: the header and each table name the split (test or validation), a
``data.test_subset`` cap and the number of images. Reading the run folders and grouping them:
:mod:`relkd.bench.report_runs`; the plots and the HTML page: ``report_plots`` / ``report_html``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.bench import reference as ref
from relkd.bench.report_runs import (  # noqa: F401  (data_label, mean_std: used from here too)
    _DIFF_KEYS,
    Group,
    RunRecord,
    _common,
    _recipe_part,
    collect_runs,
    data_label,
    eval_set_text,
    eval_split,
    group_runs,
    mean_std,
    recipe_text,
)
from relkd.registry import RelkdError


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ± {s:.2f}"


def _fmt_time(ts: list[float]) -> str:
    if not ts:
        return "-"
    t = statistics.fmean(ts)
    if t < 10:
        return f"{t:.1f} s"
    return f"{t:.0f} s" if t < 120 else (f"{t / 60:.1f} min" if t < 7200 else f"{t / 3600:.1f} h")


@dataclass
class Table:
    """One pair (teacher -> student on a data set): its teacher-using and teacher-free rows."""

    title: str
    teacher: str | None
    student: str
    dataset: str
    groups: list[Group]
    recipe: dict[str, Any] = field(default_factory=dict)
    teacher_top1: dict[str, Any] = field(default_factory=dict)  # {"top1", "how"}

    @property
    def ce(self) -> Group | None:
        """The plain CE student of the table (the row every delta is taken against)."""
        ces = [g for g in self.groups if g.teacher is None and g.method_name == "ce" and g.runs]
        return next((g for g in ces if g.method == "ce"), ces[0] if ces else None)

    @property
    def collapsed(self) -> bool:
        """Best and last epoch agree in every run: one top-1 column (and one marker) suffices."""
        return all(r.best == r.last for g in self.groups for r in g.runs)


def _tables(groups: list[Group]) -> list[Table]:
    pairs: list[tuple[str, str, str]] = []
    for g in groups:
        if g.teacher is not None and (g.teacher, g.student, g.dataset) not in pairs:
            pairs.append((g.teacher, g.student, g.dataset))
    tables = []
    used: set[int] = set()
    for t, s, d in pairs:
        rows = [g for g in groups if g.student == s and g.dataset == d and g.teacher in (t, None)]
        rows.sort(key=lambda g: g.teacher is not None)  # teacher-free (the student row) first
        used.update(id(g) for g in rows)
        tables.append(Table(f"{t} → {s}", t, s, d, rows))
    for g in groups:  # teacher-free students that appear in no pair
        if id(g) in used:
            continue
        same = [x for x in tables if x.teacher is None and (x.student, x.dataset) == g.key[2:]]
        tab = same[0] if same else Table(f"{g.student}, no teacher", None, g.student, g.dataset, [])
        if not same:
            tables.append(tab)
        tab.groups.append(g)
    for tab in tables:
        tab.recipe = _common([g.recipe for g in tab.groups for _ in (g.runs or [None])])
        tab.title += f" ({tab.recipe.get('data') or tab.dataset})"
    return tables


def _refs(g: Group) -> list[dict[str, Any]]:
    return ref.lookup(g.dataset, g.method, g.teacher, g.student, g.recipe)


def _teacher_refs(tab: Table) -> list[dict[str, Any]]:
    return ref.lookup(tab.dataset, "teacher", None, str(tab.teacher), tab.recipe)


def _find_teachers(tables: list[Table], teachers_dir: Path | None, out: Path, evaluate: bool):
    from relkd.bench.teachers import teacher_top1

    for tab in tables:
        if tab.teacher is None:
            continue
        runs = [r for g in tab.groups if g.teacher for r in g.runs] or [None]
        recorded = next((r for r in runs if r and r.summary.get("teacher_top1") is not None), None)
        run = recorded or runs[0]
        tab.teacher_top1 = teacher_top1(
            tab.teacher,
            run.cfg if run else {},
            teachers_dir=teachers_dir,
            summary=run.summary if run else None,
            cache=out / "teacher_eval.json",
            evaluate=evaluate and run is not None,
        )


# ------------------------------------------------------------------------------- the tables
def _diff(g: Group, tab: Table) -> str:
    return ", ".join(
        _recipe_part(k, g.recipe.get(k)) for k in _DIFF_KEYS if g.recipe.get(k) != tab.recipe.get(k)
    )


def _table_view(tab: Table) -> dict[str, Any]:
    """Title, lines and cells of one table, shared by the Markdown and HTML writers."""
    one = tab.collapsed
    ce = tab.ce
    ce_mean = mean_std(ce.best)[0] if ce else None
    t1 = tab.teacher_top1.get("top1")
    rows = list(tab.groups)
    refs = {id(g): _refs(g) for g in rows}
    t_refs = _teacher_refs(tab) if tab.teacher else []
    with_refs = any(refs.values()) or bool(t_refs)
    diffs = {id(g): _diff(g, tab) for g in rows}
    header = ["method", "seeds", "top-1" if one else "best top-1", *([] if one else ["last top-1"])]
    header += ["Δ vs CE" if ce else "Δ vs CE (no CE run)", "train time / run"]
    header += ["reference", "ours − ref"] if with_refs else []
    header += ["recipe differs"] if any(diffs.values()) else []

    def delta(x: float | None) -> str:
        return "-" if x is None or ce_mean is None or math.isnan(x) else f"{x - ce_mean:+.2f}"

    def ref_cells(found: list[dict[str, Any]], best: float, last: float) -> list[str]:
        if not with_refs:
            return []
        if not found:
            return ["-", "-"]
        cells = "; ".join(f"{r['value']:.2f} ({r['label']}, {r['metric']})" for r in found)
        ours = [(last if r["metric"] == "last" else best, r) for r in found]
        gaps = "; ".join(
            "-"
            if math.isnan(v)
            else f"{v - r['value']:+.2f} ({'last' if r['metric'] == 'last' else 'best'})"
            for v, r in ours
        )
        return [cells, gaps]

    cells: list[list[str]] = []
    if tab.teacher is not None and t1 is not None:
        row = [f"teacher ({tab.teacher})", "-", f"{t1:.2f}", *([] if one else [f"{t1:.2f}"])]
        row += [delta(t1), "-", *ref_cells(t_refs, t1, t1)]
        cells.append(row + ([""] if any(diffs.values()) else []))
    for g in rows:
        n = f"{len(g.runs)}" + (f" (+{g.unfinished} unfinished)" if g.unfinished else "")
        best, last = mean_std(g.best)[0], mean_std(g.last)[0]
        d = "(baseline)" if g is ce else delta(best if g.runs else None)
        row = [g.method, n, _fmt(g.best), *([] if one else [_fmt(g.last)]), d, _fmt_time(g.times)]
        row += ref_cells(refs[id(g)], best, last)
        cells.append(row + ([diffs[id(g)]] if any(diffs.values()) else []))
    # What every number of the table was measured on (split, subset, images), stated per table.
    images = [n for g in rows for n in g.eval_images]
    notes = [f"Top-1 on {eval_set_text([tab.recipe], images)}."]
    if tab.teacher is not None:
        how = tab.teacher_top1.get("how", "not recorded")
        notes.append(
            f"Teacher {tab.teacher}: {t1:.2f} ({how})." if t1 is not None
            else f"Teacher {tab.teacher}: top-1 {how}."
        )  # fmt: skip
    if ce is not None:
        which = "top-1" if one else "best-epoch top-1"
        notes.append(f"Δ vs CE: mean {which} minus the CE student's ({ce.method}, same student).")
    shown = {r["table"] for rs in refs.values() for r in rs}
    hidden = {
        r["table"]
        for g in rows
        for r in ref.lookup(g.dataset, g.method, g.teacher, g.student)
        if r["table"] not in shown
    }
    for key in sorted(hidden):
        t = ref.TABLES[key]
        want = ", ".join(_recipe_part(k, t["recipe"][k]) for k in ("epochs", "batch", "schedule"))
        notes.append(
            f"{t['label']} publishes numbers for this pair with another recipe ({want}, full "
            "training set): not shown."
        )
    return {"title": tab.title, "header": header, "rows": cells, "notes": notes, "tab": tab}


def _used_sources(tables: list[Table]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tab in tables:
        for r in [
            *(x for g in tab.groups for x in _refs(g)),
            *(_teacher_refs(tab) if tab.teacher else []),
        ]:
            out[r["table"]] = r
    return out


def _group_json(g: Group, tab: Table | None, base: Path) -> dict[str, Any]:
    bm, bs = mean_std(g.best)
    lm, ls = mean_std(g.last)
    ce = tab.ce if tab else None
    ce_b, ce_l = (mean_std(ce.best)[0], mean_std(ce.last)[0]) if ce and g.runs else (None, None)

    def num(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else x

    return {
        "method": g.method,
        "method_name": g.method_name,
        "teacher": g.teacher,
        "student": g.student,
        "dataset": g.dataset,
        "data_label": g.recipe.get("data"),
        "n": len(g.runs),
        "unfinished": g.unfinished,
        "seeds": g.seeds,
        "best": g.best,
        "last": g.last,
        "best_mean": num(bm),
        "best_std": num(bs),
        "last_mean": num(lm),
        "last_std": num(ls),
        "eval_split": "validation" if g.recipe.get("val_split") else "test",
        "test_subset": g.recipe.get("test_subset"),
        "eval_images": g.eval_images,
        "delta_vs_ce_best": num(bm - ce_b) if ce_b is not None else None,
        "delta_vs_ce_last": num(lm - ce_l) if ce_l is not None else None,
        "train_time_s": [r.time_s for r in g.runs],
        "recipe": g.recipe,
        "reference": _refs(g),
        # a report re-rendered from its JSON keeps the recorded paths (the runs may be gone)
        "run_dirs": [
            getattr(r, "recorded_dir", None) or os.path.relpath(r.run_dir, base) for r in g.runs
        ],
    }


# ------------------------------------------------------------------------------------ writers
def _intro(groups: list[Group], runs_rel: str, common: dict[str, Any] | None) -> list[str]:
    split = eval_set_text([g.recipe for g in groups], [n for g in groups for n in g.eval_images])
    n = sum(len(g.runs) for g in groups)
    n_unfinished = sum(g.unfinished for g in groups)
    lines = [
        f"Runs: {runs_rel} ({n} finished"
        + (f", {n_unfinished} unfinished" if n_unfinished else "")
        + f"); generated {time.strftime('%Y-%m-%d %H:%M')}. Top-1 (%) on {split}: mean ± "
        "sample std over seeds (best epoch and last epoch; one column where they are equal).",
    ]
    if common:
        lines.append(f"Recipe: {recipe_text(common)}.")
    lines.append(
        "Published numbers appear only beside runs of their own recipe and pair; 'ours − ref' "
        "compares like with like (last or best epoch; best where the source does not say)."
    )
    return lines


def _markdown(views, intro: list[str], sources, images: dict[str, Path]) -> str:
    lines = ["# relkd accuracy report", ""]
    for x in intro:
        lines += [x, ""]
    for v in views:
        lines += [f"## {v['title']}", ""]
        if v.get("recipe"):
            lines += [f"Recipe: {v['recipe']}.", ""]
        lines += ["| " + " | ".join(v["header"]) + " |", "|" + "---|" * len(v["header"])]
        lines += ["| " + " | ".join(c or " " for c in row) + " |" for row in v["rows"]]
        lines += ["", *(f"{n}  " for n in v["notes"]), ""]
    if sources:
        lines += ["## Reference sources", ""]
        lines += [
            f"- **{r['label']}** ({r['metric']} epoch): {r['source']}" for r in sources.values()
        ]
        lines.append("")
    for title, path in images.items():
        lines += [f"![{title}]({path.name})", ""]
    return "\n".join(lines)


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    evaluate_teachers: bool = True,
    cost: bool = True,
    latency: bool = True,
    threads: int | None = None,
) -> Path:
    """Write ``report.md`` / ``report.json`` / ``report.csv`` / ``report.tex`` (LaTeX,
    booktabs) / ``accuracy.{png,pdf,svg}`` / ``curves.{png,pdf,svg}`` / ``cost.{png,pdf,svg}``
    / ``report.html`` for the runs under ``runs_dir``; returns the path of ``report.md``.

    ``runs_dir`` may be a suite's output folder (its ``runs/`` is used and its ``teachers/``
    give the teachers' accuracy) or any folder of relkd runs. ``out_dir`` defaults to the suite
    output folder (the parent of ``runs/``) or to ``runs_dir`` itself. A teacher checkpoint whose
    accuracy is recorded nowhere is evaluated once on the test split (``evaluate_teachers``; the
    result is kept in ``teacher_eval.json`` in ``out_dir``). ``cost``: each pair's teacher and
    student profiled (:mod:`relkd.bench.report_cost`), timed on this CPU with ``threads`` torch
    threads unless ``latency`` is off.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise RelkdError(f"runs folder {str(root)!r} does not exist")
    if (root / "runs").is_dir():
        base, root = root, root / "runs"
    else:
        base = root.parent if root.name == "runs" else root
    teachers_dir = base / "teachers" if (base / "teachers").is_dir() else None
    out = Path(out_dir) if out_dir is not None else base
    out.mkdir(parents=True, exist_ok=True)
    records = [
        r
        for r in collect_runs(root)
        if teachers_dir is None or teachers_dir not in r.run_dir.parents
    ]
    if not records:
        raise RelkdError(f"no relkd run folder (with config.yaml) under {str(root)!r}")
    groups = group_runs(records)
    tables = _tables(groups)
    _find_teachers(tables, teachers_dir, out, evaluate_teachers)
    costs = _costs(tables, cost, latency=latency, threads=threads)
    return _write(out, groups, tables, os.path.relpath(root, out), costs)


def _costs(tables: list[Table], enabled: bool, **kwargs: Any) -> dict[int, dict[str, Any]]:
    if not enabled:
        return {}
    from relkd.bench.report_cost import table_costs

    return table_costs(tables, **kwargs)


def _write(
    out: Path,
    groups: list[Group],
    tables: list[Table],
    runs_rel: str,
    costs: dict[int, dict[str, Any]],
    *,
    curves: bool | None = None,
    source: str | None = None,
) -> Path:
    """The report files from grouped runs; ``curves``: None draws ``curves.png``, True keeps
    the one already in ``out``, False has none."""
    from relkd.bench.report_export import write_csv, write_latex
    from relkd.bench.report_html import render_html
    from relkd.bench.report_plots import method_styles, plot_accuracy, plot_curves

    recipes = {json.dumps(t.recipe, sort_keys=True) for t in tables}
    common = tables[0].recipe if len(recipes) == 1 else None
    views = []
    for t in tables:
        v = _table_view(t)
        v["recipe"] = None if common else recipe_text(t.recipe)
        views.append(v)
        if id(t) in costs:
            from relkd.bench.report_cost import cost_view

            views.append(cost_view(t, costs[id(t)]))
    table_of = {id(g): t for t in tables for g in t.groups}
    report = {
        "runs_dir": runs_rel,
        "recipe": common,
        "tables": [
            {
                "title": t.title,
                "teacher": t.teacher,
                "student": t.student,
                "dataset": t.dataset,
                "recipe": t.recipe,
                "teacher_top1": t.teacher_top1.get("top1"),
                "teacher_top1_source": t.teacher_top1.get("how"),
                "ce": t.ce.method if t.ce else None,
                **({"cost": costs[id(t)]} if id(t) in costs else {}),
            }
            for t in tables
        ],
        "groups": [_group_json(g, table_of.get(id(g)), out) for g in groups],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plotted = [t for t in tables if any(g.runs for g in t.groups)]
    images: dict[str, Path] = {}
    if plotted:
        styles = method_styles([g.method for t in plotted for g in t.groups])
        split = eval_split([t.recipe for t in plotted])
        short = {"test split": "test", "validation split": "validation"}.get(split, "test/val")
        if any(t.recipe.get("test_subset") for t in plotted):
            short += " subset"
        plot_accuracy(plotted, out / "accuracy.png", styles, split=short)
        images["Top-1 per method"] = out / "accuracy.png"
        if curves is None:
            plot_curves(plotted, out / "curves.png", styles, split=short)
        if curves is not False:
            images[f"{short.capitalize()} top-1 per epoch"] = out / "curves.png"
        from relkd.bench.report_cost import plot_cost

        if plot_cost(plotted, costs, out / "cost.png", styles, split=short):
            images[f"{short.capitalize()} top-1 against MACs"] = out / "cost.png"
    write_csv(tables, out / "report.csv")
    write_latex(tables, out / "report.tex")
    intro = _intro(groups, runs_rel, common)
    if source:
        intro.insert(1, f"Re-rendered from {source} (no run folder read); cost measured now.")
    sources = _used_sources(tables)
    (out / "report.md").write_text(_markdown(views, intro, sources, images))
    (out / "report.html").write_text(render_html(views, intro, sources, images))
    return out / "report.md"
