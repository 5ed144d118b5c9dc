"""The README's accuracy tables are promises about committed records: every number they quote
must be the one in the record's ``report.json`` (mean and sample std over seeds, delta vs CE,
teacher top-1), and every recorded rerun must still pass its ``compare_reports.py --exact``."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def _groups(name: str) -> dict[str, dict]:
    data = json.loads((RESULTS / name / "report.json").read_text())
    return {g["method"]: g for g in data["groups"]}


def _teacher_top1(name: str) -> float:
    data = json.loads((RESULTS / name / "report.json").read_text())
    return data["tables"][0]["teacher_top1"]


def _row(text: str, label: str, after: str = "") -> list[str]:
    """Cells of the first markdown table row whose first cell is ``label`` (after the first line
    that starts with ``after``)."""
    lines = text.splitlines()
    if after:
        lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith(after)) :]
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no table row {label!r}")


def _fmt(g: dict, metric: str = "best") -> str:
    return f"{g[metric + '_mean']:.2f} ± {g[metric + '_std']:.2f}"


def test_readme_long_suite_table_matches_its_record():
    groups = _groups("cifar10jpg-long")
    lines = [ln for ln in README.splitlines() if ln.startswith("| method | ce | dist")]
    assert len(lines) == 1
    methods = [c.strip() for c in lines[0].strip().strip("|").split("|")][1:]
    assert set(methods) == set(groups), "the README table lists every recorded method"
    top1 = _row(README, "top-1 (%), 16 epochs")
    delta = _row(README, "Δ vs CE, 16 epochs")
    for m, cell, d in zip(methods, top1, delta, strict=True):
        assert cell == _fmt(groups[m]), m
        if m != "ce":
            assert d == f"{groups[m]['delta_vs_ce_best']:+.2f}", m
    # The ranking the table claims: ordered by mean top-1, best first (CE first as the bar).
    means = [groups[m]["best_mean"] for m in methods[1:]]
    assert means == sorted(means, reverse=True)
    # The mini-suite's delta row quotes the mini's record.
    mini = _groups("cifar10jpg-mini")
    for m, d in zip(methods, _row(README, "Δ vs CE, mini (3 epochs)"), strict=True):
        if m in mini and m != "ce":
            assert d == f"{mini[m]['delta_vs_ce_best']:+.2f}", m
        else:
            assert d == "", m
    assert f"resnet20 {_teacher_top1('cifar10jpg-long'):.2f} %" in README


def test_readme_mini_tables_match_their_records():
    groups = _groups("cifar10jpg-mini")
    lines = [ln for ln in README.splitlines() if ln.startswith("| method | ce | kd | dkd")]
    assert len(lines) == 1
    methods = [c.strip() for c in lines[0].strip().strip("|").split("|")][1:]
    for m, cell in zip(methods, _row(README, "top-1 (%), 3 seeds"), strict=True):
        assert cell == _fmt(groups[m]), m
    fm = _groups("fmnist-mini")
    header = "| method | test top-1 (%), mean ± std over 3 seeds"
    for m, g in fm.items():
        assert _row(README, m, after=header)[0] == _fmt(g), m


def test_results_readme_of_the_long_suite_matches_its_record():
    text = (RESULTS / "cifar10jpg-long" / "README.md").read_text()
    groups = _groups("cifar10jpg-long")
    mini = _groups("cifar10jpg-mini")
    for m, g in groups.items():
        cells = _row(text, m)
        assert cells[0].startswith(_fmt(g)), m
        if g["last_mean"] != g["best_mean"]:
            assert f"(last {_fmt(g, 'last')})" in cells[0], m
        if m != "ce":
            assert cells[1] == f"{g['delta_vs_ce_best']:+.2f}", m
            want = f"{mini[m]['delta_vs_ce_best']:+.2f}" if m in mini else ""
            assert cells[2] == want, m
    teacher = _row(text, "teacher resnet20")
    assert teacher[0] == f"{_teacher_top1('cifar10jpg-long'):.2f}"
    assert teacher[2] == f"{_teacher_top1('cifar10jpg-mini'):.2f}"


def _benchmark_module(name: str):
    """A script of benchmarks/ loaded as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compare():
    return _benchmark_module("compare_reports").compare


@pytest.mark.parametrize(
    "name, rerun_dir, shared_only",
    [
        ("cifar10jpg-mini", "rerun", False),
        ("cifar10jpg-mini", "rerun-seams", False),
        ("cifar10jpg-mini", "rerun-final", False),
        ("fmnist-mini", "rerun", False),
        ("fmnist-mini", "rerun-seams", False),
        ("fmnist-mini", "rerun-final", False),
        ("cifar10jpg-long", "rerun", True),
        ("cifar10jpg-val-study", "rerun", True),
    ],
)
def test_recorded_reruns_still_pass_exact(name, rerun_dir, shared_only):
    """Each ``reproduction.md`` quotes a ``compare_reports.py --exact`` that passed (``rerun-seams``:
    the rerun after the engine-seams refactor of issue 24)."""
    rec, rerun = RESULTS / name / "report.json", RESULTS / name / rerun_dir / "report.json"
    assert f"{rerun_dir}/report.json" in (RESULTS / name / "reproduction.md").read_text()
    table, ok = _compare()(rec, rerun, shared_only=shared_only, exact=True)
    assert ok, table
    assert "--exact" in (RESULTS / name / "reproduction.md").read_text()
    # Every rerun group's table line reports a 0.00 max per-seed difference.
    assert re.findall(r"\| 0\.00 \|", table)
    assert not re.findall(r"\| (?!0\.00 )\d+\.\d\d \| (yes|no) \|", table)


def _settings(method) -> dict:
    """A built method's plain settings (numbers, strings, flags and dicts of them)."""
    plain = (bool, int, float, str, tuple, dict)
    return {k: v for k, v in vars(method).items() if not k.startswith("_") and isinstance(v, plain)}


def test_defaults_follow_the_recorded_validation_study():
    """relkd's defaults are what the committed study chose: for each studied method, building it
    with the studied switches left out gives the settings (and CE weight) of the chosen group."""
    from relkd.bench.suite import load_suite
    from relkd.methods import MethodContext, build_method

    dv = _benchmark_module("decide_variants")
    report = RESULTS / "cifar10jpg-val-study" / "report.json"
    _, chosen, complete = dv.decide(report)
    assert complete and chosen == {"clkd": "clkd-ce1", "cmkd": "cmkd-default", "rrd": "rrd-v5"}

    suite = load_suite(ROOT / "benchmarks" / "suites" / "cifar10jpg-val-study.yaml")
    sections = {e.label: e.section for e in suite.methods}
    ctx = MethodContext(
        num_classes=10, student_shapes={"pooled": (64,)}, teacher_shapes={"pooled": (64,)}
    )
    for method, group in chosen.items():
        variants = [s for lab, s in sections.items() if lab.startswith(method + "-")]
        flat = [{"ce_weight": s.get("ce_weight"), **s.get("args", {})} for s in variants]
        studied = {k for k in flat[0] if len({repr(f.get(k)) for f in flat}) > 1}
        assert studied, method  # the study varied something
        want = sections[group]
        args = dict(want.get("args", {}))
        rest = {k: v for k, v in args.items() if k not in studied}
        m_default, ce_default = build_method(method, ctx, rest)
        m_chosen, ce_chosen = build_method(method, ctx, args)
        assert _settings(m_default) == _settings(m_chosen), method
        assert ce_default == want.get("ce_weight", ce_chosen), method


def test_results_readme_of_the_study_matches_its_record():
    text = (RESULTS / "cifar10jpg-val-study" / "README.md").read_text()
    groups = _groups("cifar10jpg-val-study")
    assert len(groups) == 11
    for m, g in groups.items():
        cells = _row(text, m)
        assert cells[1] == _fmt(g, "last"), m  # the rule reads the last epoch
    # decision.md is the rule's output on the committed report, word for word
    dv = _benchmark_module("decide_variants")
    md, _, _ = dv.decide(RESULTS / "cifar10jpg-val-study" / "report.json")
    assert (RESULTS / "cifar10jpg-val-study" / "decision.md").read_text().strip() == md.strip()
    # the README's study paragraph quotes these groups
    for m in ("ce", "rrd-v5", "rrd-v4", "clkd-ce1", "clkd-default", "cmkd-default"):
        assert _fmt(groups[m], "last") in README, m
    for m in ("cmkd-inverse", "cmkd-nodiff", "cmkd-sortnet"):
        assert f"{groups[m]['last_mean']:.2f}" in README, m


def test_readme_cost_table_is_the_fmnist_records():
    """The README's cost table ("What a student costs") quotes the committed Fashion-MNIST
    record's re-rendered cost table row for row."""
    readme = (RESULTS.parents[1] / "README.md").read_text()
    record = (RESULTS / "fmnist-mini" / "report.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| cnn_") and "×" in line]
    assert len(rows) == 2
    for row in rows:
        assert row in record, row


# --------------------------------------------------------------------- what each folder holds
#: How a Files line says where its file came from (a command, or written by hand).
_ORIGIN = re.compile(
    r"`relkd |`python |run_speed\.sh|written by hand|the same re-render|the same command|"
    r"lists its files|reproduction\.md"
)


def _files_section(readme: Path) -> list[tuple[str, str]]:
    text = readme.read_text()
    assert "\n## Files\n" in text, f"{readme.relative_to(ROOT)} has no '## Files' section"
    section = text.split("\n## Files\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([^`]+)`: (.+)$", section, re.M)


RESULT_READMES = sorted(
    {p.parent for p in RESULTS.rglob("README.md")} | {d for d in RESULTS.iterdir() if d.is_dir()}
)


@pytest.mark.parametrize("folder", RESULT_READMES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_readme_lists_exactly_the_files_of_its_folder(folder):
    """Each results folder has a README whose Files section has one line per file or folder
    beside it (no more, no fewer), each saying what it is and the command that wrote it."""
    readme = folder / "README.md"
    assert readme.is_file(), f"{folder.relative_to(ROOT)} has no README.md"
    listed = _files_section(readme)
    names = [n for n, _ in listed]
    assert len(names) == len(set(names)), f"{readme}: a file listed twice"
    present = {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()}
    assert set(names) == present, (
        f"{readme.relative_to(ROOT)}: not listed {sorted(present - set(names))}, "
        f"listed but absent {sorted(set(names) - present)}"
    )
    for name, what in listed:
        assert _ORIGIN.search(what), f"{readme.relative_to(ROOT)}: {name} does not say its origin"
