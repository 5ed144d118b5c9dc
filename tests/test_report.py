"""The benchmark report: its numbers are the runs' numbers; references, plots and HTML."""

from __future__ import annotations

import itertools
import json
import os
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


def md_row(md: str, label: str) -> list[str]:
    """The cells of the table row of ``label`` in a Markdown report."""
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_numbers_equal_the_runs(suite_out, tmp_path, tiny_teacher_ckpt):
    path = write_report(suite_out / "runs", tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.md"
    want = expected_groups(suite_out / "runs")
    assert set(want) == {
        ("ce", None, "cnn_tiny"),
        ("kd", "cnn_small", "cnn_tiny"),
        ("kd_t2", "cnn_small", "cnn_tiny"),
    }
    report = json.loads((tmp_path / "rep/report.json").read_text())
    got = {(g["method"], g["teacher"], g["student"]): g for g in report["groups"]}
    assert set(got) == set(want)
    md = path.read_text()
    header = md_row(md, "method")
    collapsed = all(w["best"] == w["last"] for w in want.values())
    assert ("top-1" in header) == collapsed and ("last top-1" in header) != collapsed
    ce_best = statistics.fmean(want[("ce", None, "cnn_tiny")]["best"])
    for key, w in want.items():
        g = got[key]
        assert g["n"] == 2 and sorted(g["best"]) == sorted(w["best"])
        for k in ("best", "last"):
            mean, std = statistics.fmean(w[k]), statistics.stdev(w[k])
            assert g[f"{k}_mean"] == pytest.approx(mean, abs=1e-9)
            assert g[f"{k}_std"] == pytest.approx(std, abs=1e-9)
        row = dict(zip(header, md_row(md, key[0])))
        b = f"{statistics.fmean(w['best']):.2f} ± {statistics.stdev(w['best']):.2f}"
        assert row["top-1" if collapsed else "best top-1"] == b
        if not collapsed:
            assert (
                row["last top-1"]
                == f"{statistics.fmean(w['last']):.2f} ± {statistics.stdev(w['last']):.2f}"
            )
        # the delta column against the CE student, recomputed here
        delta = statistics.fmean(w["best"]) - ce_best
        assert g["delta_vs_ce_best"] == pytest.approx(delta, abs=1e-9)
        assert row["Δ vs CE"] == ("(baseline)" if key[0] == "ce" else f"{delta:+.2f}")
        # wall time per run: the mean of the runs' own train_time_s
        times = [json.loads((tmp_path / "rep" / d / "summary.json").read_text())["train_time_s"]
                 for d in g["run_dirs"]]  # fmt: skip
        assert g["train_time_s"] == pytest.approx(times)
    # run folders relative to the report, and they resolve
    assert report["runs_dir"] == os.path.relpath(suite_out / "runs", tmp_path / "rep")
    for g in report["groups"]:
        assert all(not Path(d).is_absolute() for d in g["run_dirs"])
        assert all((tmp_path / "rep" / d / "config.yaml").is_file() for d in g["run_dirs"])
    assert "## cnn_small → cnn_tiny (Fashion-MNIST)" in md
    # the teacher's top-1 (a checkpoint teacher): its run folder's last epoch, also as a row
    t_last = json.loads((tiny_teacher_ckpt.parent / "summary.json").read_text())["last_top1"]
    assert report["tables"][0]["teacher_top1"] == t_last
    row = dict(zip(header, md_row(md, "teacher (cnn_small)")))
    assert row["top-1" if collapsed else "best top-1"] == f"{t_last:.2f}"
    assert row["Δ vs CE"] == f"{t_last - ce_best:+.2f}"
    # the recipe heads the report; a 2-epoch smoke run gets no reference numbers at all
    assert "Recipe: Fashion-MNIST, full training set, 2 epochs, batch 32, SGD, lr 0.05" in md
    assert "at most 2 steps per epoch" in md
    assert "reference" not in header and "(spec" not in md and "methods.md" not in md


def test_report_files_plots_and_html(suite_out):
    path = write_report(suite_out)  # the suite's output folder works too; report goes there
    assert path == suite_out / "report.md"
    for name in ("accuracy.png", "curves.png", "cost.png"):
        data = (suite_out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = (suite_out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
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


CRD_RECIPE = {
    "data": {"name": "cifar100", "batch_size": 64, "train_subset": None},
    "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
    "schedule": {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1},
    "train": {"epochs": 240, "max_steps_per_epoch": None},
}


def fake_run(
    root: Path,
    method: str,
    teacher: str | None,
    student: str,
    seed: int,
    top1: list,
    recipe: dict | None = None,
    summary: dict | None = None,
):
    """A run folder as relkd.train writes it (plain `relkd train` runs, no bench.json)."""
    run = root / f"{method}_{student}_s{seed}"
    run.mkdir(parents=True)
    cfg = {**(recipe or {"data": {"name": "cifar100"}})}
    cfg.update(student={"name": student}, teacher={"name": teacher} if teacher else None)
    cfg.update(method={"name": method}, train={**cfg.get("train", {}), "seed": seed})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"epoch": i + 1, "top1": v} for i, v in enumerate(top1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = {
        "best_top1": max(top1),
        "last_top1": top1[-1],
        "train_time_s": 30.0 + seed,
        **(summary or {}),
    }
    (run / "summary.json").write_text(json.dumps(s))


def crd_runs(runs: Path, recipe: dict) -> None:
    fake_run(runs, "kd", "resnet56", "resnet20", 0, [60.0, 70.5, 70.2], recipe)
    fake_run(runs, "kd", "resnet56", "resnet20", 1, [61.0, 70.9, 70.8], recipe)
    fake_run(runs, "dkd", "resnet56", "resnet20", 0, [62.0, 71.0, 71.5], recipe)
    fake_run(runs, "ce", None, "resnet20", 0, [50.0, 69.0], recipe)


def test_reference_numbers_beside_runs_of_their_recipe(tmp_path):
    runs = tmp_path / "runs"
    crd_runs(runs, CRD_RECIPE)
    md = write_report(runs, tmp_path / "rep").read_text()
    header = md_row(md, "method")
    assert header == ["method", "seeds", "best top-1", "last top-1", "Δ vs CE",
                      "train time / run", "reference", "ours − ref"]  # fmt: skip
    # CRD's number is a last-epoch one: compared with our last (mean 70.5)
    assert md_row(md, "kd") == ["kd", "2", "70.70 ± 0.28", "70.50 ± 0.42", "+1.70", "30 s",
                                "70.66 (CRD, last)", "-0.16 (last)"]  # fmt: skip
    # DKD (mdistiller) reports the best epoch
    assert md_row(md, "dkd")[-2:] == ["71.97 (DKD, best)", "-0.47 (best)"]
    assert md_row(md, "ce")[4:] == ["(baseline)", "30 s", "69.06 (CRD, last)", "-0.06 (last)"]
    assert "Recipe: CIFAR-100, full training set, 240 epochs, batch 64, SGD, lr 0.05" in md
    assert "multistep 150,180,210 ×0.1 schedule" in md
    assert "arXiv 1910.10699" in md and "arXiv 2203.08679" in md
    # no teacher checkpoint anywhere: the teacher row is absent and the note says why
    assert "Teacher resnet56: top-1 not recorded (no checkpoint in the run's config)." in md
    with pytest.raises(RelkdError, match="no relkd run"):
        write_report(tmp_path / "rep")

    # The same pair with a 2-epoch recipe: no published number, a note says why.
    short = json.loads(json.dumps(CRD_RECIPE))
    short["train"]["epochs"] = 2
    crd_runs(tmp_path / "short", short)
    md = write_report(tmp_path / "short", tmp_path / "rep2").read_text()
    assert "70.66" not in md and "reference" not in md_row(md, "method")
    assert "CRD publishes numbers for this pair with another recipe (240 epochs" in md
    groups = json.loads((tmp_path / "rep2/report.json").read_text())["groups"]
    assert all(g["reference"] == [] for g in groups)


def test_teacher_top1_recorded_by_the_run_or_evaluated_once(
    tmp_path, fmnist_root, tiny_teacher_ckpt, monkeypatch
):
    import shutil

    import torch

    from relkd.bench import teachers
    from relkd.data import build_datasets
    from relkd.models import create_model, load_checkpoint

    # a teacher passed from Python: the run recorded its top-1 in summary.json
    runs = tmp_path / "runs"
    rec = {"data": {"name": "fashion_mnist"}}
    fake_run(runs, "kd", "mynet", "cnn_tiny", 0, [50.0], rec, {"teacher_top1": 91.25})
    md = write_report(runs, tmp_path / "rep").read_text()
    assert "Teacher mynet: 91.25 (recorded by the run)." in md
    assert md_row(md, "teacher (mynet)")[2] == "91.25"

    # ... and without that record: the table still says it distilled from a teacher
    fake_run(tmp_path / "py", "kd", None, "cnn_tiny", 0, [50.0], rec)
    md = write_report(tmp_path / "py", tmp_path / "rep_py").read_text()
    assert "## teacher passed from Python → cnn_tiny (Fashion-MNIST)" in md
    assert "the run recorded no accuracy for its nn.Module teacher" in md

    # a bare checkpoint (no run folder beside it) is evaluated once on the test split
    bare = tmp_path / "bare" / "teacher.pt"
    bare.parent.mkdir()
    shutil.copy(tiny_teacher_ckpt, bare)
    runs = tmp_path / "runs2"
    rec = {"data": {"name": "fashion_mnist", "root": str(fmnist_root)}}
    fake_run(runs, "kd", "cnn_small", "cnn_tiny", 0, [50.0], rec)
    cfg = yaml.safe_load((runs / "kd_cnn_tiny_s0/config.yaml").read_text())
    cfg["teacher"]["checkpoint"] = str(bare)
    (runs / "kd_cnn_tiny_s0/config.yaml").write_text(yaml.safe_dump(cfg))
    write_report(runs, tmp_path / "rep2")
    # independent evaluation: every test image, argmax of the logits
    _, test_ds, info = build_datasets("fashion_mnist", str(fmnist_root))
    model = load_checkpoint(create_model("cnn_small", info.num_classes, in_chans=1), bare).eval()
    with torch.no_grad():
        xs, ys = zip(*(test_ds[i][:2] for i in range(len(test_ds))))
        top1 = 100.0 * float(
            (model(torch.stack(xs)).argmax(1) == torch.as_tensor(ys)).float().mean()
        )
    t = json.loads((tmp_path / "rep2/report.json").read_text())["tables"][0]
    assert t["teacher_top1"] == pytest.approx(top1, abs=1e-6)
    assert t["teacher_top1_source"] == "evaluated on the test split"

    # a second report reads the cached number: no second evaluation
    def boom(*a, **k):
        raise AssertionError("evaluated twice")

    monkeypatch.setattr(teachers, "evaluate_checkpoint", boom)
    write_report(runs, tmp_path / "rep2")
    t2 = json.loads((tmp_path / "rep2/report.json").read_text())["tables"][0]
    assert t2["teacher_top1"] == t["teacher_top1"]
    # a missing checkpoint says so instead of failing
    cfg["teacher"]["checkpoint"] = str(tmp_path / "gone.pt")
    (runs / "kd_cnn_tiny_s0/config.yaml").write_text(yaml.safe_dump(cfg))
    md = write_report(runs, tmp_path / "rep3").read_text()
    assert f"not recorded (checkpoint {tmp_path / 'gone.pt'} not found)" in md


def test_data_sets_named_by_what_they_are(tmp_path):
    from relkd.bench.report import data_label

    assert data_label("folder_jpg", "/tmp/x/cifar10-jpg") == "CIFAR-10 JPEG"
    assert data_label("folder_jpg", "data/cifar100_jpg/") == "CIFAR-100 JPEG"
    assert data_label("folder_jpg", "/data/flowers") == "JPEG folder flowers"
    assert data_label("imagefolder", "/data/imagenet") == "ImageNet"
    assert data_label("cifar100") == "CIFAR-100" and data_label("fashion_mnist") == "Fashion-MNIST"
    assert data_label("folder_jpg", "/tmp/x/cifar10-jpg", "my label") == "my label"
    runs = tmp_path / "runs"
    rec = {"data": {"name": "folder_jpg", "root": "/somewhere/cifar10-jpg", "train_subset": 10000}}
    fake_run(runs, "ce", None, "resnet8", 0, [40.0, 41.0], rec)
    md = write_report(runs, tmp_path / "rep").read_text()
    assert "## resnet8, no teacher (CIFAR-10 JPEG)" in md and "folder_jpg" not in md
    assert "10000-image training subset" in md


def test_runs_differing_in_method_settings_are_rows_not_seeds(tmp_path):
    """Two plain `relkd train` runs of kd at temperatures 2 and 4 (seed 0 each) are two
    variants; averaging them as two seeds would report a spread that is not seed noise."""
    for t, top1 in ((2.0, [40.0, 44.0]), (4.0, [41.0, 48.0])):
        rec = {"data": {"name": "cifar10"}, "method": {"args": {"temperature": t}}}
        fake_run(tmp_path / "r" / str(t), "kd", "resnet20", "resnet8", 0, top1, rec)
    # fake_run sets method.name; put the args back under it
    for t in (2.0, 4.0):
        cfgp = next((tmp_path / "r" / str(t)).glob("*/config.yaml"))
        cfg = yaml.safe_load(cfgp.read_text())
        cfg["method"]["args"] = {"temperature": t}
        cfgp.write_text(yaml.safe_dump(cfg))
    md = write_report(tmp_path / "r", tmp_path / "rep").read_text()
    assert md_row(md, "kd (args.temperature=2.0)")[2] == "44.00"
    assert md_row(md, "kd (args.temperature=4.0)")[2] == "48.00"
    # same settings twice: seeds of one row, as before
    for seed, top1 in ((0, [40.0, 44.0]), (1, [41.0, 46.0])):
        rec = {"data": {"name": "cifar10"}}
        fake_run(tmp_path / "s", "kd", "resnet20", "resnet8", seed, top1, rec)
    md = write_report(tmp_path / "s", tmp_path / "rep2").read_text()
    assert md_row(md, "kd")[2].startswith("45.00 ± 1.41")


def test_validation_split_runs_are_labelled_validation_not_test(tmp_path):
    """A suite run with data.val_split is evaluated on the hold-out: the report must not call
    its numbers test top-1 (the val-study suite chooses defaults from them)."""
    val = {"data": {"name": "cifar10", "val_split": 0.1, "val_seed": 3}}
    fake_run(tmp_path / "v", "ce", None, "resnet8", 0, [40.0, 41.0], val)
    fake_run(tmp_path / "v", "kd", "resnet20", "resnet8", 0, [42.0, 43.0], val)
    md = write_report(tmp_path / "v", tmp_path / "rv").read_text()
    assert "Top-1 (%) on the validation split" in md and "on the test split" not in md
    assert "top-1 on a 10 % validation hold-out (val_seed 3)" in md
    rep = json.loads((tmp_path / "rv" / "report.json").read_text())
    assert rep["recipe"]["val_split"] == "10 % validation hold-out (val_seed 3)"
    # Plain runs keep "test"; a mix names both and each table says which.
    fake_run(tmp_path / "m", "ce", None, "resnet8", 0, [40.0, 41.0], val)
    fake_run(tmp_path / "m", "kd", "resnet20", "resnet20", 0, [42.0], {"data": {"name": "cifar10"}})
    md = write_report(tmp_path / "m", tmp_path / "rm").read_text()
    assert "on the test or validation split (see each table's recipe)" in md
    fake_run(tmp_path / "t", "ce", None, "resnet8", 0, [40.0, 41.0], {"data": {"name": "cifar10"}})
    md = write_report(tmp_path / "t", tmp_path / "rt").read_text()
    assert "Top-1 (%) on the test split" in md and "validation" not in md


def test_method_styles_are_distinct():
    from relkd.bench.report_plots import method_styles

    names = [f"m{i}" for i in range(30)]
    styles = method_styles(names + names[:3])
    assert list(styles) == names
    assert len(set(styles.values())) == 30  # every (colour, marker) pair differs
    pairs = list(styles.values())
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in itertools.pairwise(pairs))


def test_html_escapes_what_it_shows(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "<b>x</b>", None, "resnet20", 0, [50.0, 51.0])
    write_report(runs, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_committed_results_stay_readable(tmp_path):
    """benchmarks/results/*/report.json (written before the report changed) still compare, with
    themselves and with a report in today's format."""
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("compare_reports", root / "compare_reports.py")
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)
    recorded = sorted(root.glob("results/*/report.json"))
    assert len(recorded) >= 2
    for path in recorded:
        table, ok = cr.compare(path, path)
        assert ok and "| ce |" in table and "missing" not in table
    runs = tmp_path / "runs"
    crd_runs(runs, CRD_RECIPE)
    write_report(runs, tmp_path / "a")
    table, ok = cr.compare(tmp_path / "a/report.json", tmp_path / "a/report.json")
    assert ok and "| kd |" in table
    # A partial rerun (one method's group only): missing groups fail, unless --shared-only.
    full = json.loads((tmp_path / "a/report.json").read_text())
    part = dict(full, groups=[g for g in full["groups"] if g["method"] == "kd"])
    (tmp_path / "part.json").write_text(json.dumps(part))
    table, ok = cr.compare(tmp_path / "a/report.json", tmp_path / "part.json")
    assert not ok and "missing" in table
    table, ok = cr.compare(tmp_path / "a/report.json", tmp_path / "part.json", shared_only=True)
    assert ok and "| kd |" in table and "left out" in table and "| ce |" not in table
    # ... and a changed number still fails.
    bad = json.loads(json.dumps(part))
    bad["groups"][0]["best"] = [x - 50 for x in bad["groups"][0]["best"]]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert not cr.compare(tmp_path / "a/report.json", tmp_path / "bad.json", shared_only=True)[1]
    # --exact: a one-seed rerun equal to its recorded seed passes; 0.01 off fails, although it is
    # well within 2 std of the recorded seeds.
    one = json.loads(json.dumps(part))
    g = one["groups"][0]
    g["seeds"], g["best"] = g["seeds"][:1], g["best"][:1]
    (tmp_path / "one.json").write_text(json.dumps(one))
    args = (tmp_path / "a/report.json", tmp_path / "one.json")
    assert cr.compare(*args, shared_only=True, exact=True)[1]
    g["best"] = [g["best"][0] + 0.01]
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert cr.compare(*args, shared_only=True)[1]
    assert not cr.compare(*args, shared_only=True, exact=True)[1]


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
    assert "fashion_mnist" not in {t["dataset"] for t in ref.TABLES.values()}  # not a paper's
    assert all(set(t["recipe"]) == set(ref.RECIPE_KEYS) for t in ref.TABLES.values())
    # a recipe decides: the CRD recipe matches, a shorter one does not
    crd = {"epochs": 240, "batch": 64, "schedule": "multistep 150,180,210 ×0.1", "subset": None,
           "steps_per_epoch": None}  # fmt: skip
    assert ref.lookup("cifar100", "kd", "resnet56", "resnet20", crd)[0]["value"] == 70.66
    for change in ({"epochs": 2}, {"subset": 10000}, {"batch": 128}, {"steps_per_epoch": 5}):
        assert ref.lookup("cifar100", "kd", "resnet56", "resnet20", {**crd, **change}) == []
    assert [r["value"] for r in ref.lookup("cifar100", "ce", None, "MobileNetV2")] == [64.60]


CHROMIUM = Path("/usr/bin/chromium")
CHECK_JS = """<script>window.addEventListener("load", () => {
  const r = [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);
  const p = document.createElement("pre");
  p.id = "relkd-check";
  p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian package chromium) on this machine"
)
def test_report_html_renders_in_a_real_browser(suite_out, tmp_path):
    """report.html opened headless in Chromium: every figure decodes, at the PNG's own size. A
    deliberately broken image beside them must read as not loaded (the check can fail)."""
    import re
    import struct
    import subprocess

    write_report(suite_out, tmp_path)
    page = (tmp_path / "report.html").read_text()
    broken = '<img alt="control" src="data:image/png;base64,iVBORw0KGgoAAAAN">'
    (tmp_path / "check.html").write_text(page.replace("</body>", broken + CHECK_JS + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]  # fmt: skip
    url = (tmp_path / "check.html").as_uri()
    dom = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    m = re.search(r'<pre id="relkd-check">([^<]*)</pre>', dom)
    assert m, "the page's load handler did not run"
    images = {alt: (done, w, h) for alt, done, w, h in json.loads(m.group(1))}
    figures = {
        "Top-1 per method": "accuracy.png",
        "Test top-1 per epoch": "curves.png",
        "Test top-1 against MACs": "cost.png",
    }
    assert set(images) == {*figures, "control"}
    assert images["control"][1] == 0
    for alt, name in figures.items():
        w, h = struct.unpack(">II", (tmp_path / name).read_bytes()[16:24])  # IHDR width, height
        assert images[alt] == (True, w, h), alt
    shot = tmp_path / "page.png"
    subprocess.run(
        [str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _damage(run: Path, how: str) -> None:
    """One of the damaged or foreign run folders the report met in the field."""
    cfgp = run / "config.yaml"
    cfg = yaml.safe_load(cfgp.read_text())
    if how in ("section_str", "section_list", "seed_text", "milestones_int"):
        if how == "section_str":
            cfg["method"] = "kd"
        elif how == "section_list":
            cfg["data"] = [1, 2]
        elif how == "seed_text":
            cfg["train"]["seed"] = "zero"
        else:
            cfg["schedule"] = {"name": "multistep", "milestones": 5, "gamma": "x"}
        cfgp.write_text(yaml.safe_dump(cfg))
    elif how == "config_list":
        cfgp.write_text("- 1\n- 2\n")
    elif how == "config_binary":
        cfgp.write_bytes(b"\xff\xfe\x00garbage")
    elif how.startswith("bench_"):
        bench = {"bench_list": [], "bench_seed": {"seed": "x"}, "bench_teacher": {"teacher": 3}}
        (run / "bench.json").write_text(json.dumps(bench[how]))
    elif how.startswith("summary_"):
        summary = {"summary_text": {"best_top1": "high", "last_top1": 1},
                   "summary_nan": {"best_top1": float("nan"), "last_top1": 1},
                   "summary_list": [1]}[how]  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    elif how == "metrics_binary":
        (run / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    elif how == "metrics_values":
        (run / "metrics.jsonl").write_text('{"epoch": "one", "top1": 5}\n["x"]\n')
    elif how == "metrics_dev_zero":
        (run / "metrics.jsonl").unlink()
        (run / "metrics.jsonl").symlink_to("/dev/zero")
    else:
        raise AssertionError(how)


_DAMAGES = [
    "section_str", "section_list", "seed_text", "milestones_int", "config_list", "config_binary",
    "bench_list", "bench_seed", "bench_teacher", "summary_text", "summary_nan", "summary_list",
    "metrics_binary", "metrics_values", "metrics_dev_zero",
]  # fmt: skip


def test_bad_folders_are_skipped_and_listed_the_rest_reported(tmp_path, capsys):
    """A damaged or foreign folder ended the whole report with a traceback (14 of 25 tried):
    now each is left out and named (stderr, report.md, report.json); the good runs are reported
    with their own numbers."""
    runs = tmp_path / "runs"
    fake_run(runs / "good", "kd", "resnet56", "resnet20", 0, [60.0, 70.5])
    fake_run(runs / "good", "kd", "resnet56", "resnet20", 1, [61.0, 70.9])
    for how in _DAMAGES:
        fake_run(runs / how, "kd", "resnet56", "resnet20", 2, [10.0, 20.0])
        _damage(next((runs / how).iterdir()), how)
    (runs / "notes").mkdir()
    (runs / "notes" / "config.yaml").write_text("editor: vim\n")  # a stray config.yaml
    capsys.readouterr()
    md = write_report(runs, tmp_path / "rep").read_text()
    err = capsys.readouterr().err
    assert md_row(md, "kd")[2].startswith("70.70 ± 0.28"), md  # the two good seeds only
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    skipped = {Path(s["run_dir"]).parts[2] for s in report["skipped"]}
    assert skipped == {*_DAMAGES, "notes"} or skipped == {*_DAMAGES}, skipped
    assert len(report["skipped"]) == len(_DAMAGES) + 1
    for how in _DAMAGES:
        assert f"{how}/kd_resnet20_s2" in md and f"runs/{how}/kd_resnet20_s2" in err, how
    assert err.count("relkd report: skipped") == len(_DAMAGES) + 1
    assert "Traceback" not in err


def test_report_into_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    from relkd.cli import main

    fake_run(tmp_path / "runs", "kd", "resnet56", "resnet20", 0, [60.0, 70.5])
    try:
        os.mkdir("/sys/relkd-report")
    except OSError:
        pass  # /sys refuses new folders, even to root: a read-only output folder
    else:
        os.rmdir("/sys/relkd-report")
        pytest.skip("needs a folder this process cannot write (/sys)")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", str(tmp_path / "runs"), "--out", "/sys/relkd-report"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "cannot write the report into '/sys/relkd-report'" in lines[0], lines


def _svg_texts(path: Path) -> list[tuple[float, str]]:
    """(y, text) of every text element of a Matplotlib SVG (svg.fonttype none keeps text)."""
    import re
    import xml.etree.ElementTree as ET

    out = []
    for el in ET.parse(path).iter():
        if el.tag.endswith("text") and (el.text or "").strip():
            m = re.search(r"translate\(([-\d.]+) ([-\d.]+)\)", el.get("transform", ""))
            y = float(m.group(2)) if m else float(el.get("y", "nan"))
            out.append((y, el.text.strip()))
    return out


def test_report_formats_for_a_paper(suite_out, tmp_path):
    """PNG + PDF + SVG figures, a booktabs LaTeX table (best per column bold) and a CSV, each
    holding the report's own numbers."""
    import csv
    import re

    write_report(suite_out / "runs", tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    groups = {g["method"]: g for g in rep["groups"]}
    for stem in ("accuracy", "curves"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    # SVG: methods ordered by accuracy (best on top), CE drawn as a reference line, not a row;
    # no legend entry for what is not drawn (no published number at 2 epochs).
    texts = _svg_texts(tmp_path / "accuracy.svg")
    words = [t for _, t in texts]
    assert "published (same recipe)" not in words and "teacher" in words
    assert "CE student (mean)" in words and "one seed" in words
    ticks = sorted((y, t) for y, t in texts if t in groups)
    assert "ce" not in [t for _, t in ticks]
    by_acc = sorted((m for m in groups if m != "ce"), key=lambda m: -groups[m]["best_mean"])
    assert [t for _, t in ticks] == by_acc  # SVG y grows downwards: first = top row
    assert "kd_t2" in [t for _, t in _svg_texts(tmp_path / "curves.svg")]
    # LaTeX: booktabs rules, mean ± std as in report.json, the column's best in bold.
    tex = (tmp_path / "report.tex").read_text()
    assert all(r in tex for r in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert r"\begin{tabular}" in tex and r"\usepackage{booktabs}" in tex
    assert "test split (128 images)" in tex and r"kd\_t2" in tex
    best_col = max(round(g["best_mean"], 2) for g in groups.values())
    for m, g in groups.items():
        row = next(ln for ln in tex.splitlines() if ln.startswith(m.replace("_", r"\_") + " &"))
        cell = f"{g['best_mean']:.2f} \\pm {g['best_std']:.2f}"
        bold = round(g["best_mean"], 2) == best_col
        assert (f"$\\mathbf{{{cell}}}$" if bold else f"${cell}$") in row, (m, row)
    assert len(re.findall(r"\\mathbf\{[\d.]+ \\pm", tex)) >= 1
    # CSV: one row per method plus the teacher, numbers equal to report.json.
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert {r["method"] for r in rows} == set(groups) | {"teacher"}
    for r in rows:
        if r["method"] == "teacher":
            assert float(r["best_mean"]) == pytest.approx(rep["tables"][0]["teacher_top1"])
            continue
        g = groups[r["method"]]
        assert float(r["best_mean"]) == pytest.approx(g["best_mean"])
        assert [float(x) for x in r["best_per_seed"].split(";")] == g["best"]
        assert r["eval_split"] == "test" and r["eval_images"] == "128"


def test_report_says_what_the_numbers_were_measured_on(tmp_path):
    """A test-subset run: the header, the table and report.json name the subset and its size;
    a run without a step cap beside one with it reads 'every step', never 'at most None'."""
    sub = {"data": {"name": "cifar10", "test_subset": 2000},
           "train": {"max_steps_per_epoch": 5}}  # fmt: skip
    fake_run(tmp_path / "r", "ce", None, "resnet8", 0, [40.0], sub, {"eval_images": 2000})
    fake_run(tmp_path / "r", "kd", "resnet20", "resnet8", 0, [42.0], sub, {"eval_images": 2000})
    full = {"data": {"name": "cifar10", "test_subset": 2000}}
    fake_run(tmp_path / "r", "dkd", "resnet20", "resnet8", 0, [43.0], full, {"eval_images": 2000})
    md = write_report(tmp_path / "r", tmp_path / "rep").read_text()
    assert "Top-1 (%) on a stratified 2000-image subset of the test split (2000 images)" in md
    assert "Top-1 on a stratified 2000-image subset of the test split (2000 images)." in md
    assert "None" not in md and "every step of each epoch" in md
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert rep["tables"][0]["recipe"]["test_subset"] == 2000
    assert {g["eval_images"][0] for g in rep["groups"]} == {2000}
    axis = [t for _, t in _svg_texts(tmp_path / "rep/accuracy.svg") if "top-1 (%)" in t]
    assert axis and all(t.startswith("test subset top-1") for t in axis)
