"""The benchmark report: its numbers are the runs' numbers; references, plots and HTML."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from relkd.bench import reference as ref
from relkd.bench import run_suite, write_report
from relkd.registry import RelkdError


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory, fmnist_root, tiny_teacher_ckpt) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    suite = {
        "name": "tiny",
        "base": {
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 2,
                "max_steps_per_epoch": 2,
                "progress": False,
                "tensorboard": False,
            },
        },
        "teachers": {"cnn_small": {"checkpoint": str(tiny_teacher_ckpt)}},
        "pairs": [["cnn_small", "cnn_tiny"]],
        "methods": [
            "ce",
            "kd",
            {"name": "kd_t2", "method": {"name": "kd", "args": {"temperature": 2.0}}},
        ],
        "seeds": [0, 1],
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp / "out"
    res = run_suite(path, out, progress=False)
    assert {r["status"] for r in res} == {"trained"}
    return out


def expected_groups(runs_dir: Path) -> dict[tuple, dict[str, list[float]]]:
    """Recomputed from the run folders alone: summary.json and the config."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for summary in sorted(runs_dir.rglob("summary.json")):
        s = json.loads(summary.read_text())
        label = json.loads((summary.parent / "bench.json").read_text())["method"]
        cfg = yaml.safe_load((summary.parent / "config.yaml").read_text())
        teacher = (cfg.get("teacher") or {}).get("name")
        g = groups.setdefault((label, teacher, cfg["student"]["name"]), {"best": [], "last": []})
        g["best"].append(s["best_top1"])
        g["last"].append(s["last_top1"])
        # summary.json agrees with metrics.jsonl
        top1 = [json.loads(x)["top1"] for x in (summary.parent / "metrics.jsonl").open()]
        assert s["best_top1"] == max(top1) and s["last_top1"] == top1[-1]
    return groups


def test_report_numbers_equal_the_runs(suite_out, tmp_path):
    path = write_report(suite_out / "runs", tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.md"
    want = expected_groups(suite_out / "runs")
    assert set(want) == {
        ("ce", None, "cnn_tiny"),
        ("kd", "cnn_small", "cnn_tiny"),
        ("kd_t2", "cnn_small", "cnn_tiny"),
    }
    got = {
        (g["method"], g["teacher"], g["student"]): g
        for g in json.loads((tmp_path / "rep/report.json").read_text())["groups"]
    }
    assert set(got) == set(want)
    md = path.read_text()
    for key, w in want.items():
        g = got[key]
        assert g["n"] == 2 and sorted(g["best"]) == sorted(w["best"])
        for k in ("best", "last"):
            mean, std = statistics.fmean(w[k]), statistics.stdev(w[k])
            assert g[f"{k}_mean"] == pytest.approx(mean, abs=1e-9)
            assert g[f"{k}_std"] == pytest.approx(std, abs=1e-9)
        cells = f"| {key[0]} | 2 | {statistics.fmean(w['best']):.2f} ± "
        cells += f"{statistics.stdev(w['best']):.2f} | {statistics.fmean(w['last']):.2f} ± "
        cells += f"{statistics.stdev(w['last']):.2f} |"
        assert cells in md, cells
    assert "## cnn_small → cnn_tiny (fashion_mnist)" in md
    # the Fashion-MNIST sanity numbers of the spec sit beside ce and kd (not beside kd_t2)
    assert "86.92 (spec, unspecified)" in md and "87.37 (spec, unspecified)" in md
    assert md.count("(spec, unspecified)") == 2


def test_report_files_plots_and_html(suite_out):
    path = write_report(suite_out)  # the suite's output folder works too; report goes there
    assert path == suite_out / "report.md"
    for name in ("accuracy.png", "curves.png"):
        data = (suite_out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = (suite_out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<table>" in page and "<td>kd_t2</td>" in page
    assert "unfinished" not in path.read_text()


def test_unfinished_runs_are_counted_not_averaged(suite_out, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(suite_out / "runs", runs)
    (runs / "kd/cnn_small_cnn_tiny/s1/summary.json").unlink()
    write_report(runs, tmp_path)
    groups = json.loads((tmp_path / "report.json").read_text())["groups"]
    kd = next(g for g in groups if g["method"] == "kd")
    assert kd["n"] == 1 and kd["unfinished"] == 1 and kd["best_std"] == 0.0
    assert "| kd | 1 (+1 unfinished) |" in (tmp_path / "report.md").read_text()


def fake_run(root: Path, method: str, teacher: str | None, student: str, seed: int, top1: list):
    """A run folder as relkd.train writes it (plain `relkd train` runs, no bench.json)."""
    run = root / f"{method}_{student}_s{seed}"
    run.mkdir(parents=True)
    cfg = {
        "student": {"name": student},
        "teacher": {"name": teacher} if teacher else None,
        "data": {"name": "cifar100"},
        "method": {"name": method},
        "train": {"seed": seed},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"epoch": i + 1, "top1": v} for i, v in enumerate(top1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"best_top1": max(top1), "last_top1": top1[-1]}
    (run / "summary.json").write_text(json.dumps(summary))


def test_reference_numbers_beside_ours(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "kd", "resnet56", "resnet20", 0, [60.0, 70.5, 70.2])
    fake_run(runs, "kd", "resnet56", "resnet20", 1, [61.0, 70.9, 70.8])
    fake_run(runs, "dkd", "resnet56", "resnet20", 0, [62.0, 71.0, 71.5])
    fake_run(runs, "ce", None, "resnet20", 0, [50.0, 69.0])
    md = write_report(runs, tmp_path / "rep").read_text()
    # CRD's number is a last-epoch one: compared with our last (mean 70.5)
    assert "| kd | 2 | 70.70 ± 0.28 | 70.50 ± 0.42 | 70.66 (CRD, last) | -0.16 (last) |" in md
    # DKD (mdistiller) reports the best epoch
    assert "| dkd | 1 | 71.50 | 71.50 | 71.97 (DKD, best) | -0.47 (best) |" in md
    assert "| ce | 1 | 69.00 | 69.00 | 69.06 (CRD, last) | -0.06 (last) |" in md
    assert "Teacher resnet56: reference 72.34 (CRD)" in md
    assert "arXiv 1910.10699" in md and "arXiv 2203.08679" in md
    with pytest.raises(RelkdError, match="no relkd run"):
        write_report(tmp_path / "rep")


def test_reference_tables():
    crd = ref.CRD_TABLE["rows"]
    assert len(crd["kd"]) == 13 and len(crd["fitnet"]) == 7
    assert ("wrn_40_2", "wrn_40_1") not in crd["fsp"]  # n/a in the paper
    assert crd["crd"][("wrn_40_2", "ShuffleV1")] == 76.05
    assert crd["teacher"][("ResNet50", "vgg8")] == 79.34
    dkd = ref.DKD_TABLE["rows"]["dkd"]
    assert len(dkd) == 12 and ("ResNet50", "vgg8") not in dkd
    assert ref.RRD_TABLE["rows"]["rrd+kd"][("resnet32x4", "ShuffleV2")] == 76.83
    assert {t["metric"] for t in ref.TABLES.values()} <= {"last", "best", "unspecified"}
    assert ref.CRD_TABLE["metric"] == "last" and ref.DKD_TABLE["metric"] == "best"
    assert all(t["source"] for t in ref.TABLES.values())
    assert ref.lookup("cifar100", "kd", "resnet56", "resnet20")[0]["value"] == 70.66
    assert ref.lookup("fashion_mnist", "kd", "resnet56", "resnet20") == []
    assert [r["value"] for r in ref.lookup("cifar100", "ce", None, "MobileNetV2")] == [64.60]
