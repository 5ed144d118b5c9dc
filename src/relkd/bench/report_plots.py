"""The report's two figures: a dot plot of top-1 per method and the test curves, each as PNG,
PDF and SVG.

Every method keeps one colour and one marker in both figures (:func:`method_styles`), legends sit
outside the axes (saved with ``bbox_inches="tight"`` so nothing is clipped), and a method whose
best and last epoch agree gets one marker, not two.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relkd.bench.report import Table

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Text stays text in the vector files: editable in a paper's figure, fonts embedded as
    # TrueType in the PDF (venues reject Type 3 fonts).
    matplotlib.rcParams.update({"svg.fonttype": "none", "pdf.fonttype": 42})

    return plt


def method_styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    """``{method: (colour, marker)}``: ten colours x eleven markers, so every (colour, marker)
    pair is distinct for the first 110 methods and neighbours differ in both."""
    import matplotlib

    colours = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    out: dict[str, tuple[str, str]] = {}
    for m in methods:
        if m not in out:
            i = len(out)
            out[m] = (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)])
    return out


#: The figure formats written side by side: PNG for the HTML page, PDF and SVG for a paper.
FORMATS = ("png", "pdf", "svg")


def _save(fig, path: Path) -> list[Path]:
    """``path`` (a ``.png``) and its PDF / SVG twins; vector files carry no creation date, so a
    rerun on the same numbers writes the same bytes."""
    out = []
    for ext in FORMATS:
        p = path.with_suffix(f".{ext}")
        meta = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[ext]
        fig.savefig(p, dpi=200, bbox_inches="tight", metadata=meta)
        out.append(p)
    return out


def dot_rows(tab: Table) -> list:
    """The rows of a table's dot plot, best first: every group with finished runs except the CE
    student, which is drawn as a reference line (kept as a row only when it is the only one)."""
    from relkd.bench.report_runs import mean_std

    gs = [g for g in tab.groups if g.runs]
    ce = tab.ce
    if ce is not None and len(gs) > 1:
        gs = [g for g in gs if g is not ce]
    return sorted(gs, key=lambda g: -mean_std(g.best)[0])


def plot_accuracy(
    tables: list[Table], path: Path, styles: dict[str, tuple[str, str]], split: str = "test"
) -> list[Path]:
    """Per table: mean top-1 per method, best first, with std error bars and every seed as a
    small dot (filled: best epoch; hollow: last epoch, drawn only where it differs), the teacher
    and the CE student as vertical reference lines and the published numbers of the same recipe
    as black crosses. A dot plot, so the axis need not start at zero: the dots' positions, not
    bar lengths, carry the numbers. Writes ``path`` and its PDF / SVG twins; returns them."""
    from matplotlib.lines import Line2D

    from relkd.bench.reference import lookup
    from relkd.bench.report_runs import mean_std

    plt = _plt()
    rows = [dot_rows(t) for t in tables]
    heights = [0.32 * max(2, len(gs) + 1) + 1.0 for gs in rows]
    fig, axes = plt.subplots(
        len(tables), 1, figsize=(7.5, sum(heights)), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    drawn = {"last": False, "teacher": False, "ce": False, "ref": False, "seeds": False}
    for ax, tab, gs in zip(axes[:, 0], tables, rows):
        ys = list(range(len(gs)))[::-1]  # best row on top
        xs: list[float] = []
        for y, g in zip(ys, gs):
            colour, marker = styles[g.method]
            (bm, bs), (lm, ls) = mean_std(g.best), mean_std(g.last)
            same = all(r.best == r.last for r in g.runs)
            yb = y + (0 if same else 0.15)
            ax.errorbar(bm, yb, xerr=bs, fmt=marker, color=colour, ms=7, capsize=3, zorder=3)
            xs += [bm - bs, bm + bs, *g.best]
            if len(g.runs) > 1:  # each seed, so two seeds are not read as a distribution
                ax.plot(g.best, [yb] * len(g.best), "o", color="black", mfc=colour, ms=3.5,
                        mew=0.5, alpha=0.8, zorder=4)  # fmt: skip
                drawn["seeds"] = True
            if not same:
                ax.errorbar(lm, y - 0.15, xerr=ls, fmt=marker, color=colour, mfc="white",
                            ms=7, capsize=3, zorder=3)  # fmt: skip
                xs += [lm - ls, lm + ls, *g.last]
                drawn["last"] = True
                if len(g.runs) > 1:
                    ax.plot(g.last, [y - 0.15] * len(g.last), "o", color="black", mfc="white",
                            ms=3.5, mew=0.5, alpha=0.8, zorder=4)  # fmt: skip
            for r in lookup(g.dataset, g.method, g.teacher, g.student, g.recipe):
                ax.plot(r["value"], y, "x", color="black", ms=8, mew=2)
                xs.append(r["value"])
                drawn["ref"] = True
        t1 = tab.teacher_top1.get("top1")
        if t1 is not None:
            ax.axvline(t1, color="black", ls="--", lw=1)
            xs.append(t1)
            drawn["teacher"] = True
        if tab.ce is not None and tab.ce not in gs:
            ce_mean = mean_std(tab.ce.best)[0]
            ax.axvline(ce_mean, color="grey", ls=":", lw=1.2)
            xs.append(ce_mean)
            drawn["ce"] = True
        lo, hi = min(xs), max(xs)
        pad = max(0.5, 0.06 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-0.7, len(gs) - 0.3)
        ax.set_yticks(ys, [g.method for g in gs], fontsize=8)
        ax.set_title(tab.title, fontsize=9)
        ax.set_xlabel(f"{split} top-1 (%), mean ± std over seeds")
        ax.grid(axis="x", alpha=0.3)
    key = [Line2D([], [], marker="o", color="grey", ls="", label="best epoch (mean ± std)")]
    if drawn["seeds"]:
        key.append(Line2D([], [], marker="o", color="black", mfc="grey", ms=3.5, mew=0.5,
                          ls="", label="one seed"))  # fmt: skip
    if drawn["last"]:
        key.append(Line2D([], [], marker="o", color="grey", mfc="white", ls="",
                          label="last epoch (where different)"))  # fmt: skip
    if drawn["teacher"]:
        key.append(Line2D([], [], color="black", ls="--", label="teacher"))
    if drawn["ce"]:
        key.append(Line2D([], [], color="grey", ls=":", label="CE student (mean)"))
    if drawn["ref"]:
        key.append(Line2D([], [], marker="x", color="black", ls="", mew=2,
                          label="published (same recipe)"))  # fmt: skip
    fig.legend(handles=key, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8,
               frameon=False)  # fmt: skip
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_curves(
    tables: list[Table], path: Path, styles: dict[str, tuple[str, str]], split: str = "test"
) -> list[Path]:
    """Per table: ``split`` top-1 per epoch of each method, mean over its seeds; one legend for all
    panels, right of them. Writes ``path`` and its PDF / SVG twins; returns them."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    n_methods = len({g.method for t in tables for g in t.groups})
    height = max(3.6 * len(tables), 0.2 * n_methods / (1 if n_methods <= 16 else 2) + 1.0)
    fig, axes = plt.subplots(len(tables), 1, figsize=(7.5, height), squeeze=False)
    handles: dict[str, object] = {}
    for ax, tab in zip(axes[:, 0], tables):
        for g in tab.groups:
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for r in g.runs:
                for e, v in r.curve.items():
                    by_epoch[e].append(v)
            if not by_epoch:
                continue
            es = sorted(by_epoch)
            colour, marker = styles[g.method]
            (line,) = ax.plot(
                es, [statistics.fmean(by_epoch[e]) for e in es], color=colour, lw=1.3,
                marker=marker, ms=5, markevery=max(1, len(es) // 12), label=g.method,
            )  # fmt: skip
            handles.setdefault(g.method, line)
        t1 = tab.teacher_top1.get("top1")
        if t1 is not None:
            ax.axhline(t1, color="black", ls="--", lw=1)
        ax.set_title(tab.title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{split} top-1 (%), mean over seeds")
        ax.grid(alpha=0.3)
    if any(tab.teacher_top1.get("top1") is not None for tab in tables):
        (handles["teacher"],) = axes[0, 0].plot([], [], color="black", ls="--", lw=1)
    ncol = 1 if len(handles) <= 16 else 2
    fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.98),
               fontsize=8, ncol=ncol, frameon=False)  # fmt: skip
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
