"""Turn a folder of relkd runs into a report: Markdown table, JSON, PNG plots and one HTML page.

:func:`write_report` reads every run folder (a folder holding ``config.yaml``) under the runs
folder: ``summary.json`` (best / last top-1), ``metrics.jsonl`` (curves), ``config.yaml`` (method,
teacher, student, seed, data set) and, for runs of a benchmark suite, ``bench.json`` (the method
label of the suite, which may differ from the method's registry name). Runs are grouped by
(method, teacher, student); each group shows mean +- sample standard deviation (n - 1) over its
seeds of the best-epoch and the last-epoch top-1, next to the published numbers of
:mod:`relkd.bench.reference` where the same method, pair and data set have one, labelled with the
epoch the source reports (CRD/RepDistiller: last; DKD/mdistiller: best; RRD: not stated).

Outputs (in ``out_dir``): ``report.md``, ``report.json`` (the same numbers, machine-readable),
``accuracy.png`` (bars with error bars per pair), ``curves.png`` (top-1 per epoch, mean over
seeds) and ``report.html`` (self-contained: tables and both images embedded as base64).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.bench import reference as ref
from relkd.registry import RelkdError


@dataclass
class RunRecord:
    run_dir: Path
    method: str
    teacher: str | None
    student: str
    seed: int
    dataset: str
    order: int = 10**9
    best: float | None = None
    last: float | None = None
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> top-1

    @property
    def finished(self) -> bool:
        return self.best is not None


@dataclass
class Group:
    method: str
    teacher: str | None
    student: str
    dataset: str
    runs: list[RunRecord]
    unfinished: int = 0

    @property
    def key(self) -> tuple:
        return (self.method, self.teacher, self.student, self.dataset)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def best(self) -> list[float]:
        return [float(r.best) for r in self.runs]

    @property
    def last(self) -> list[float]:
        return [float(r.last) for r in self.runs]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, s = mean_std(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ± {s:.2f}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_run(run_dir: Path) -> RunRecord | None:
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    meta = _read_json(run_dir / "bench.json") or {}
    method_cfg = cfg.get("method") or {}
    teacher_cfg = cfg.get("teacher") or {}
    rec = RunRecord(
        run_dir=run_dir,
        method=str(meta.get("method") or method_cfg.get("name") or "?"),
        teacher=meta.get("teacher", teacher_cfg.get("name")),
        student=str(meta.get("student") or (cfg.get("student") or {}).get("name") or "?"),
        seed=int(meta.get("seed", (cfg.get("train") or {}).get("seed", 0))),
        dataset=str(meta.get("reference") or (cfg.get("data") or {}).get("name") or "?"),
        order=int(meta.get("index", 10**9)),
    )
    summary = _read_json(run_dir / "summary.json")
    if isinstance(summary, dict) and summary.get("best_top1") is not None:
        rec.best = float(summary["best_top1"])
        rec.last = float(summary["last_top1"])
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "top1" in r and "phase" not in r:
            rec.curve[int(r["epoch"])] = float(r["top1"])
    return rec


def collect_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run folder (one holding ``config.yaml``) under ``runs_dir``."""
    root = Path(runs_dir)
    out = []
    for cfg in sorted(root.rglob("config.yaml")):
        rec = _read_run(cfg.parent)
        if rec is not None:
            out.append(rec)
    return out


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Finished runs grouped by (method, teacher, student, data set), in suite order."""
    groups: dict[tuple, Group] = {}
    for r in records:
        key = (r.method, r.teacher, r.student, r.dataset)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(r.method, r.teacher, r.student, r.dataset, [])
        if r.finished:
            g.runs.append(r)
        else:
            g.unfinished += 1
    first: dict[tuple, int] = {}
    for r in records:
        key = (r.method, r.teacher, r.student, r.dataset)
        first[key] = min(first.get(key, r.order), r.order)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=lambda g: (first[g.key], g.method != "ce", g.method))


def _teacher_info(teachers_dir: Path | None, name: str) -> dict[str, Any] | None:
    if teachers_dir is None:
        return None
    s = _read_json(teachers_dir / name.replace(":", "-").replace("/", "-") / "summary.json")
    return s if isinstance(s, dict) else None


@dataclass
class Table:
    """One pair (teacher -> student on a data set): its teacher-using and teacher-free rows."""

    title: str
    teacher: str | None
    student: str
    dataset: str
    groups: list[Group]


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
        tables.append(Table(f"{t} → {s} ({d})", t, s, d, rows))
    for g in groups:  # teacher-free students that appear in no pair
        if id(g) in used:
            continue
        same = [x for x in tables if x.teacher is None and (x.student, x.dataset) == g.key[2:]]
        tab = same[0] if same else None
        if tab is None:
            tab = Table(f"{g.student}, no teacher ({g.dataset})", None, g.student, g.dataset, [])
            tables.append(tab)
        tab.groups.append(g)
    return tables


def _refs(g: Group) -> list[dict[str, Any]]:
    return ref.lookup(g.dataset, g.method, g.teacher, g.student)


def _delta(g: Group, r: dict[str, Any]) -> str:
    if not g.runs:
        return "-"
    which = "last" if r["metric"] == "last" else "best"
    ours = mean_std(g.last if which == "last" else g.best)[0]
    return f"{ours - r['value']:+.2f} ({which})"


def _row_cells(g: Group) -> list[str]:
    refs = _refs(g)
    ref_cell = "; ".join(f"{r['value']:.2f} ({r['label']}, {r['metric']})" for r in refs) or "-"
    delta = "; ".join(_delta(g, r) for r in refs) or "-"
    n = f"{len(g.runs)}" + (f" (+{g.unfinished} unfinished)" if g.unfinished else "")
    return [g.method, n, _fmt(g.best), _fmt(g.last), ref_cell, delta]


HEADER = ["method", "n seeds", "best top-1", "last top-1", "reference", "ours − ref"]


def _teacher_line(tab: Table, teachers_dir: Path | None) -> str | None:
    if tab.teacher is None:
        return None
    parts = []
    info = _teacher_info(teachers_dir, tab.teacher)
    if info:
        parts.append(
            f"trained by the suite: best {info['best_top1']:.2f}, last {info['last_top1']:.2f}"
        )
    for r in ref.lookup(tab.dataset, "teacher", None, tab.teacher):
        parts.append(f"reference {r['value']:.2f} ({r['label']})")
    return f"Teacher {tab.teacher}: " + ("; ".join(parts) if parts else "top-1 not recorded")


def _used_sources(groups: list[Group]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        for r in _refs(g):
            out[r["table"]] = r
    return out


# ------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def plot_accuracy(tables: list[Table], path: Path) -> None:
    """Per pair: mean best and last top-1 per method with std error bars; references as x."""
    plt = _plt()
    rows, cols = _grid(len(tables))
    width = max(4.5, 0.55 * max(len(t.groups) for t in tables) + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    for ax, tab in zip(axes.flat, tables):
        gs = [g for g in tab.groups if g.runs]
        xs = list(range(len(gs)))
        bm = [mean_std(g.best) for g in gs]
        lm = [mean_std(g.last) for g in gs]
        for shift, stats, name, color in (
            (-0.2, bm, "best", "#4c72b0"),
            (0.2, lm, "last", "#dd8452"),
        ):
            ax.bar(
                [x + shift for x in xs],
                [m for m, _ in stats],
                0.4,
                yerr=[sd for _, sd in stats],
                capsize=3,
                label=name,
                color=color,
            )
        ref_x, ref_y = [], []
        for x, g in zip(xs, gs):
            for r in _refs(g):
                ref_x.append(x)
                ref_y.append(r["value"])
        if ref_x:
            ax.scatter(ref_x, ref_y, marker="x", color="black", zorder=3, label="reference")
        lows = [m - sd for m, sd in bm + lm] + ref_y
        highs = [m + sd for m, sd in bm + lm] + ref_y
        if lows:
            lo, hi = max(0.0, min(lows) - 2), max(highs)
            ax.set_ylim(lo, hi + 0.25 * (hi - lo) + 0.5)  # headroom for the legend
        ax.set_xticks(xs, [g.method for g in gs], rotation=45, ha="right", fontsize=8)
        ax.set_title(tab.title, fontsize=9)
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(tables: list[Table], path: Path) -> None:
    """Per pair: test top-1 per epoch of each method, mean over its seeds."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    rows, cols = _grid(len(tables))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax, tab in zip(axes.flat, tables):
        for g in tab.groups:
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for r in g.runs:
                for e, v in r.curve.items():
                    by_epoch[e].append(v)
            if not by_epoch:
                continue
            es = sorted(by_epoch)
            means = [statistics.fmean(by_epoch[e]) for e in es]
            ax.plot(es, means, label=g.method, marker="." if len(es) < 30 else None)
        ax.set_title(tab.title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1 (%), mean over seeds")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(tables) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ writers
def _intro(groups: list[Group], runs_dir: Path) -> str:
    n = sum(len(g.runs) for g in groups)
    n_unfinished = sum(g.unfinished for g in groups)
    return (
        f"Runs: {runs_dir} ({n} finished"
        + (f", {n_unfinished} unfinished" if n_unfinished else "")
        + f"); generated {time.strftime('%Y-%m-%d %H:%M')}. Top-1 (%) on the test split: mean ± "
        "sample std over seeds of the best epoch and of the last epoch. 'ours − ref' compares "
        "the reference with our number of the same kind (last or best epoch; best where the "
        "source does not say). References come from the papers' full recipes: they are comparable "
        "only where the runs used the same recipe."
    )


def _markdown(tables, teachers_dir, groups, intro: str, images: dict[str, Path]) -> str:
    lines = ["# relkd accuracy report", "", intro, ""]
    for tab in tables:
        lines += [f"## {tab.title}", ""]
        tl = _teacher_line(tab, teachers_dir)
        if tl:
            lines += [tl, ""]
        lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_row_cells(g)) + " |" for g in tab.groups]
        lines.append("")
    sources = _used_sources(groups)
    if sources:
        lines += ["## Reference sources", ""]
        for r in sources.values():
            lines.append(f"- **{r['label']}** ({r['metric']} epoch): {r['source']}")
        lines.append("")
    for title, path in images.items():
        lines += [f"![{title}]({path.name})", ""]
    return "\n".join(lines)


def _html(tables, teachers_dir, groups, intro: str, images: dict[str, Path]) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>relkd accuracy report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>",
        "<h1>relkd accuracy report</h1>",
        f"<p>{e(intro)}</p>",
    ]
    for tab in tables:
        parts.append(f"<h2>{e(tab.title)}</h2>")
        tl = _teacher_line(tab, teachers_dir)
        if tl:
            parts.append(f"<p>{e(tl)}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + "</tr>")
        for g in tab.groups:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _row_cells(g)) + "</tr>")
        parts.append("</table>")
    sources = _used_sources(groups)
    if sources:
        parts.append("<h2>Reference sources</h2><ul>")
        for r in sources.values():
            parts.append(
                f"<li><b>{e(r['label'])}</b> ({e(r['metric'])} epoch): {e(r['source'])}</li>"
            )
        parts.append("</ul>")
    for title, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def _group_json(g: Group) -> dict[str, Any]:
    bm, bs = mean_std(g.best)
    lm, ls = mean_std(g.last)
    return {
        "method": g.method,
        "teacher": g.teacher,
        "student": g.student,
        "dataset": g.dataset,
        "n": len(g.runs),
        "unfinished": g.unfinished,
        "seeds": g.seeds,
        "best": g.best,
        "last": g.last,
        "best_mean": None if math.isnan(bm) else bm,
        "best_std": None if math.isnan(bs) else bs,
        "last_mean": None if math.isnan(lm) else lm,
        "last_std": None if math.isnan(ls) else ls,
        "reference": _refs(g),
        "run_dirs": [str(r.run_dir) for r in g.runs],
    }


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` / ``report.json`` / ``accuracy.png`` / ``curves.png`` /
    ``report.html`` for the runs under ``runs_dir``; returns the path of ``report.md``.

    ``runs_dir`` may be a suite's output folder (its ``runs/`` is used and its ``teachers/``
    give the teachers' accuracy) or any folder of relkd runs. ``out_dir`` defaults to the suite
    output folder (the parent of ``runs/``) or to ``runs_dir`` itself.
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
    (out / "report.json").write_text(
        json.dumps({"runs_dir": str(root), "groups": [_group_json(g) for g in groups]}, indent=2)
    )
    plotted = [t for t in tables if any(g.runs for g in t.groups)]
    images: dict[str, Path] = {}
    if plotted:
        plot_accuracy(plotted, out / "accuracy.png")
        plot_curves(plotted, out / "curves.png")
        images = {
            "Accuracy per method": out / "accuracy.png",
            "Test top-1 per epoch": out / "curves.png",
        }
    intro = _intro(groups, root)
    (out / "report.md").write_text(_markdown(tables, teachers_dir, groups, intro, images))
    (out / "report.html").write_text(_html(tables, teachers_dir, groups, intro, images))
    return out / "report.md"
