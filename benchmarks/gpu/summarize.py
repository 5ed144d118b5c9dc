"""Collect the results of benchmarks/gpu/run.sh into ``OUT/summary.json`` and ``OUT/summary.md``.

    python benchmarks/gpu/summarize.py OUT                 # after the steps ran
    python benchmarks/gpu/summarize.py OUT --skipped WHY   # no GPU: a summary that says so

Reads ``OUT/<step>.rc.json`` (exit status and seconds of each step), ``OUT/tests.xml`` (pytest's
JUnit report), the JSON records that ``relkd bench speed --json`` printed into
``OUT/speed_*.log`` and the torchrun run folder ``OUT/torchrun/ce``. Exit status 1 when a step
failed or left no result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STEPS = ("tests", "speed_eager", "speed_compiled", "torchrun")


def _env() -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:
        return {"torch": None, "error": str(e)}
    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30)
    return env


def _tests(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"ok": False, "error": f"{path.name} missing (pytest did not finish)"}
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status, msg = ("skipped" if tag == "skipped" else "failed"), el.get("message", "")
        cases.append(
            {"test": name, "status": status, "message": msg.splitlines()[0] if msg else ""}
        )
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped")}
    return {"ok": counts["failed"] == 0 and counts["passed"] > 0, **counts, "cases": cases}


def _speed(path: Path) -> list[dict[str, Any]]:
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    recs.append(json.loads(line))
    return recs


def _torchrun(run: Path) -> dict[str, Any]:
    try:
        s = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {"ok": False, "error": f"no summary.json in {run}"}
    return {"ok": s.get("best_top1") is not None, **{k: s.get(k) for k in
            ("best_top1", "last_top1", "train_time_s", "epochs")}}  # fmt: skip


def _speed_table(recs: list[dict[str, Any]]) -> list[str]:
    rows = ["| config | method | precision | compile | ms/step (median) | images/s | peak MiB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in recs:
        if r.get("status") != "ok":
            rows.append(f"| {r.get('config')} | {r.get('method') or ''} | {r.get('precision')} | "
                        f"{'on' if r.get('compile') else 'off'} | skipped: {r.get('reason')} | | |")  # fmt: skip
            continue
        rows.append(
            f"| {r.get('config')} | {r.get('method') or ''} | {r.get('precision')} | "
            f"{'on' if r.get('compile') else 'off'} | {r.get('step_ms_median', float('nan')):.2f} | "
            f"{r.get('images_per_s', float('nan')):.0f} | {r.get('peak_mem_mb', float('nan')):.0f} |"
        )
    return rows


def summarize(out: Path, skipped: str | None = None) -> tuple[dict[str, Any], bool]:
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "env": _env(),
    }
    if skipped:
        summary.update(status="skipped", reason=skipped)
        return summary, True
    steps = {}
    for name in STEPS:
        try:
            steps[name] = json.loads((out / f"{name}.rc.json").read_text())
        except (OSError, ValueError):
            steps[name] = {"rc": None}
    summary["steps"] = steps
    summary["tests"] = _tests(out / "tests.xml")
    summary["speed"] = [*_speed(out / "speed_eager.log"), *_speed(out / "speed_compiled.log")]
    summary["torchrun"] = _torchrun(out / "torchrun" / "ce")
    ok = all(s.get("rc") == 0 for s in steps.values())
    ok &= summary["tests"]["ok"] and summary["torchrun"]["ok"] and bool(summary["speed"])
    summary["status"] = "ok" if ok else "failed"
    return summary, ok


def markdown(s: dict[str, Any]) -> str:
    env = s["env"]
    lines = ["# relkd GPU check", "",
             f"- date: {s['date']}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"GPU {env.get('gpu', 'none')}", f"- status: **{s['status']}**"]  # fmt: skip
    if s["status"] == "skipped":
        return "\n".join([*lines, f"- reason: {s['reason']}", ""])
    lines += ["", "## Steps", "", "| step | exit | seconds | limit |", "|---|---|---|---|"]
    for name, st in s["steps"].items():
        lines.append(
            f"| {name} | {st.get('rc')} | {st.get('seconds', '-')} | {st.get('limit_s', '-')} |"
        )
    t = s["tests"]
    lines += ["", "## CUDA tests", ""]
    if "cases" in t:
        lines.append(f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
        lines += [""] + [f"- {c['status']}: `{c['test']}` {c['message']}" for c in t["cases"]
                         if c["status"] != "passed"]  # fmt: skip
    else:
        lines.append(t.get("error", "?"))
    lines += [
        "",
        "## relkd bench speed: resnet32x4 -> resnet8x4, batch 64",
        "",
        *_speed_table(s["speed"]),
    ]
    tr = s["torchrun"]
    lines += [
        "",
        "## torchrun, 1 GPU (configs/fashion_mnist/ce.yaml, 2 epochs, synthetic data)",
        "",
    ]
    lines.append(json.dumps(tr))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--skipped", default=None, help="write a 'skipped' summary with this reason")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, ok = summarize(args.out, args.skipped)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(markdown(summary))
    print(f"GPU check {summary['status']}: {args.out / 'summary.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
