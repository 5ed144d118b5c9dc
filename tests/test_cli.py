"""The command line as a user meets it: packaged configs, argument order, --print-config, the
order of checks, ``relkd eval RUN_DIR``, progress output."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import relkd
from relkd.cli import build_parser, main
from relkd.resources import configs_dir, suites_dir

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse: --version, usage errors
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _cfg(tmp_path: Path, root: Path, **over) -> str:
    cfg = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": "ce"},
        "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
        "train": {"epochs": 1, "tensorboard": False, "progress": False, "device": "cpu"},
        "schedule": {"name": "constant"},
        "output_dir": str(tmp_path / "runs"),
    }
    for k, v in over.items():
        cfg[k] = v
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_version():
    code, out, _ = _cli(["--version"])
    assert code == 0 and out.strip() == f"relkd {relkd.__version__}"


# --- packaged configs -------------------------------------------------------------------------


def test_configs_list_show_copy(tmp_path):
    code, out, _ = _cli(["configs", "list"])
    names = out.split()
    files = sorted(configs_dir().rglob("*.yaml"))
    assert code == 0 and len(names) == len(files) + len(list(suites_dir().glob("*.yaml")))
    assert "cifar100/kd/resnet32x4_resnet8x4" in names and "suites/fmnist-mini" in names
    assert "transfer/stl10" in names
    code, out, _ = _cli(["configs", "list", "cifar100/kd"])
    assert code == 0 and out.split() and all(n.startswith("cifar100/kd/") for n in out.split())
    # show = the file's text, for configs and suites
    code, out, _ = _cli(["configs", "show", "fashion_mnist/kd"])
    assert code == 0 and out == (configs_dir() / "fashion_mnist" / "kd.yaml").read_text()
    code, out, _ = _cli(["configs", "show", "suites/fmnist-mini"])
    assert out == (suites_dir() / "fmnist-mini.yaml").read_text()
    # copy one file, then a folder; never overwrite
    dest = tmp_path / "mine"
    assert _cli(["configs", "copy", "fashion_mnist/kd.yaml", str(dest)])[0] == 0
    assert (dest / "kd.yaml").read_text() == (configs_dir() / "fashion_mnist/kd.yaml").read_text()
    code, _, err = _cli(["configs", "copy", "fashion_mnist/kd", str(dest)])
    assert code == 2 and "not overwriting" in err
    assert _cli(["configs", "copy", "cifar100/ce", str(tmp_path / "ce")])[0] == 0
    assert sorted(p.name for p in (tmp_path / "ce").iterdir()) == sorted(
        p.name for p in (configs_dir() / "cifar100/ce").iterdir()
    )
    code, _, err = _cli(["configs", "show", "fashion_mnist/kdd"])
    assert code == 2 and "fashion_mnist/kd" in err and err.count("\n") == 1


def test_the_clone_links_point_at_the_packaged_files():
    # README commands such as `relkd train configs/cifar100/...` keep working in a clone
    assert (REPO / "configs").resolve() == configs_dir()
    assert (REPO / "benchmarks" / "suites").resolve() == suites_dir()


def test_train_resolves_a_packaged_name(tmp_path):
    ckpt = tmp_path / "t.pth"
    ckpt.write_bytes(b"")  # only its existence is checked before training
    code, out, err = _cli(
        [
            "train",
            "cifar100/kd/resnet32x4_resnet8x4",
            "--print-config",
            f"teacher.checkpoint={ckpt}",
        ]
    )
    assert code == 0, err
    assert "resnet32x4_resnet8x4.yaml" in out.splitlines()[0]
    body = yaml.safe_load(out)
    assert body["teacher"]["name"] == "resnet32x4" and body["student"]["name"] == "resnet8x4"
    code, _, err = _cli(["train", "cifar100/kd/resnet32x4_resnet8x5"])
    assert code == 2 and "cifar100/kd/resnet32x4_resnet8x4" in err  # the close match


def test_bench_accuracy_resolves_a_packaged_suite(fmnist_root, tmp_path):
    code, out, err = _cli(
        ["bench", "accuracy", "fmnist-mini", "--dry-run", "--only", "kd/*",
         f"data.root={fmnist_root}", "--out", str(tmp_path / "b")]
    )  # fmt: skip
    assert code == 0, err
    assert "kd/cnn_small_cnn_tiny/s0" in out + err
    code, _, err = _cli(["bench", "accuracy", "fmnist-mni", "--dry-run"])
    assert code == 2 and "fmnist-mini" in err


# --- argument order, --print-config, order of checks -------------------------------------------


@pytest.mark.parametrize(
    "order",
    [
        ["CFG", "--print-config", "--quiet", "train.seed=7", "name=x"],
        ["--print-config", "train.seed=7", "CFG", "--quiet", "name=x"],
        ["train.seed=7", "--quiet", "name=x", "CFG", "--print-config"],
    ],
)
def test_options_and_overrides_in_any_order(order, fmnist_root, tmp_path):
    cfg = _cfg(tmp_path, fmnist_root)
    code, out, err = _cli(["train", *[cfg if a == "CFG" else a for a in order]])
    assert code == 0, err
    body = yaml.safe_load(out)
    assert body["train"]["seed"] == 7 and body["name"] == "x"
    assert out.strip().splitlines()[-1] == f"# run folder: {tmp_path / 'runs' / 'x'}"
    assert not (tmp_path / "runs").exists()  # nothing trained, no folder written


def test_unknown_option_is_still_an_error(fmnist_root, tmp_path):
    code, _, err = _cli(["train", _cfg(tmp_path, fmnist_root), "--quite"])
    assert code == 2 and "--quite" in err


def test_abbreviated_options_are_refused(fmnist_root, tmp_path):
    # argparse's default would take --resum for --resume (and a later option's prefix for
    # an older one): a mistyped option must stop, not mean something else.
    code, _, err = _cli(["train", _cfg(tmp_path, fmnist_root), "--resum"])
    assert code == 2 and "--resum" in err
    code, _, err = _cli(["bench", "accuracy", "fmnist-mini", "--dry"])
    assert code == 2 and "--dry" in err


def test_missing_packaged_teacher_names_the_config_that_trains_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ folder here: the packaged teacher was never trained
    code, _, err = _cli(["train", "fashion_mnist/kd", "data.root=/nonexistent"])
    assert code == 2 and err.count("\n") == 1, err
    assert "runs/fashion_mnist/teacher_s0/student.pt" in err
    assert "train that teacher first: relkd train fashion_mnist/teacher" in err


def test_train_with_an_option_between_overrides(fmnist_root, tmp_path):
    cfg = _cfg(tmp_path, fmnist_root)
    code, out, err = _cli(["train", cfg, "--quiet", "train.seed=3", "train.max_steps_per_epoch=2"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["seed"] == 3 and summary["run_dir"].endswith("ce_cnn_tiny_s3")


def test_checks_come_in_the_order_a_user_fixes_them(fmnist_root, tmp_path):
    missing_ckpt = str(tmp_path / "teacher_missing.pt")
    cfg = _cfg(
        tmp_path,
        tmp_path / "no_data_here",  # the data is missing too
        teacher={"name": "cnn_small", "checkpoint": missing_ckpt},
    )
    # 1. a method typo first, although the teacher checkpoint and the data are missing as well
    code, _, err = _cli(["train", cfg, "method.name=kdd"])
    assert code == 2 and "'kdd'" in err and "kd" in err and "teacher_missing" not in err
    # 2. a method argument typo next
    code, _, err = _cli(["train", cfg, "method.name=kd", "method.args.temprature=2"])
    assert code == 2 and "temprature" in err
    # 3. a model typo
    code, _, err = _cli(["train", cfg, "method.name=kd", "student.name=cnn_tiyn"])
    assert code == 2 and "cnn_tiny" in err
    # 4. then the missing checkpoint, before the missing data
    code, _, err = _cli(["train", cfg, "method.name=kd"])
    assert code == 2 and "teacher_missing.pt" in err and err.count("\n") == 1
    # 5. a teacher-free method does not need the teacher's file; now the data is reported
    code, _, err = _cli(["train", cfg, "method.name=ce", "teacher=null"])
    assert code == 2 and "no_data_here" in err
    # 6. a method that needs a teacher without one
    code, _, err = _cli(["train", cfg, "method.name=kd", "teacher=null"])
    assert code == 2 and "needs a teacher" in err


def test_print_config_shows_a_config_that_cannot_run_yet(tmp_path, fmnist_root):
    cfg = _cfg(tmp_path, fmnist_root, teacher={"name": "cnn_small", "checkpoint": "nope.pt"})
    code, out, err = _cli(["train", cfg, "method.name=kd", "--print-config"])
    assert code == 2 and "nope.pt" in err
    assert yaml.safe_load(out)["teacher"]["checkpoint"] == "nope.pt"


# --- eval --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(fmnist_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalrun")
    res = relkd.train(
        {
            "student": {"name": "cnn_tiny"},
            "method": {"name": "ce"},
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "train": {"epochs": 2, "progress": False, "tensorboard": False, "device": "cpu"},
            "schedule": {"name": "constant"},
            "output_dir": str(out),
            "name": "r",
        },
        quiet=True,
    )
    return Path(res["run_dir"])


def test_eval_a_run_folder(run_dir, monkeypatch):
    summary = json.loads((run_dir / "summary.json").read_text())
    monkeypatch.setenv("RELKD_PROGRESS", "bar")  # the bar a terminal shows
    code, out, err = _cli(["eval", str(run_dir), "--device", "cpu"])
    assert code == 0, err
    res = json.loads(out)
    assert res["top1"] == pytest.approx(summary["last_top1"])
    assert res["checkpoint"].endswith("student.pt")
    assert "eval" in err  # the progress bar
    # stderr is no terminal: a short evaluation prints no progress lines at all
    monkeypatch.delenv("RELKD_PROGRESS")
    code, out, err = _cli(["eval", str(run_dir), "--device", "cpu"])
    assert code == 0 and "eval" not in err and "\r" not in err
    # relkd's own checkpoint.pt (the last epoch) gives the same numbers
    code, out, _ = _cli(["eval", str(run_dir), "--checkpoint", str(run_dir / "checkpoint.pt"),
                         "--no-progress"])  # fmt: skip
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(summary["last_top1"])
    code, out, _ = _cli(["eval", str(run_dir), "--best", "--no-progress"])
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(summary["best_top1"])


def test_eval_feeds_the_student_its_own_normalisation(fmnist_root, tmp_path, monkeypatch):
    """A student trained with student.mean/std unlike the data's is evaluated by `relkd eval
    RUN_DIR` on the inputs it was trained on: the run's own last top-1 and test loss; without
    the re-normalisation hook the same weights score otherwise."""
    import relkd.models.normalization as norm

    res = relkd.train(
        {
            "student": {"name": "cnn_tiny", "mean": [0.9], "std": [0.1]},
            "method": {"name": "ce"},
            "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
            "train": {"epochs": 1, "max_steps_per_epoch": 2, "progress": False,
                      "tensorboard": False, "device": "cpu"},
            "schedule": {"name": "constant"},
            "output_dir": str(tmp_path),
            "name": "normed",
        },
        quiet=True,
    )  # fmt: skip
    run = Path(res["run_dir"])
    summary = json.loads((run / "summary.json").read_text())
    code, out, err = _cli(["eval", str(run), "--device", "cpu", "--no-progress"])
    assert code == 0, err
    got = json.loads(out)
    assert got["top1"] == pytest.approx(summary["last_top1"])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (got["top5"], got["test_loss"]) == pytest.approx((last["top5"], last["test_loss"]))
    monkeypatch.setattr(norm, "attach_input_norm", lambda *a, **k: "")  # no hook
    code, out, err = _cli(["eval", str(run), "--device", "cpu", "--no-progress"])
    assert code == 0, err
    raw = json.loads(out)
    assert (raw["top1"], raw["test_loss"]) != (got["top1"], got["test_loss"])


def test_eval_a_pretrained_torchvision_student_uses_its_weights_statistics(tmp_path, monkeypatch):
    """student.weights=IMAGENET1K_V1 (a fake local cache): training fed the student ImageNet
    statistics; `relkd eval RUN_DIR` does too (same test loss as the run's last epoch)."""
    import relkd.models.normalization as norm
    from tests.conftest import make_fmnist
    from tests.models.test_pretrained import _fake_torchvision_cache

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _fake_torchvision_cache("resnet18", "IMAGENET1K_V1")
    root = make_fmnist(tmp_path / "fm", n_train=64, n_test=32)
    res = relkd.train(
        {
            "student": {"name": "torchvision:resnet18", "weights": "IMAGENET1K_V1"},
            "method": {"name": "ce"},
            "data": {"name": "fashion_mnist", "root": str(root), "batch_size": 32},
            "optim": {"lr": 0.01},
            "train": {"epochs": 1, "max_steps_per_epoch": 2, "progress": False,
                      "tensorboard": False, "device": "cpu"},
            "schedule": {"name": "constant"},
            "output_dir": str(tmp_path / "runs"),
            "name": "tv",
        },
        quiet=True,
    )  # fmt: skip
    run = Path(res["run_dir"])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    code, out, err = _cli(["eval", str(run), "--device", "cpu", "--no-progress"])
    assert code == 0, err
    got = json.loads(out)
    # Exact: the same CPU computation as the run's own evaluation. (The untrained head keeps
    # the loss near ln 10 either way, so only exact equality tells the inputs apart.)
    assert (got["top1"], got["test_loss"]) == (last["top1"], last["test_loss"])
    monkeypatch.setattr(norm, "attach_input_norm", lambda *a, **k: "")  # no hook
    code, out, err = _cli(["eval", str(run), "--device", "cpu", "--no-progress"])
    assert code == 0, err
    assert json.loads(out)["test_loss"] != last["test_loss"]


def test_eval_reproduces_a_runs_own_number_on_its_subset_and_split(fmnist_root, tmp_path):
    """A run evaluated on data.test_subset (or its validation hold-out) records the split and
    the number of images; `relkd eval` says both and, with --test-subset / --split val,
    reproduces the run's own top-1 exactly; without them it scores the whole test split and
    says how to reproduce the run's number."""
    base = {
        "student": {"name": "cnn_tiny"},
        "method": {"name": "ce"},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "progress": False,
                  "tensorboard": False, "device": "cpu"},
        "output_dir": str(tmp_path),
    }  # fmt: skip
    data = {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32}
    res = relkd.train({**base, "data": {**data, "test_subset": 50}, "name": "sub"}, quiet=True)
    assert (res["eval_split"], res["test_subset"], res["eval_images"]) == ("test", 50, 50)
    run = res["run_dir"]
    code, out, err = _cli(["eval", run, "--test-subset", "50", "--no-progress"])
    assert code == 0, err
    got = json.loads(out)
    assert got["top1"] == res["last_top1"]  # exactly: the same images, the same computation
    assert (got["split"], got["test_subset"], got["images"]) == ("test", 50, 50)
    assert "note" not in err
    code, out, err = _cli(["eval", run, "--no-progress"])
    assert code == 0 and json.loads(out)["images"] == 128  # the whole test split of the fixture
    assert (
        "measured on a 50-image subset of the test split; use --split test --test-subset 50" in err
    )

    res = relkd.train({**base, "data": {**data, "val_split": 0.25}, "name": "val"}, quiet=True)
    assert (res["eval_split"], res["eval_images"]) == ("validation", 64)  # 25 % of 256
    code, out, err = _cli(["eval", res["run_dir"], "--split", "val", "--no-progress"])
    assert code == 0, err
    got = json.loads(out)
    assert got["top1"] == res["last_top1"] and (got["split"], got["images"]) == ("validation", 64)
    # no hold-out in the run: --split val has nothing to evaluate on
    code, _, err = _cli(["eval", run, "--split", "val", "--no-progress"])
    assert code == 2 and "data.val_split" in err and err.count("\n") == 1


def test_eval_an_interrupted_run_reads_checkpoint_pt(run_dir, tmp_path):
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(run_dir, run)
    for name in ("student.pt", "student.safetensors", "student_best.pt"):
        (run / name).unlink()
    code, out, err = _cli(["eval", str(run), "--no-progress"])
    assert code == 0, err
    assert json.loads(out)["checkpoint"].endswith("checkpoint.pt")


def test_load_checkpoint_reads_relkds_checkpoint(run_dir):
    a = relkd.create_model("cnn_tiny", 10, in_chans=1)
    b = relkd.create_model("cnn_tiny", 10, in_chans=1)
    relkd.load_checkpoint(a, run_dir / "checkpoint.pt")
    relkd.load_checkpoint(b, run_dir / "student.pt")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_eval_without_a_run_names_what_is_missing(tmp_path):
    code, _, err = _cli(["eval", "--model", "cnn_tiny"])
    assert code == 2 and "--checkpoint" in err and "--data" in err
    code, _, err = _cli(["eval", str(tmp_path)])
    assert code == 2 and "config.yaml" in err


@pytest.mark.parametrize(
    ("flag", "value", "what"),
    [("--batch-size", "0", "images per evaluation batch"),
     ("--batch-size", "-3", "images per evaluation batch"),
     ("--test-subset", "0", "images of the stratified subset"),
     ("--image-size", "-8", "the input's side in pixels")],
)  # fmt: skip
def test_eval_refuses_a_numeric_flag_below_one_naming_the_flag(
    run_dir, tmp_path, flag, value, what
):
    """``relkd eval``'s counts: a zero or negative value is one line naming the flag, the value
    and the bound (it used to name data.eval_batch_size / test_subset, keys the user never
    wrote), for a run folder, a model + checkpoint and an ONNX file, before anything is read."""
    want = f"relkd: error: {flag} {value} is not valid: must be >= 1 ({what})\n"
    for target in (
        [str(run_dir)],
        ["--model", "cnn_tiny", "--checkpoint", str(run_dir / "student.pt"), "--data",
         "fashion_mnist", "--root", str(tmp_path / "no_data_here")],
        [str(tmp_path / "no_such.onnx"), "--data", "fashion_mnist"],
    ):  # fmt: skip
        code, out, err = _cli(["eval", *target, flag, value, "--no-progress"])
        assert (code, out, err) == (2, "", want), target


def test_every_eval_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for cmd in ("eval", "train", "configs"):
        for action in sub.choices[cmd]._actions:
            assert action.help, (cmd, action.dest)


# --- TensorBoard -------------------------------------------------------------------------------


def test_missing_tensorboard_warns_once(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a)
    )
    from relkd.engine import logger

    monkeypatch.setattr(logger, "_TB_WARNED", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        logger.warn_no_tensorboard()
        logger.warn_no_tensorboard()
    assert len(w) == 1 and "tensorboard" in str(w[0].message)


def test_tensorboard_is_a_dependency():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("tensorboard") for d in deps)


# --- demo --------------------------------------------------------------------------------------


def test_demo_shows_the_teachers_progress_and_reuses_it(fmnist_root, tmp_path, capfd, monkeypatch):
    from relkd import demo
    from relkd.demo import run_demo

    monkeypatch.setattr(demo, "STUDENT_SUBSET", 128)  # the tiny set has 256 images

    out = tmp_path / "demo"
    run_demo(out_dir=str(out), methods=["ce"], root=str(fmnist_root), student_epochs=1)
    o, e = capfd.readouterr()
    assert "training the teacher" in o
    assert "main epoch 3/3" in e  # the teacher's per-epoch lines
    assert "ce         seed 0: last" in o
    # every number says what it was measured on
    assert "on the test split (" in o.split("teacher cnn_small: top-1")[1].splitlines()[0]
    assert "top-1 % on the test split (128 images)" in o
    assert json.loads((out / "results.json").read_text())["eval_images"] == 128
    # a second demo reuses the teacher, also one trained without progress output
    cfg = out / "teacher" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("progress: true", "progress: false"))
    run_demo(out_dir=str(out), methods=["ce"], root=str(fmnist_root), student_epochs=1)
    o, e = capfd.readouterr()
    assert "training the teacher" not in o and "main epoch" not in e


def test_probe_resolves_a_packaged_options_file():
    code, _, err = _cli(["probe", "--config", "transfer/stl1", "--checkpoint", "x.pt"])
    assert code == 2 and "transfer/stl10" in err  # the close match
    code, _, err = _cli(["probe", "--config", "transfer/stl10", "--checkpoint", "x.pt",
                         "--root", "/nonexistent/stl10"])  # fmt: skip
    assert code == 2 and "transfer/stl10" not in err  # resolved: the next problem is reported


def test_overrides_without_a_config_is_a_usage_error():
    code, _, err = _cli(["train", "--quiet", "train.seed=1"])
    assert code == 2 and "no config given" in err


def test_an_override_reads_yes_and_on_as_a_config_file_does(fmnist_root, tmp_path):
    """Override values are read like a config file (YAML 1.2's booleans): ``yes`` / ``on`` /
    ``no`` / ``off`` stay strings in a free-form section such as ``student.kwargs`` (YAML 1.1,
    OmegaConf's dotlist reading, made them booleans); ``true`` is still a boolean."""
    cfg = _cfg(tmp_path, fmnist_root, student={"name": "cnn_tiny", "kwargs": {"in_file": "yes"}})
    over = ["student.kwargs.a=yes", "student.kwargs.b=on", "student.kwargs.c=no",
            "student.kwargs.d=off", "student.kwargs.e=true", "student.kwargs.f=1e3"]  # fmt: skip
    code, out, err = _cli(["train", cfg, *over, "--print-config"])
    assert code == 0, err
    kwargs = yaml.safe_load(out)["student"]["kwargs"]
    assert kwargs == {"in_file": "yes", "a": "yes", "b": "on", "c": "no", "d": "off", "e": True,
                      "f": 1000.0}  # fmt: skip
    # A boolean key still takes only true / false.
    code, _, err = _cli(["train", cfg, "train.deterministic=yes", "--print-config"])
    assert code == 2 and "train.deterministic='yes' is not valid: must be true or false" in err


def test_a_train_subset_larger_than_the_set_names_the_key_to_set(fmnist_root, tmp_path):
    """The packaged Fashion-MNIST configs train on ``data.train_subset: 10000``; on a smaller set
    at data.root (256 images here) the refusal said "take_subset: n must be in 1..256", which a
    user read as a ``data.test_subset`` problem. It names data.train_subset and what to set;
    nothing is written."""
    out = tmp_path / "runs"
    code, _, err = _cli(["train", "fashion_mnist/ce", f"data.root={fmnist_root}",
                         "data.test_subset=null", f"output_dir={out}"])  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert err.strip() == (
        "relkd: error: data.train_subset=10000 is more than the 256 training images of "
        "'fashion_mnist': set data.train_subset=null (all of them) or a value in 1..256"
    )
    assert not out.exists()
    # What the message says to set trains (one step, on all 256 images).
    code, _, err = _cli(["train", "fashion_mnist/ce", f"data.root={fmnist_root}",
                         "data.train_subset=null", f"output_dir={out}", "train.epochs=1",
                         "train.max_steps_per_epoch=1", "train.tensorboard=false", "--quiet"])  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "ce_s0" / "summary.json").read_text())
    assert 0 <= summary["best_top1"] <= 100
