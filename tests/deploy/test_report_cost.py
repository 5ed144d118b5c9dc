"""Cost next to accuracy: the report's cost table, cost.png and report.json's numbers; a report
re-rendered from its report.json alone (the committed records); the demo's verdict line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from relkd.bench.report import write_report
from relkd.cli import main
from relkd.deploy.profile import count_params
from relkd.models import create_model

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RECORDS = sorted(p.parent.name for p in RESULTS.glob("*/report.json"))


def _accuracy_rows(md: str) -> list[str]:
    """Table rows of a report.md outside its "## Cost:" sections."""
    rows, in_cost = [], False
    for line in md.splitlines():
        if line.startswith("## "):
            in_cost = line.startswith("## Cost:")
        elif line.startswith("|") and not in_cost:
            rows.append(line)
    return rows


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_gains_a_cost_table_plot_and_json(kd_run, ce_run, tmp_path):
    md = write_report(kd_run.parent, tmp_path / "rep", evaluate_teachers=False).read_text()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    (tab,) = data["tables"]
    cost = tab["cost"]
    s_params = count_params(create_model("cnn_tiny", 10, in_chans=1))
    t_params = count_params(create_model("cnn_small", 10, in_chans=1))
    assert cost["student"]["params"] == s_params and cost["teacher"]["params"] == t_params
    assert cost["input_shape"] == [1, 28, 28] and cost["num_classes"] == 10
    assert cost["params_x"] == pytest.approx(t_params / s_params)
    assert cost["speedup"] == pytest.approx(
        cost["teacher"]["latency_ms"] / cost["student"]["latency_ms"]
    )
    assert "torch thread" in cost["machine"]
    assert "## Cost: cnn_small → cnn_tiny" in md and "speed-up vs teacher" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| cnn_tiny (student) |"))
    assert f"{s_params / 1e3:.2f} k" in row and row.rstrip(" |").endswith("×")
    assert cost["machine"] in md
    assert (tmp_path / "rep" / "cost.png").stat().st_size > 0
    assert "Cost: cnn_small" in (tmp_path / "rep" / "report.html").read_text()
    # accuracy only, on request
    md = write_report(kd_run.parent, tmp_path / "rep2", evaluate_teachers=False, cost=False)
    assert "## Cost" not in md.read_text() and not (tmp_path / "rep2" / "cost.png").exists()


@pytest.mark.parametrize("name", RECORDS)
def test_committed_records_rerender_from_their_json(name, tmp_path, capsys):
    """`relkd report --from-json`: the same groups and tables, every accuracy row of the
    committed report.md unchanged, plus each pair's cost (no run folder needed)."""
    src = tmp_path / "rec"
    shutil.copytree(RESULTS / name, src, ignore=shutil.ignore_patterns("rerun", "before-*"))
    code, _, err = _cli(
        ["report", "--from-json", str(src / "report.json"), "--out", str(tmp_path / "new"),
         "--no-latency"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    old = json.loads((RESULTS / name / "report.json").read_text())
    new = json.loads((tmp_path / "new" / "report.json").read_text())
    assert new["runs_dir"] == old["runs_dir"]
    for a, b in zip(old["groups"], new["groups"], strict=True):
        assert {k: b[k] for k in a} == a  # (keys added to report.json since: at their default)
    for a, b in zip(old["tables"], new["tables"], strict=True):
        cost = b.pop("cost")
        a.pop("cost", None)  # a record already re-rendered with its cost
        assert a == b
        t_params = count_params(create_model(a["teacher"], cost["num_classes"],
                                             in_chans=cost["input_shape"][0]))  # fmt: skip
        assert cost["teacher"]["params"] == t_params
        assert cost["student"]["macs"] < cost["teacher"]["macs"]
        assert cost["machine"] is None  # --no-latency: nothing timed, nothing claimed
    new_md = (tmp_path / "new" / "report.md").read_text()
    rows = _accuracy_rows(new_md)
    for g in old["groups"]:
        cells = [r for r in rows if r.startswith(f"| {g['method']} |")]
        want = f"{g['best_mean']:.2f}" + (f" ± {g['best_std']:.2f}" if g["n"] > 1 else "")
        assert any(want in r for r in cells), (g["method"], want, cells)
    assert "## Cost:" in new_md and re.search(r"!\[.*MACs\]\(cost\.png\)", new_md)
    assert (tmp_path / "new" / "curves.png").is_file()  # copied: curves are not in the JSON


def test_from_json_renders_what_the_runs_rendered(kd_run, ce_run, tmp_path):
    """A report written from the run folders and the same report re-rendered from its
    report.json alone are the same page (but the line saying so and the generation time)."""
    from relkd.bench.report_json import write_report_from_json

    first = write_report(kd_run.parent, tmp_path / "a", evaluate_teachers=False, latency=False)
    again = write_report_from_json(tmp_path / "a" / "report.json", tmp_path / "b", latency=False)

    def body(md: str) -> list[str]:
        skip = ("generated", "Re-rendered")
        return [ln for ln in md.splitlines() if ln.strip() and not any(w in ln for w in skip)]

    assert body(again.read_text()) == body(first.read_text())
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["groups"] == b["groups"] and a["tables"] == b["tables"]
    assert (tmp_path / "b" / "report.csv").read_text() == (
        tmp_path / "a" / "report.csv"
    ).read_text()


def test_report_cli_errors(tmp_path, capsys):
    code, _, err = _cli(["report"], capsys)
    assert code == 2 and "--from-json" in err
    code, _, err = _cli(["report", "--from-json", str(tmp_path / "r.json")], capsys)
    assert code == 2 and "--out" in err
    (tmp_path / "r.json").write_text("{}")
    code, _, err = _cli(["report", "--from-json", str(tmp_path / "r.json"), "--out",
                         str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and "not a relkd report.json" in err


def test_demo_verdict_line():
    from relkd.demo import verdict

    rows = {"ce": {"last": [80.0, 80.4]}, "kd": {"last": [81.0, 81.4]}, "rrd": {"last": [81.9]}}
    line = verdict(rows, teacher_top1=90.0)
    ratio = count_params(create_model("cnn_small", 10, in_chans=1)) / count_params(
        create_model("cnn_tiny", 10, in_chans=1)
    )
    assert line.startswith(f"student cnn_tiny: {ratio:.0f}x fewer parameters and ")
    assert "faster than its teacher on this CPU at batch 1" in line
    assert "; rrd +1.7 over plain training, -8.1 vs the teacher" in line
    assert "\n" not in line
