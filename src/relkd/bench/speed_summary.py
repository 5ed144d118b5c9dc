"""Summaries of :func:`relkd.bench.speed.run_speed` records: the ratios of the speed targets
(:func:`speed_ratios`) and the markdown table / text lines ``relkd bench speed`` prints
(:func:`format_table`, :func:`format_ratios`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CACHED_RATIO = {
    "cached_step": "cached / ce",
    "cached_step_preloaded": "cached (preloaded) / ce",
    "cached_step_cold": "cached (cold page cache) / ce",
}


def speed_ratios(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios of the speed targets, from the records of ONE run_speed call.

    * ``online / (ce + teacher)``: online step median / (student CE step median + teacher
      forward median), per method and option set (target <= 1.05 for ``kd``);
    * ``cached / ce``, ``cached (preloaded) / ce``, ``cached (cold page cache) / ce``: cached
      step median / student CE step median (target <= 1.10 for ``kd``);
    * ``inmemory / dataloader(workers=W)``: InMemoryLoader images/s / DataLoader images/s
      (target >= 3).

    ``value`` is from the medians, ``value_mean`` from the means.
    """
    ok = [r for r in records if r["status"] == "ok"]
    out: list[dict[str, Any]] = []

    def opts(r: dict[str, Any]) -> tuple[Any, Any, Any]:
        return r["precision"], r["channels_last"], r["compile"]

    def find(config: str, o: tuple[Any, Any, Any]) -> dict[str, Any] | None:
        return next((r for r in ok if r["config"] == config and opts(r) == o), None)

    def add(name: str, r: dict[str, Any], over: list, target: str | None) -> None:
        """``r``'s time / the summed times of ``over``; ``target`` like ``"<= 1.05"``."""
        v, v_mean = (r[k] / sum(d[k] for d in over) for k in ("step_ms_median", "step_ms_mean"))
        meets = None
        if target is not None:
            bound = float(target.split()[1])
            meets = v <= bound if target.startswith("<=") else v >= bound
        o = opts(r)
        out.append({
            "ratio": name, "method": r["method"], "precision": o[0], "channels_last": o[1],
            "compile": o[2], "value": v, "value_mean": v_mean, "target": target, "meets": meets,
        })  # fmt: skip

    mem = next((r for r in ok if r["config"] == "data_inmemory"), None)
    for r in ok:
        o, kd = opts(r), r["method"] == "kd"
        ce, tf = find("student_ce_step", o), find("teacher_forward", o)
        if r["config"] == "online_step" and ce and tf:
            add("online / (ce + teacher)", r, [ce, tf], "<= 1.05" if kd else None)
        elif r["config"] in _CACHED_RATIO and ce:
            add(_CACHED_RATIO[r["config"]], r, [ce], "<= 1.10" if kd else None)
        elif r["config"] == "data_dataloader" and mem:
            # images/s ratio = the inverse ratio of the step times (images/s = batch / time)
            add(f"inmemory / dataloader(workers={r['workers']})", r, [mem], ">= 3")
    return out


#: The columns of :func:`format_table`: record key -> (header, format of a float value).
_COLUMNS = {
    "config": ("config", ""), "method": ("method", ""), "precision": ("precision", ""),
    "channels_last": ("channels_last", ""), "compile": ("compile", ""),
    "workers": ("workers", ""), "step_ms_median": ("ms/step median", ".2f"),
    "step_ms_mean": ("ms/step mean", ".2f"), "images_per_s": ("images/s", ".0f"),
    "peak_mem_mb": ("peak MiB", ".1f"), "step_mem_mb": ("step MiB", ".1f"),
    "file_mem_mb": ("file MiB", ".0f"), "disk_read_mb": ("disk read MB", ".1f"),
}  # fmt: skip


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = ["| " + " | ".join(h for h, _ in _COLUMNS.values()) + " |", "|---" * 13 + "|"]
    for r in records:
        cells = [
            "" if (v := r.get(k)) is None else format(v, f) if isinstance(v, float) else str(v)
            for k, (_, f) in _COLUMNS.items()
        ]
        if r["status"] != "ok":
            cells[6:] = [f"skipped: {r['reason']}"] + [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratios(ratios: Sequence[dict[str, Any]]) -> str:
    lines = []
    for q in ratios:
        opt = "" if q["precision"] is None else f" [{q['precision']}"
        if q["precision"] is not None:
            opt += (", channels_last" if q["channels_last"] else "") + (
                ", compile" if q["compile"] else ""
            )
            opt += "]"
        who = f" {q['method']}" if q["method"] else ""
        tgt = ""
        if q["target"]:
            tgt = f"  target {q['target']}: {'met' if q['meets'] else 'MISSED'}"
        lines.append(
            f"{q['ratio']}{who}{opt}: {q['value']:.3f} (means: {q['value_mean']:.3f}){tgt}"
        )
    return "\n".join(lines)
