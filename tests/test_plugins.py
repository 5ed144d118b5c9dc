"""A user's own model, method and data set, as a user meets them: by import path from the CLI, a
suite, `relkd eval` and `relkd probe`; through entry points; and the one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import relkd
from relkd.cli import main

FOREIGN = "tests.foreign_resnet:resnet8"


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def write_cifar10(root: Path, per_batch: int = 16, n_test: int = 40, seed: int = 0) -> Path:
    """CIFAR-10's python pickles (5 train batches + test), tiny: class c is brighter in channel
    c % 3, so a small net learns something in a few steps."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n: int) -> dict:
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 120, (n, 3, 32, 32))
        for i, c in enumerate(y):
            x[i, c % 3] += 100 + 10 * (c // 3)
        return {b"data": x.reshape(n, -1).astype(np.uint8), b"labels": [int(v) for v in y]}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]  # fmt: skip
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


def _cfg(tmp_path: Path, root: Path, **over) -> str:
    cfg = {
        "student": {"name": FOREIGN},
        "method": {"name": "ce"},
        "data": {"name": "cifar10", "root": str(root), "batch_size": 16},
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "tensorboard": False,
                  "progress": False, "device": "cpu"},
        "schedule": {"name": "constant"},
        "output_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    cfg.update(over)
    p = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize(
    ("override", "want"),
    [
        ("student.name=tests.no_such_module:Net",
         "student.name: model 'tests.no_such_module:Net': module 'tests.no_such_module' not found"),
        ("student.name=tests.foreign_resnet:Nope",
         "model 'tests.foreign_resnet:Nope': module 'tests.foreign_resnet' has no attribute 'Nope'"),
        ("student.name=tests.foreign_resnet:NOT_A_MODEL",
         "model 'tests.foreign_resnet:NOT_A_MODEL' is not a model (an nn.Module subclass or a "
         "function returning an nn.Module); it is a value of type int"),
        ("method.name=tests.foreign_resnet:ResNet",
         "method 'tests.foreign_resnet:ResNet' is not a method (a relkd.Method subclass); it is "
         "a class ResNet"),
        ("data.name=tests.foreign_resnet:ResNet",
         "data.name: dataset 'tests.foreign_resnet:ResNet' is not a data set"),
    ],
)  # fmt: skip
def test_a_bad_import_path_is_one_line_naming_it(tmp_path, cifar_root, override, want):
    code, _, err = _cli(["train", _cfg(tmp_path, cifar_root), override, "--print-config"])
    assert code == 2 and want in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_first_forward_that_fails_claims_a_channel_mismatch_only_where_there_is_one(
    tmp_path, cifar_root
):
    """The engine's first forward on the data set's shape: a model whose own code raises is
    said to have failed with its error, nothing about shapes; a channel hint only where the
    model's first convolution takes other channels than the data has (relkd profile's test).
    One line on stderr, exit 2."""
    code, out, err = _cli(
        ["train", _cfg(tmp_path, cifar_root), "student.name=tests.foreign_resnet:BoomNet"]
    )
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert err == (
        "relkd: error: BoomNet failed on an input of shape [2, 3, 32, 32] (the data set's "
        "shape): RuntimeError: boom\n"
    )
    code, out, err = _cli(
        ["train", _cfg(tmp_path, cifar_root), "student.name=tests.foreign_resnet:grey_net"]
    )
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(
        "relkd: error: Sequential failed on an input of shape [2, 3, 32, 32] (the data set's "
        "shape): its first convolution (module '0') takes 1 channel(s), not 3; RuntimeError: "
    ), err
    assert "expected input[2, 3, 32, 32] to have 1 channels" in err  # torch's own first line


def test_foreign_model_by_import_path_in_train_eval_probe(tmp_path, cifar_root):
    """An akamaster-style CIFAR ResNet of the user's own module: trained as a teacher with
    `relkd train`, distilled from by import path, evaluated with `relkd eval` (the run's own
    number, exactly) and probed with `relkd probe`."""
    code, out, err = _cli(["train", _cfg(tmp_path, cifar_root), "name=teacher"])
    assert code == 0, err
    t_sum = json.loads(out)
    t_run = Path(t_sum["run_dir"])
    recorded = yaml.safe_load((t_run / "config.yaml").read_text())
    assert recorded["student"]["name"] == FOREIGN
    # the statistics the akamaster module declares are applied, and the plan line says so
    plan = next(ln for ln in err.splitlines() if ln.startswith("plan:"))
    assert (
        f"inputs 3x32x32; student {FOREIGN} sees mean (0.485, 0.456, 0.406) std (0.229, "
        "0.224, 0.225) declared by the model, re-normalised from the data's" in plan
    )

    kd = _cfg(
        tmp_path, cifar_root, student={"name": "resnet8"},
        teacher={"name": FOREIGN, "checkpoint": str(t_run / "student.pt")},
        method={"name": "kd"},
    )  # fmt: skip
    code, out, err = _cli(["train", kd])
    assert code == 0, err
    kd_run = Path(json.loads(out)["run_dir"])
    assert yaml.safe_load((kd_run / "config.yaml").read_text())["teacher"]["name"] == FOREIGN
    assert kd_run.name == "kd_tests.foreign_resnet-resnet8_resnet8_s0"

    code, out, err = _cli(["eval", str(t_run), "--no-progress"])
    assert code == 0, err
    assert json.loads(out)["top1"] == t_sum["last_top1"]
    code, out, err = _cli(["eval", "--model", FOREIGN, "--checkpoint", str(t_run / "student.pt"),
                           "--data", "cifar10", "--root", str(cifar_root), "--no-progress"])  # fmt: skip
    assert code == 0 and json.loads(out)["top1"] == t_sum["last_top1"], err

    code, out, err = _cli([
        "probe", "--model", FOREIGN, "--checkpoint", str(t_run / "student.pt"),
        "--num-source-classes", "10", "--data", "cifar10", "--root", str(cifar_root),
        "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
        "--out", str(tmp_path / "probe"), "--quiet",
    ])  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["model"] == FOREIGN and res["feature_dim"] == 64
    assert Path(res["run_dir"]).name == "cifar10_tests.foreign_resnet-resnet8_s0"


USER_METHOD = '''
    import torch
    import torch.nn.functional as F

    import relkd


    class LogitMSE(relkd.Method):
        """Mean squared error between student and teacher logits, times `weight`."""

        requires_teacher = True

        def __init__(self, ctx: relkd.MethodContext, weight: float = 1.0) -> None:
            super().__init__(ctx)
            self.weight = weight

        def forward(self, student, teacher, targets, **extras):
            return {"mse": self.weight * F.mse_loss(student.logits, teacher.logits)}
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> Path:
    """A package of the user's, outside relkd and outside the tests, on sys.path."""
    pkg = tmp_path / "site" / "my_kd_methods"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(USER_METHOD))
    (pkg / "more.py").write_text("from my_kd_methods import LogitMSE  # a dotted module path\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path / "site"
    for name in [m for m in sys.modules if m.startswith("my_kd_methods")]:
        del sys.modules[name]


def test_user_method_from_a_separate_package_in_a_suite(tmp_path, cifar_root, user_package):
    """A suite names the user's method by import path (bare, and with arguments under a label)
    and a foreign teacher by import path; the report shows both rows."""
    from relkd.bench import run_suite, write_report

    code, out, err = _cli(["train", _cfg(tmp_path, cifar_root), "name=teacher"])
    assert code == 0, err
    ckpt = Path(json.loads(out)["run_dir"]) / "student.pt"
    suite = {
        "name": "mine",
        "base": {
            "data": {"name": "cifar10", "root": str(cifar_root), "batch_size": 16},
            "schedule": {"name": "constant"},
            "train": {"epochs": 1, "max_steps_per_epoch": 2, "progress": False,
                      "tensorboard": False, "device": "cpu"},
        },
        "teachers": {FOREIGN: {"checkpoint": str(ckpt)}},
        "pairs": [[FOREIGN, "resnet8"]],
        "methods": [
            "ce",
            "my_kd_methods:LogitMSE",
            {"name": "mse_w2", "method": {"name": "my_kd_methods:LogitMSE", "args": {"weight": 2.0}}},
            "my_kd_methods.more:LogitMSE+kd",  # composes with a built-in method
        ],
        "seeds": [0],
    }  # fmt: skip
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(suite))
    res = run_suite(path, tmp_path / "out", progress=False)
    assert {r["status"] for r in res} == {"trained"}
    run = tmp_path / "out/runs/LogitMSE/tests.foreign_resnet-resnet8_resnet8/s0"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "train/mse" in metrics[-1]  # the user's loss term was trained and logged
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"]["name"] == "my_kd_methods:LogitMSE"
    md = write_report(tmp_path / "out").read_text()
    assert "| LogitMSE |" in md and "| mse_w2 |" in md and "| LogitMSE+kd |" in md
    both = tmp_path / "out/runs/LogitMSE+kd/tests.foreign_resnet-resnet8_resnet8/s0/metrics.jsonl"
    last = json.loads(both.read_text().splitlines()[-1])
    assert "train/mse" in last and "train/kd" in last
    # the teacher row: the foreign teacher's own run folder gives its top-1
    t_top1 = json.loads((ckpt.parent / "summary.json").read_text())["last_top1"]
    assert f"| teacher ({FOREIGN}) | - | {t_top1:.2f} |" in md

    # a typo in the suite's import path: one line, before anything is trained
    suite["methods"] = ["my_kd_methods:LogitMSEE"]
    path.write_text(yaml.safe_dump(suite))
    code, _, err = _cli(["bench", "accuracy", str(path), "--out", str(tmp_path / "o2")])
    assert code == 2 and "module 'my_kd_methods' has no attribute 'LogitMSEE'" in err
    assert not (tmp_path / "o2" / "runs").exists()


def test_entry_points_register_models_and_methods(tmp_path, monkeypatch, user_package):
    """A package that declares entry points in the relkd.models / relkd.methods groups: its names
    work like built-in ones and `relkd list` shows them; a broken entry point is one warning."""
    from relkd.methods import METHODS
    from relkd.models import MODELS

    dist = user_package / "my_kd_methods-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kd-methods\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[relkd.methods]\nlogit_mse = my_kd_methods:LogitMSE\nbroken = my_kd_methods:Missing\n\n"
        "[relkd.models]\nakamaster_resnet8 = tests.foreign_resnet:resnet8\n"
    )
    for reg in (METHODS, MODELS):  # as at start-up: the registries have not looked yet
        monkeypatch.setattr(reg, "_plugins_loaded", False)
        monkeypatch.setattr(reg, "_items", dict(reg._items))
    with pytest.warns(UserWarning, match="skipped entry point 'broken'"):
        code, out, _ = _cli(["list", "methods"])
    assert code == 0 and "logit_mse" in out.split() and "broken" not in out.split()
    assert "akamaster_resnet8" in relkd.list_models()
    model = relkd.create_model("akamaster_resnet8", 7)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert METHODS.get("logit_mse").__name__ == "LogitMSE"


USER_DATA = '''
    import torch
    from torch.utils.data import TensorDataset

    from relkd.data import DataInfo


    def build_blobs(root, opts):
        """Two Gaussian blobs per channel, 3 x 16 x 16 images, already normalised."""
        g = torch.Generator().manual_seed(0)

        def split(n):
            y = torch.arange(n) % 4
            x = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + y.view(-1, 1, 1, 1) - 1.5
            return TensorDataset(x, y)

        info = DataInfo(num_classes=4, in_channels=3, image_size=16, mean=(0.0,) * 3,
                        std=(1.0,) * 3, name="blobs")
        return split(64), split(32), info
'''


def test_user_data_set_by_import_path(tmp_path, user_package):
    (user_package / "my_kd_methods" / "data.py").write_text(textwrap.dedent(USER_DATA))
    cfg = {
        "student": {"name": FOREIGN},
        "method": {"name": "ce"},
        "data": {"name": "my_kd_methods.data:build_blobs", "batch_size": 16},
        "train": {"epochs": 2, "tensorboard": False, "progress": False, "device": "cpu"},
        "schedule": {"name": "constant"},
        "optim": {"lr": 0.1},
        "output_dir": str(tmp_path / "runs"),
    }
    res = relkd.train(cfg, quiet=True)
    assert res["eval_images"] == 32 and res["best_top1"] > 25.0  # 4 classes: chance is 25 %
    recorded = yaml.safe_load((Path(res["run_dir"]) / "config.yaml").read_text())
    assert recorded["data"]["name"] == "my_kd_methods.data:build_blobs"


@pytest.mark.parametrize(
    "body",
    [
        "def build_blobs(num_classes=10):\n    return None\n",  # a model factory's signature
        "def build_blobs(root, opts):\n    return 3\n",  # not (train, test, info)
        "def build_blobs(root, opts):\n    return [], [], {}\n",  # info not a DataInfo
    ],
)
def test_a_data_set_path_that_is_not_a_builder_is_one_line(tmp_path, user_package, body):
    """Found by a new-user check: a model factory named as ``data.name`` ended in a TypeError
    traceback; it is one line naming the path and the builder's contract."""
    (user_package / "my_kd_methods" / "notdata.py").write_text(body)
    cfg = {
        "student": {"name": FOREIGN},
        "method": {"name": "ce"},
        "data": {"name": "my_kd_methods.notdata:build_blobs", "batch_size": 16},
        "train": {"epochs": 1, "tensorboard": False, "progress": False, "device": "cpu"},
        "output_dir": str(tmp_path / "runs"),
    }
    with pytest.raises(relkd.RelkdError, match=r"is not a data-set builder") as e:
        relkd.train(cfg, quiet=True)
    assert "my_kd_methods.notdata:build_blobs" in str(e.value) and "\n" not in str(e.value)


def test_the_readme_method_example_runs(tmp_path, fmnist_root, tiny_teacher_ckpt):
    """The README's ~15-line method: registered under its short name, trained from a config."""
    import re

    from relkd.methods import METHODS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import torch.nn.functional as F\n.*?)```", readme, re.S)
    assert block, "the README's method example"
    try:
        exec(compile(block.group(1), "README.md", "exec"), {})
        assert "logit_mse" in relkd.list_methods()
        res = relkd.train(
            {
                "student": {"name": "cnn_tiny"},
                "teacher": {"name": "cnn_small", "checkpoint": str(tiny_teacher_ckpt)},
                "method": {"name": "logit_mse", "args": {"weight": 2.0}},
                "data": {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 32},
                "train": {"epochs": 1, "max_steps_per_epoch": 2, "tensorboard": False,
                          "progress": False, "device": "cpu"},
                "schedule": {"name": "constant"},
                "output_dir": str(tmp_path),
            },
            quiet=True,
        )  # fmt: skip
        last = json.loads((Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["train/mse"] > 0
    finally:
        METHODS._items.pop("logit_mse", None)


def test_distillation_normalises_a_foreign_teacher_as_train_does(tmp_path, cifar_root):
    """One rule for every entry point: the akamaster teacher declares ImageNet statistics; on
    CIFAR data relkd.train re-normalises its inputs, and relkd.Distillation, told the loader's
    statistics, gives the same logits (and says which statistics it applied)."""
    from relkd.config import load_config
    from relkd.engine.build import build_components
    from relkd.models import load_checkpoint
    from tests.foreign_resnet import AKAMASTER_MEAN, AKAMASTER_STD, resnet8

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save(resnet8(10).state_dict(), ckpt)
    cfg = load_config(_cfg(
        tmp_path, cifar_root, student={"name": "resnet8"}, method={"name": "kd"},
        teacher={"name": FOREIGN, "checkpoint": str(ckpt)},
    ))  # fmt: skip
    comp = build_components(cfg, torch.device("cpu"))
    x = torch.stack([comp.test_ds[i][0] for i in range(8)])  # normalised with CIFAR-10's stats
    in_train = comp.teacher.model.eval()(x)

    teacher = load_checkpoint(resnet8(10), ckpt).eval()
    raw = teacher(x)
    distill = relkd.Distillation(
        "kd", relkd.create_model("resnet8", 10), teacher, example_input=x,
        data_mean=comp.info.mean, data_std=comp.info.std,
    )  # fmt: skip
    mine = distill.teacher.eval()(x)
    assert torch.equal(mine, in_train) and not torch.allclose(raw, in_train)
    assert distill.input_norm["teacher"] == (
        f"mean {AKAMASTER_MEAN} std {AKAMASTER_STD} declared by the model, re-normalised from "
        "the data's"
    )
    assert distill.input_norm["student"].startswith("the data's mean")
    # without the loader's statistics: inputs unchanged, and a warning says why that matters
    with pytest.warns(UserWarning, match="teacher's input statistics are declared by the model"):
        d2 = relkd.Distillation("kd", relkd.create_model("resnet8", 10), resnet8(10),
                                example_input=x)  # fmt: skip
    assert d2.input_norm["teacher"].startswith("unchanged")


def _png_folder(root: Path, side: int, n: int = 8, classes: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


def test_input_mismatch_said_before_training_and_small_imagefolder(tmp_path, cifar_root):
    """A teacher trained by relkd on CIFAR (32 px, CIFAR statistics, recorded in its student.pt)
    distilled on an image folder of 32-pixel PNGs: imagefolder trains at 32 (and says so), the
    teacher's recorded statistics are applied (the data's are ImageNet's) and said once, and the
    plan line shows size, channels and statistics per model. At 48 px the size mismatch is said."""
    from relkd.config import load_config
    from relkd.engine.build import build_components
    from relkd.models import create_model, load_checkpoint
    from relkd.models.normalization import renormalize

    code, out, err = _cli(["train", _cfg(tmp_path, cifar_root, student={"name": "resnet8"}),
                           "name=t", "optim.lr=0.01"])  # fmt: skip
    assert code == 0, err
    ckpt = Path(json.loads(out)["run_dir"]) / "student.pt"
    folder = _png_folder(tmp_path / "imgs", 32, classes=10)
    kd = _cfg(
        tmp_path, folder, student={"name": "resnet8"}, method={"name": "kd"},
        teacher={"name": "resnet8", "checkpoint": str(ckpt)},
        data={"name": "imagefolder", "root": str(folder), "batch_size": 8},
    )  # fmt: skip
    code, out, err = _cli(["train", kd])
    assert code == 0, err
    lines = err.splitlines()
    assert sum("imagefolder: the training images are 32x32" in ln for ln in lines) == 1
    stats = [ln for ln in lines if "teacher resnet8 was trained on inputs normalised" in ln]
    assert len(stats) == 1 and "relkd re-normalises the teacher's inputs" in stats[0]
    plan = next(ln for ln in lines if ln.startswith("plan:"))
    assert "inputs 3x32x32" in plan
    assert "teacher resnet8 sees mean (0.4914, 0.4822, 0.4465)" in plan  # CIFAR-10's, recorded
    assert "student resnet8 sees the data's mean (0.485, 0.456, 0.406)" in plan  # ImageNet's
    assert "image size" not in err and "expects" not in err  # 32 px fed to a 32-px teacher

    # What relkd does about it, checked on the logits: the teacher sees CIFAR-normalised inputs.
    comp = build_components(load_config(kd), torch.device("cpu"))
    x = torch.stack([comp.test_ds[i][0] for i in range(4)])  # ImageNet-normalised, 32 px
    plain = load_checkpoint(create_model("resnet8", 10), ckpt).eval()
    meta = torch.load(ckpt, weights_only=True)["meta"]  # what the teacher's run recorded
    want = plain(renormalize(x, comp.info.mean, comp.info.std, meta["mean"], meta["std"]))
    assert torch.allclose(comp.teacher.model.eval()(x), want, atol=1e-5)

    code, _, err = _cli(["train", kd, "data.image_size=48", "name=at48"])
    assert code == 0, err
    assert (
        "teacher resnet8 expects 32x32 images (recorded in student.pt) but the data "
        "pipeline feeds 48x48: relkd feeds them as configured; set data.image_size=32" in err
    )
    assert "imagefolder: the training images" not in err  # the size was chosen by the user


def test_modules_passed_from_python_are_recorded_by_import_path(tmp_path, cifar_root):
    """A module whose class rebuilds it is recorded by its import path: `relkd eval` of the run
    folder reproduces the run's number. One that cannot be imported (or rebuilt from its class
    alone) is recorded as such, and eval / --resume say in one line to pass it again."""
    from tests.foreign_resnet import resnet8, resnet20

    cfg = yaml.safe_load(Path(_cfg(tmp_path, cifar_root)).read_text())
    del cfg["student"]
    res = relkd.train({**cfg, "name": "a"}, student=resnet8(10), quiet=True)
    run = Path(res["run_dir"])
    assert yaml.safe_load((run / "config.yaml").read_text())["student"]["name"] == (
        "tests.foreign_resnet:ResNet"
    )
    code, out, err = _cli(["eval", str(run), "--no-progress"])
    assert code == 0 and json.loads(out)["top1"] == res["last_top1"], err

    class Local(nn.Module):  # defined in a function: not importable
        def __init__(self) -> None:
            super().__init__()
            self.net = resnet8(10)

        def forward(self, x):
            return self.net(x)

    # resnet20 is importable, but ResNet(num_classes=10) rebuilds a resnet8: not reproducible
    for name, module in (("b", Local()), ("c", resnet20(10))):
        res = relkd.train({**cfg, "name": name}, student=module, quiet=True)
        run = Path(res["run_dir"])
        recorded = yaml.safe_load((run / "config.yaml").read_text())["student"]["name"]
        assert recorded.startswith("python-module:") and recorded.endswith(
            "Local" if name == "b" else "foreign_resnet.ResNet"
        )
        for argv in (["eval", str(run)], ["train", str(run / "config.yaml"), "--resume"]):
            code, _, err = _cli(argv)
            assert code == 2 and err.count("\n") == 1, err
            assert (
                "was an nn.Module passed from Python that relkd cannot import or rebuild: "
                "pass it again from Python" in err
            )
        # ... and passing it again resumes the run
        again = relkd.train({**cfg, "name": name}, student=module, resume=True, quiet=True)
        assert again["last_top1"] == res["last_top1"]


def test_a_teacher_trained_on_its_own_statistics_gets_them_back(tmp_path, cifar_root):
    """student.mean / student.std of the teacher's run are recorded with its weights
    (model_mean / model_std), so the teacher, named by its zoo name only, sees them again."""
    code, out, err = _cli(["train", _cfg(tmp_path, cifar_root, student={
        "name": "resnet8", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}), "name=t"])  # fmt: skip
    assert code == 0, err
    ckpt = Path(json.loads(out)["run_dir"]) / "student.pt"
    assert torch.load(ckpt, weights_only=True)["meta"]["model_mean"] == [0.5, 0.5, 0.5]
    # relkd eval of the bare file (no run folder, no config) applies them too: the run's number
    code, got, err = _cli(["eval", "--model", "resnet8", "--checkpoint", str(ckpt), "--data",
                           "cifar10", "--root", str(cifar_root), "--no-progress"])  # fmt: skip
    assert code == 0 and json.loads(got)["top1"] == json.loads(out)["last_top1"], err
    assert "relkd eval: note: model resnet8 was trained on inputs normalised with mean (0.5" in err
    kd = _cfg(tmp_path, cifar_root, student={"name": "resnet8"}, method={"name": "kd"},
              teacher={"name": "resnet8", "checkpoint": str(ckpt)})  # fmt: skip
    code, _, err = _cli(["train", kd])
    assert code == 0, err
    assert (
        "note: teacher resnet8 was trained on inputs normalised with mean (0.5, 0.5, 0.5) "
        "std (0.25, 0.25, 0.25) (recorded in student.pt)" in err
    )
    assert (
        "teacher resnet8 sees mean (0.5, 0.5, 0.5) std (0.25, 0.25, 0.25) recorded with "
        "its checkpoint, re-normalised from the data's" in err
    )


def test_a_model_factory_gets_num_classes_and_in_chans_when_it_takes_them():
    from relkd.engine.build import model_kwargs

    path = "tests.foreign_resnet:small_cnn"
    assert model_kwargs(path, {"width": 4}, 1) == {"width": 4, "in_chans": 1}
    assert model_kwargs(path, {}, 3) == {"in_chans": 3}
    assert model_kwargs(FOREIGN, {}, 3) == {}  # resnet8 takes no in_chans: none is passed
    model = relkd.create_model(path, 7, **model_kwargs(path, {"width": 4}, 1))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


def test_in_chans_and_num_classes_only_where_the_factory_takes_them(tmp_path, fmnist_root):
    """README: a model by import path gets num_classes and in_chans "if it takes them": a
    parameter of that name or **kwargs. A grey factory without in_chans trains on Fashion-MNIST
    from the CLI (relkd used to pass in_chans=1 and fail); a **kwargs factory gets both."""
    from relkd.engine.build import model_kwargs

    grey, anyc = "tests.foreign_resnet:grey_net", "tests.foreign_resnet:kwargs_net"
    assert model_kwargs(grey, {}, 1) == {} and model_kwargs(grey, {}, 3) == {}
    assert model_kwargs(anyc, {}, 1) == {"in_chans": 1}
    assert model_kwargs(anyc, {}, 3) == {"in_chans": 3}
    assert model_kwargs("torchvision:resnet18", {}, 3) == {}  # adapters: only to adapt a stem
    assert model_kwargs("torchvision:resnet18", {}, 1) == {"in_chans": 1}
    m = relkd.create_model(anyc, 7, **model_kwargs(anyc, {}, 2))
    assert m[0].in_channels == 2 and m(torch.zeros(1, 2, 8, 8)).shape == (1, 7)
    fmnist = {"name": "fashion_mnist", "root": str(fmnist_root), "batch_size": 16}
    cfg = _cfg(tmp_path, fmnist_root, student={"name": grey}, data=fmnist, name="grey")
    code, out, err = _cli(["train", cfg])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["student"] == grey and 0 <= summary["last_top1"] <= 100
    assert (tmp_path / "runs" / "grey" / "student.pt").is_file()
    # the same factory seen by `relkd profile` on its own 1-channel input
    code, out, err = _cli(["profile", grey, "--num-classes", "10", "--input", "1x8x8",
                           "--no-latency", "--json"])  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["models"][0]["params"] == sum(
        p.numel() for p in relkd.create_model(grey, 10).parameters()
    )
