"""Cost next to accuracy in the report: each pair's teacher and student profiled
(:mod:`relkd.deploy.profile`), a cost table after the pair's accuracy table, ``cost`` in
``report.json`` and ``cost.png`` (top-1 against MACs).

The cost comes from the architectures (parameters and MACs do not depend on the weights;
latency is timed on random images), so a report can be re-rendered with it from its
``report.json`` alone (:func:`relkd.bench.report_json.write_report_from_json`): no run folder, no
retraining. The input size and class count come from a run folder's exported student metadata,
else from the data set's name (CIFAR-10 / CIFAR-100: 3x32x32; Fashion-MNIST: 1x28x28), else
from ``input_shape`` / ``num_classes`` given by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relkd.bench.report import Table

#: (label prefix of the data, (C, H, W), classes): data sets whose input a report can infer.
_KNOWN_DATA = [
    ("CIFAR-100", (3, 32, 32), 100),
    ("CIFAR-10", (3, 32, 32), 10),
    ("Fashion-MNIST", (1, 28, 28), 10),
]


def _input_of(tab: Table) -> tuple[tuple[int, int, int], int] | None:
    """``((C, H, W), classes)`` of a table's models from a run's student metadata or its data."""
    from relkd.deploy.profile import run_metadata

    for g in tab.groups:
        for r in g.runs:
            if r.run_dir.is_dir():
                try:
                    meta = run_metadata(r.run_dir)
                except Exception:  # an unreadable student file: try the next run
                    meta = None
                if meta and {"in_chans", "image_size", "num_classes"} <= set(meta):
                    size = int(meta["image_size"])
                    return (int(meta["in_chans"]), size, size), int(meta["num_classes"])
    label = str(tab.recipe.get("data") or "")
    for prefix, shape, classes in _KNOWN_DATA:
        if label.startswith(prefix):
            return shape, classes
    return None


def _cost_entry(cost: Any) -> dict[str, Any]:
    lat = next((r for r in cost.latency if r["batch"] == 1 and r["mode"] == "eager"), None)
    return {
        "name": cost.name,
        "params": cost.params,
        "macs": cost.macs,
        "weight_bytes_fp32": cost.weight_bytes_fp32,
        "weight_bytes_fp16": cost.weight_bytes_fp16,
        "peak_activation_bytes": cost.peak_activation_bytes,
        "latency_ms": lat["median_ms"] if lat else None,
        "latency_q1_ms": lat["q1_ms"] if lat else None,
        "latency_q3_ms": lat["q3_ms"] if lat else None,
    }


def table_costs(
    tables: list[Table],
    *,
    latency: bool = True,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 5,
    input_shape: Any = None,
    num_classes: int | None = None,
) -> dict[int, dict[str, Any]]:
    """``{id(table): cost}`` for every table whose models can be built (see the module
    docstring); a model that cannot be built (a teacher passed from Python) is ``None``."""
    import torch

    from relkd.deploy.profile import machine_label, parse_input, profile_model

    out: dict[int, dict[str, Any]] = {}
    cache: dict[tuple, Any] = {}
    for tab in tables:
        found = _input_of(tab)
        shape = parse_input(input_shape) if input_shape is not None else (found or (None,))[0]
        classes = num_classes if num_classes is not None else (found[1] if found else None)
        if shape is None or classes is None:
            continue
        entry: dict[str, Any] = {"input_shape": list(shape), "num_classes": classes}
        costs = {}
        for role, name in (("teacher", tab.teacher), ("student", tab.student)):
            key = (name, shape, classes)
            if name is None:
                costs[role] = None
                continue
            if key not in cache:
                try:
                    cache[key] = profile_model(
                        name, shape, num_classes=classes, latency=latency, batches=(1,),
                        devices=["cpu"], threads=threads, warmup=warmup, repeats=repeats,
                    )  # fmt: skip
                except Exception:  # not a model name (a module passed from Python)
                    cache[key] = None
            costs[role] = cache[key]
        if costs["student"] is None:
            continue
        s, t = costs["student"], costs["teacher"]
        entry["student"] = _cost_entry(s)
        entry["teacher"] = _cost_entry(t) if t is not None else None
        entry["machine"] = (
            machine_label("cpu", threads or torch.get_num_threads()) if latency else None
        )
        entry["latency_batch"] = 1 if latency else None
        if t is not None:
            entry["params_x"] = t.params / s.params if s.params else None
            entry["macs_x"] = t.macs / s.macs if s.macs else None
            ts, ss = entry["teacher"]["latency_ms"], entry["student"]["latency_ms"]
            entry["speedup"] = ts / ss if ts and ss else None
        out[id(tab)] = entry
    return out


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f}"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def cost_view(tab: Table, cost: dict[str, Any]) -> dict[str, Any]:
    """A table view (as :func:`relkd.bench.report._table_view` returns) of a pair's cost."""
    header = ["model", "params", "MACs (batch 1)", "weights fp32", "peak activations"]
    timed = cost.get("machine") is not None
    header += ["CPU latency, batch 1 (ms)", "speed-up vs teacher"] if timed else []
    rows = []
    for role in ("teacher", "student"):
        c = cost.get(role)
        if c is None:
            continue
        row = [f"{c['name']} ({role})", _si(c["params"]), _si(c["macs"]),
               _mib(c["weight_bytes_fp32"]), _mib(c["peak_activation_bytes"])]  # fmt: skip
        if timed:
            lat = c["latency_ms"]
            row.append(
                "-"
                if lat is None
                else f"{lat:.2f} ({c['latency_q1_ms']:.2f}–{c['latency_q3_ms']:.2f})"
            )
            if role == "teacher":
                row.append("1.0×")
            else:
                sp = cost.get("speedup")
                row.append("-" if sp is None else f"{sp:.1f}×")
        rows.append(row)
    c, h, w = cost["input_shape"]
    notes = [f"Input {c}x{h}x{w}, {cost['num_classes']} classes. {_macs_note()}"]
    if cost.get("params_x"):
        notes.append(
            f"The student has {cost['params_x']:.1f}× fewer parameters and {cost['macs_x']:.1f}× "
            "fewer MACs than the teacher."
        )
    if timed:
        notes.append(
            f"Latency: median (quartiles) of timed batch-1 forwards after a warm-up, eager "
            f"PyTorch on {cost['machine']}; re-measured each time the report is written."
        )
    return {"title": f"Cost: {tab.title}", "header": header, "rows": rows, "notes": notes,
            "recipe": None, "tab": tab, "cost": True}  # fmt: skip


def _macs_note() -> str:
    return (
        "MACs: matmul, convolution and attention products of one forward (FLOPs/2 of "
        "torch.utils.flop_counter; bias, normalisation, activations, pooling and residual sums "
        "not counted)."
    )


def plot_cost(
    tables: list[Table],
    costs: dict[int, dict[str, Any]],
    path: Path,
    styles: dict[str, tuple[str, str]],
    split: str = "test",
) -> bool:
    """Per pair: top-1 (mean ± std over seeds, best epoch) against MACs (log scale) of the
    teacher, the CE student and every method; the methods share the student's MACs (dotted
    line) and are spread within +-10 % of it so their error bars stay apart. Returns False
    when no table has a cost."""
    from matplotlib.ticker import NullFormatter

    from relkd.bench.report_plots import _plt, _save
    from relkd.bench.report_runs import mean_std

    shown = [t for t in tables if id(t) in costs and any(g.runs for g in t.groups)]
    if not shown:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False)
    for ax, tab in zip(axes[0], shown):
        cost = costs[id(tab)]
        s_macs = cost["student"]["macs"]
        gs = [g for g in tab.groups if g.runs]
        n = len(gs)
        step = 1.2 ** (1 / max(n - 1, 1))  # all methods within +-10 % of the student's MACs
        ax.axvline(s_macs, color="grey", ls=":", lw=1, label=f"student ({tab.student}) MACs")
        for i, g in enumerate(gs):
            colour, marker = styles[g.method]
            m, sd = mean_std(g.best)
            x = s_macs * step ** (i - (n - 1) / 2)  # spread sideways (log space) to stay legible
            ax.errorbar(x, m, yerr=sd, fmt=marker, color=colour, ms=7, capsize=3, label=g.method)
        t1 = tab.teacher_top1.get("top1")
        if cost.get("teacher") is not None and t1 is not None:
            ax.plot(cost["teacher"]["macs"], t1, "*", color="black", ms=14,
                    label=f"teacher ({tab.teacher})")  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: no overlap
        ax.set_xlabel("MACs per image (batch-1 forward, log scale)")
        ax.set_ylabel(f"{split} top-1 (%), mean ± std over seeds")
        ax.set_title(tab.title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo / 1.5, hi * 1.5)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    _save(fig, path)  # PNG, PDF and SVG, like the report's other figures
    plt.close(fig)
    return True
