"""The report's tables for a paper and a spreadsheet: ``report.tex`` (LaTeX, booktabs) and
``report.csv``.

``report.tex`` holds one ``table`` environment per (teacher, student, data set): mean ± sample
std over seeds of the best-epoch and last-epoch top-1 (one column when they agree everywhere) and
the difference from the CE student; the teacher's own top-1 heads it, and the best value of each
column among the student rows is bold (ties: every tied row). It needs ``\\usepackage{booktabs}``.
``report.csv`` holds one row per method row of the report, with every seed's number.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relkd.bench.report_runs import eval_set_text, mean_std, recipe_text

if TYPE_CHECKING:
    from relkd.bench.report import Table

_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "→": r"$\rightarrow$",
    "±": r"$\pm$",
    "−": "-",
    "Δ": r"$\Delta$",
    "×": r"$\times$",
}


def tex_escape(text: str) -> str:
    """``text`` safe inside a LaTeX table (special characters escaped, arrows as math)."""
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _num(m: float, s: float | None, bold: bool) -> str:
    body = f"{m:.2f}" if s is None else f"{m:.2f} \\pm {s:.2f}"
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def latex_table(tab: Table, label: str) -> str:
    """One ``table`` environment for ``tab`` (see the module docstring)."""
    one = tab.collapsed
    ce = tab.ce
    ce_mean = mean_std(ce.best)[0] if ce else None
    rows = [g for g in tab.groups if g.runs]
    cols: list[tuple[str, Any]] = [("best", lambda g: g.best)]
    if not one:
        cols.append(("last", lambda g: g.last))
    # The best of each column, rounded as printed, so a tie in print is a tie in bold.
    best_of = {
        name: max(round(mean_std(get(g))[0], 2) for g in rows) if rows else None
        for name, get in cols
    }
    deltas = {id(g): mean_std(g.best)[0] - ce_mean for g in rows if ce_mean is not None}
    best_delta = max((round(d, 2) for g, d in deltas.items()), default=None)
    head = ["Method", "Seeds", "Top-1" if one else "Best top-1", *([] if one else ["Last top-1"])]
    head.append(r"$\Delta$ vs CE" if ce else None)
    head = [h for h in head if h is not None]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{tex_escape(tab.title)}: top-1 (\\%) on "
        f"{tex_escape(eval_set_text([tab.recipe], [n for g in rows for n in g.eval_images]))}, "
        f"mean $\\pm$ sample std over seeds. {tex_escape(recipe_text(tab.recipe))}.}}",
        f"\\label{{{label}}}",
        r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        r"\toprule",
        " & ".join(head) + r" \\",
        r"\midrule",
    ]
    t1 = tab.teacher_top1.get("top1")
    if tab.teacher is not None and t1 is not None:
        cells = [f"Teacher ({tex_escape(tab.teacher)})", "--"]
        cells += [_num(t1, None, False)] * len(cols)
        if ce:
            cells.append(f"${t1 - ce_mean:+.2f}$")
        lines += [" & ".join(cells) + r" \\", r"\midrule"]
    for g in rows:
        cells = [tex_escape(g.method), str(len(g.runs))]
        for name, get in cols:
            xs = get(g)
            m, s = mean_std(xs)
            cells.append(_num(m, s if len(xs) > 1 else None, round(m, 2) == best_of[name]))
        if ce:
            if g is ce:
                cells.append("--")
            else:
                d = deltas[id(g)]
                body = f"{d:+.2f}"
                cells.append(f"$\\mathbf{{{body}}}$" if round(d, 2) == best_delta else f"${body}$")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def write_latex(tables: list[Table], path: Path) -> Path:
    """``report.tex``: every table with runs, for ``\\input`` into a paper (needs booktabs)."""
    parts = [
        "% relkd accuracy report: one table per (teacher, student, data set).",
        "% Needs \\usepackage{booktabs}. Bold: the best value of the column among the rows below",
        "% the teacher (ties: every tied row).",
        "",
    ]
    for i, tab in enumerate(t for t in tables if any(g.runs for g in t.groups)):
        parts += [latex_table(tab, f"tab:relkd-{i + 1}"), ""]
    path.write_text("\n".join(parts))
    return path


CSV_COLUMNS = (
    "table", "method", "method_name", "teacher", "student", "dataset", "data", "eval_split",
    "test_subset", "eval_images", "n_seeds", "seeds", "best_mean", "best_std", "last_mean",
    "last_std", "delta_vs_ce_best", "train_time_s_mean", "best_per_seed", "last_per_seed",
)  # fmt: skip


def write_csv(tables: list[Table], path: Path) -> Path:
    """``report.csv``: one row per method row (the teacher's own top-1 as a row of its own,
    method ``teacher``); per-seed numbers joined with ``;`` in seed order."""

    def f(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else repr(round(x, 6))

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for tab in tables:
            ce = tab.ce
            ce_mean = mean_std(ce.best)[0] if ce and ce.runs else None
            split = "validation" if tab.recipe.get("val_split") else "test"
            base = {
                "table": tab.title, "teacher": tab.teacher or "", "student": tab.student,
                "dataset": tab.dataset, "data": tab.recipe.get("data") or "",
                "eval_split": split, "test_subset": tab.recipe.get("test_subset") or "",
            }  # fmt: skip
            t1 = tab.teacher_top1.get("top1")
            if tab.teacher is not None and t1 is not None:
                w.writerow({**base, "method": "teacher", "method_name": "teacher",
                            "best_mean": f(t1), "last_mean": f(t1),
                            "delta_vs_ce_best": f(t1 - ce_mean) if ce_mean is not None else ""})  # fmt: skip
            for g in tab.groups:
                if not g.runs:
                    continue
                (bm, bs), (lm, ls) = mean_std(g.best), mean_std(g.last)
                sizes = {n for n in g.eval_images if n is not None}
                w.writerow({
                    **base, "method": g.method, "method_name": g.method_name,
                    "teacher": g.teacher or "",
                    "eval_images": sizes.pop() if len(sizes) == 1 else "",
                    "n_seeds": len(g.runs), "seeds": ";".join(str(s) for s in g.seeds),
                    "best_mean": f(bm), "best_std": f(bs), "last_mean": f(lm), "last_std": f(ls),
                    "delta_vs_ce_best": f(bm - ce_mean) if ce_mean is not None else "",
                    "train_time_s_mean": f(statistics.fmean(g.times)) if g.times else "",
                    "best_per_seed": ";".join(repr(x) for x in g.best),
                    "last_per_seed": ";".join(repr(x) for x in g.last),
                })  # fmt: skip
    return path
