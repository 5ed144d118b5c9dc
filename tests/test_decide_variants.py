"""benchmarks/decide_variants.py applies the validation study's pre-registered rule: checked on
report.json files written by the real report code from suite-style run folders, on hand-made
cases at each edge of the rule, and against the rule as the suite header states it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from relkd.bench import write_report

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "decide_variants", ROOT / "benchmarks" / "decide_variants.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dv = _module()


def _run(runs: Path, name: str, method: str, args: dict, seed: int, top1: list[float]) -> None:
    """A run folder as `relkd bench accuracy` writes it for a suite entry with a display name."""
    d = runs / name / "resnet20_resnet8" / f"s{seed}"
    d.mkdir(parents=True)
    cfg = {
        "data": {"name": "folder_jpg", "val_split": 0.1},
        "student": {"name": "resnet8"},
        "teacher": None if method == "ce" else {"name": "resnet20"},
        "method": {"name": method, "args": args},
        "train": {"seed": seed, "epochs": len(top1)},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = {
        "kind": "run",
        "method": name,
        "method_name": method,
        "student": "resnet8",
        "seed": seed,
    }
    meta["teacher"] = None if method == "ce" else "resnet20"
    (d / "bench.json").write_text(json.dumps(meta))
    recs = [{"epoch": i + 1, "top1": v} for i, v in enumerate(top1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"best_top1": max(top1), "last_top1": top1[-1], "train_time_s": 1.0}
    (d / "summary.json").write_text(json.dumps(summary))


def _report(tmp_path: Path, groups: dict[str, tuple[str, dict, list[float]]]) -> Path:
    """groups: display name -> (method, args, last-epoch top-1 per seed 0..n-1); the best epoch
    is an earlier, higher one, so a rule that read `best` would see other numbers."""
    runs = tmp_path / "runs"
    for name, (method, args, lasts) in groups.items():
        for seed, last in enumerate(lasts):
            _run(runs, name, method, args, seed, [last + 5.0, last])
    write_report(runs, tmp_path / "rep")
    return tmp_path / "rep" / "report.json"


def test_rule_on_reports_written_by_the_report_code(tmp_path):
    groups = {
        "ce": ("ce", {}, [60.0, 61.0, 62.0]),
        # default 70 +- 0.5; "ce1" wins every seed by ~2 points (margin 2 * 0.5 = 1): passes.
        "clkd-default": ("clkd", {"corr": "class"}, [69.5, 70.0, 70.5]),
        "clkd-ce1": ("clkd", {"corr": "class", "x": 1}, [71.6, 72.0, 72.4]),
        # wins every seed but by less than 2 std: stays.
        "clkd-sample": ("clkd", {"corr": "sample"}, [69.9, 70.4, 70.9]),
        # the largest mean, but loses seed 0: fails (a).
        "clkd-unsquared": ("clkd", {"corr_squared": False}, [69.4, 75.0, 75.5]),
        "cmkd-default": ("cmkd", {}, [70.0, 71.0, 72.0]),
        "cmkd-inverse": ("cmkd", {"difficulty": "inv"}, [69.0, 70.0, 71.0]),
    }
    report = _report(tmp_path, groups)
    text, chosen, complete = dv.decide(report, {"clkd": "clkd-default", "cmkd": "cmkd-default"})
    assert complete
    assert chosen == {"clkd": "clkd-ce1", "cmkd": "cmkd-default"}
    assert "**clkd-ce1 replaces clkd-default**" in text
    assert "**cmkd-default stays** (no clear difference)" in text
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| clkd")}
    assert "| 3/3 | yes |" in rows["clkd-ce1"] and "+2.00" in rows["clkd-ce1"]
    assert "| 3/3 | no |" in rows["clkd-sample"]
    assert "| 2/3 | no |" in rows["clkd-unsquared"]
    # Δ vs CE (mean 61): clkd-ce1 72.0 -> +11.00.
    assert rows["clkd-ce1"].rstrip().endswith("| +11.00 |")
    # The best epoch (5 points higher everywhere) is not what the rule reads by default.
    assert "72.00 ± 0.40" in rows["clkd-ce1"]
    assert "77.00 ± 0.40" in dv.decide(report, None, "best")[0]


def test_two_passing_variants_choose_the_higher_mean(tmp_path):
    report = _report(
        tmp_path,
        {
            "rrd-v4": ("rrd", {"version": "v4"}, [60.0, 60.1, 60.2]),
            "rrd-v5": ("rrd", {"version": "v5"}, [62.0, 62.1, 62.2]),
            "rrd-v6": ("rrd", {"version": "v6"}, [63.0, 63.1, 63.2]),
        },
    )
    _, chosen, complete = dv.decide(report, {"rrd": "rrd-v4"})
    assert chosen == {"rrd": "rrd-v6"} and complete


def test_judge_edges():
    base = {0: 70.0, 1: 70.0, 2: 70.0}
    # zero spread: any positive margin on every seed passes; a tie on one seed fails (a).
    assert dv.judge(base, {0: 70.01, 1: 70.01, 2: 70.01})["passes"]
    assert not dv.judge(base, {0: 70.0, 1: 71.0, 2: 71.0})["passes"]
    # the margin is twice the LARGER std: the variant's own spread counts.
    j = dv.judge(base, {0: 71.0, 1: 73.0, 2: 75.0})  # std 2, diff 3 < 4
    assert j["every_seed"] and not j["beyond_spread"] and j["margin"] == pytest.approx(4.0)
    # exactly at the margin is not "more than": stays.
    j = dv.judge({0: 69.0, 1: 70.0, 2: 71.0}, {0: 71.0, 1: 72.0, 2: 73.0})  # diff 2 == 2 * 1
    assert j["diff"] == pytest.approx(2.0) and j["margin"] == pytest.approx(2.0)
    assert not j["passes"]
    with pytest.raises(ValueError, match="seeds differ"):
        dv.judge(base, {0: 71.0, 1: 71.0})


def test_incomplete_report_fails_the_command(tmp_path, capsys):
    report = _report(
        tmp_path,
        {
            "cmkd-default": ("cmkd", {}, [70.0, 71.0, 72.0]),
            "cmkd-inverse": ("cmkd", {"difficulty": "inv"}, [75.0, 76.0]),  # a seed missing
        },
    )
    assert dv.main([str(report), "--default", "cmkd=cmkd-default"]) == 1
    out = capsys.readouterr().out
    assert "seeds differ" in out and "**none yet**" in out and "stays" not in out
    _, chosen, complete = dv.decide(report, {"cmkd": "cmkd-default"}, min_seeds=4)
    assert not complete and chosen == {}
    assert dv.main([str(report), "--default", "clkd=clkd-default"]) == 1  # default missing
    with pytest.raises(SystemExit):
        dv.main([str(report), "--default", "cmkd"])
    assert "expected METHOD=GROUP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dv.main([str(tmp_path / "nope.json")])
    assert "nope.json' not found" in capsys.readouterr().err


def test_the_rule_is_the_one_the_study_header_fixed():
    header = (ROOT / "src" / "relkd" / "suites" / "cifar10jpg-val-study.yaml").read_text()
    assert "it beats the default on each of the three" in header
    assert "twice the larger of the two sample standard" in header
    assert "last-epoch validation top-1" in header
    suite = yaml.safe_load(header)
    names = {m["name"] for m in suite["methods"] if isinstance(m, dict)}
    assert set(dv.STUDY_DEFAULTS.values()) <= names
    assert suite["seeds"] == [0, 1, 2]
