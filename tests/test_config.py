import pytest

from relkd.config import load_config, to_yaml
from relkd.registry import RelkdError

BASE = {"student": {"name": "resnet8"}}


def test_defaults_and_overrides():
    cfg = load_config(BASE, ["data.batch_size=32", "optim.lr=0.1", "method.args.temperature=2"])
    assert cfg.data.batch_size == 32
    assert cfg.optim.lr == pytest.approx(0.1)
    assert cfg.method.args == {"temperature": 2}
    assert cfg.schedule.milestones == [150, 180, 210]  # CRD protocol default
    assert "batch_size: 32" in to_yaml(cfg)


def test_yaml_file_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(load_config(BASE, ["train.epochs=7"])))
    assert load_config(p).train.epochs == 7


@pytest.mark.parametrize(
    ("cfg", "overrides", "needles"),
    [
        (BASE, ["data.batch_sise=3"], ["data.batch_sise", "batch_size"]),
        (BASE, ["optim.name=adam"], ["optim.name", "adam", "sgd, adamw"]),
        (BASE, ["train.epochs=0"], ["train.epochs", "> 0"]),
        (BASE, ["optim.lr=-1"], ["optim.lr"]),
        (BASE, ["data.batch_size=abc"], ["data.batch_size", "abc"]),
        ({"student": {"name": "resnet8", "depth": 3}}, [], ["student.depth", "name, kwargs"]),
        ({"studnt": {"name": "resnet8"}}, [], ["studnt", "student"]),
        (BASE, ["train.precision=fp8"], ["fp8", "fp32, bf16, fp16"]),
        (BASE, ["notakeyvalue"], ["key=value"]),
        ({}, [], ["student.name"]),
    ],
)
def test_strict_errors_name_the_key(cfg, overrides, needles):
    with pytest.raises(RelkdError) as e:
        load_config(cfg, overrides)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_file():
    with pytest.raises(RelkdError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


# ------------------------------------------------------------------ values (issue 14 item 5)
FM_CE = "configs/fashion_mnist/ce.yaml"

BAD_VALUES = [
    ("schedule.min_lr=-0.01", "schedule.min_lr"),
    ("schedule.gamma=-0.1", "schedule.gamma"),
    ("schedule.gamma=0", "schedule.gamma"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.grad_clip=0", "train.grad_clip"),
    ("schedule.pct_start=1.5", "schedule.pct_start"),
    ("schedule.pct_start=0", "schedule.pct_start"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"),
    ("schedule.warmup_epochs=400", "schedule.warmup_epochs"),
    ("data.train_subset=0", "data.train_subset"),
    ("data.test_subset=0", "data.test_subset"),
    ("data.val_split=1.0", "data.val_split"),
    ("data.val_split=-0.1", "data.val_split"),
    ("optim.momentum=-0.9", "optim.momentum"),
    ("optim.weight_decay=-0.0005", "optim.weight_decay"),
    ("train.seed=9223372036854775808", "train.seed"),
    ("train.seed=-1", "train.seed"),
    ("data.val_seed=-1", "data.val_seed"),
    ("student.kwargs.num_classes=7", "student.kwargs.num_classes"),
    ("method.ce_weight=-1", "method.ce_weight"),
    ("method.ce_weight=0", "method.ce_weight"),  # FM_CE is method ce
    ("train.log_every=0", "train.log_every"),
    (
        "train.compile_mode=fast",
        "train.compile_mode",
    ),  # refused by the config, so --print-config too
    ("schedule.milestones=[180,150]", "schedule.milestones"),  # unsorted: a typo
    ("schedule.milestones=[150,150]", "schedule.milestones"),  # torch would decay twice
]


@pytest.mark.parametrize(("override", "needle"), BAD_VALUES)
def test_bad_values_refused(override, needle):
    with pytest.raises(RelkdError) as e:
        load_config(FM_CE, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_values_in_combination():
    adam = ["optim.name=adamw"]
    for betas in ("[0.9,1.5]", "[0.9]", "[-0.1,0.9]"):
        with pytest.raises(RelkdError, match=r"optim\.betas"):
            load_config(BASE, [*adam, f"optim.betas={betas}"])
    load_config(BASE, [*adam, "optim.betas=[0.5,0.99]"])
    with pytest.raises(RelkdError, match=r"min_lr.*optim.lr=0.01"):
        load_config(BASE, ["optim.lr=0.01", "schedule.min_lr=0.1"])
    with pytest.raises(RelkdError, match=r"teacher\.kwargs\.num_classes"):
        load_config({**BASE, "teacher": {"name": "resnet8", "kwargs": {"num_classes": 3}}})
    # ce_weight 0 is fine where a distillation term remains
    assert load_config(BASE, ["method.name=kd", "method.ce_weight=0"]).method.ce_weight == 0
    ok = load_config(BASE, ["train.seed=9223372036854775807", "schedule.warmup_epochs=2.5"])
    assert ok.train.seed == 2**63 - 1


@pytest.mark.parametrize(("override", "needle"), BAD_VALUES)
def test_bad_values_through_the_cli(override, needle, capsys):
    from relkd.cli import main

    assert main(["train", FM_CE, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, err


YAML_CASES = {
    "unclosed": ("data: {batch_size: [1, 2\n", "line"),
    "tab": ("data:\n\tbatch_size: 3\n", "cannot start any token"),
    "duplicate": ("train:\n  epochs: 1\n  epochs: 2\n", "duplicate key epochs"),
    "python_tag": ('x: !!python/object/apply:os.system ["touch PWNED"]\n', "never loaded"),
    "python_name": ("x: !!python/name:os.system\n", "never loaded"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_malformed_yaml_one_line(case, tmp_path, capsys, monkeypatch):
    from relkd.cli import main

    text, needle = YAML_CASES[case]
    p = tmp_path / "c.yaml"
    p.write_text("student: {name: resnet8}\n" + text)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "not valid YAML" in err, err
    assert not (tmp_path / "PWNED").exists()


def test_malformed_override_one_line():
    with pytest.raises(RelkdError, match=r"override 'data.batch_size=\[1,' is not valid YAML"):
        load_config(BASE, ["data.batch_size=[1,"])


def test_cli_subprocess_exit_2_one_line(tmp_path):
    """The real command line a user types: exit 2, one line on stderr, no run folder."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": "src", "OMP_NUM_THREADS": "1"}
    for kv in ("schedule.min_lr=-1", "train.grad_clip=-0.5"):
        r = subprocess.run(
            [sys.executable, "-m", "relkd", "train", FM_CE, kv, f"output_dir={tmp_path}"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and kv.split("=")[0] in r.stderr
    assert not any(tmp_path.iterdir())


def test_more_bad_inputs_through_the_cli(tmp_path, capsys, monkeypatch):
    """AdamW betas, a truncated .safetensors checkpoint, an empty class folder: exit 2, one line."""
    import numpy as np
    from PIL import Image

    from relkd.cli import main

    monkeypatch.setenv("RELKD_CACHE_DIR", str(tmp_path / "cache"))
    bad_ckpt = tmp_path / "w.safetensors"
    bad_ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / c / "0.png")
    (root / "train" / "empty").mkdir()
    cases = [
        (["optim.name=adamw", "optim.betas=[0.9,1.2]"], "optim.betas"),
        ([f"student.checkpoint={bad_ckpt}"], "cannot read checkpoint"),
        (["data.name=imagefolder", f"data.root={root}", "data.image_size=8"], "holds no image"),
    ]
    for overrides, needle in cases:
        code = main(["train", FM_CE, *overrides, f"output_dir={tmp_path / 'runs'}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and needle in err, (overrides, err)


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "Y", "1"])
def test_a_boolean_override_takes_only_true_or_false_not_yaml_11_words(value):
    """``train.tensorboard=yes`` was read by YAML 1.1 as true; the README promises that a boolean
    key takes only true / false (found by a new-user check)."""
    with pytest.raises(RelkdError, match=r"train\.tensorboard=.* must be true or false"):
        load_config(FM_CE, [f"train.tensorboard={value}"])
    assert load_config(FM_CE, ["train.tensorboard=false"]).train.tensorboard is False
    assert load_config(FM_CE, ["train.tensorboard=True"]).train.tensorboard is True


def test_accumulation_with_skip_is_refused_by_the_config_check(tmp_path):
    """``--print-config`` accepted what ``relkd train`` refused (found by a new-user check)."""
    import subprocess
    import sys

    bad = ["train.grad_accum_steps=2", "train.on_nonfinite=skip"]
    with pytest.raises(RelkdError, match=r"grad_accum_steps=2 with train\.on_nonfinite=skip"):
        load_config(FM_CE, bad)
    p = subprocess.run(
        [sys.executable, "-m", "relkd", "train", FM_CE, *bad, "--print-config"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_config_files_read_only_true_and_false_as_booleans(tmp_path, capsys):
    """YAML 1.1 read ``yes`` / ``no`` / ``on`` / ``off`` in a config file as booleans while
    overrides were strict: a file now reads them as strings, like an override (found by a
    new-user check). A string key keeps the word; a boolean key given one fails naming it."""
    from relkd.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(
        "student: {name: cnn_tiny}\nmethod: {name: ce, args: {}}\n"
        "train: {progress: TRUE, tensorboard: False, teacher_cache: off}\n"
        f"output_dir: {tmp_path / 'runs'}\nname: no\n"
    )
    cfg = load_config(good)
    assert cfg.name == "no" and cfg.train.teacher_cache == "off"  # were False: refused
    assert cfg.train.progress is True and cfg.train.tensorboard is False
    assert main(["train", str(good), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: 'no'" in out and f"# run folder: {tmp_path / 'runs' / 'no'}" in out
    for word in ("yes", "no", "on", "off", "y", "Off"):
        bad = tmp_path / f"bad_{word}.yaml"
        bad.write_text(f"student: {{name: cnn_tiny}}\ntrain: {{progress: {word}}}\n")
        assert main(["train", str(bad), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"relkd: error: train.progress={word!r} in config file {str(bad)!r} is not valid: "
            "must be true or false\n"
        )
    # a suite file reads the same way: its base config's boolean given "off" is refused
    from relkd.bench.suite import load_suite

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nbase: {student: {name: cnn_tiny}, train: {tensorboard: off}}\n"
        "teachers: {cnn_small: {checkpoint: t.pt}}\npairs: [[cnn_small, cnn_tiny]]\n"
        "methods: [ce]\n"
    )
    base = load_suite(suite).base
    assert base["train"]["tensorboard"] == "off"  # was False
    with pytest.raises(RelkdError, match=r"train\.tensorboard='off' is not valid: must be true"):
        load_config(base)  # each run's config, built from the base
    suite.write_text(suite.read_text().replace("tensorboard: off", "tensorboard: false"))
    assert load_suite(suite).base["train"]["tensorboard"] is False


def test_every_yaml_relkd_reads_goes_through_the_strict_loader(tmp_path):
    """No module of relkd reads YAML but relkd._yaml (YAML 1.2's booleans): ``yaml.safe_load`` /
    ``OmegaConf.load`` elsewhere read ``yes`` / ``on`` as booleans (``relkd probe``'s config
    did). The readers that are not config files (a run folder's config.yaml, ...) read as
    config files do."""
    import re
    from pathlib import Path

    from relkd._fs import read_yaml_or_none
    from relkd._yaml import strict_load

    src = Path(__file__).resolve().parents[1] / "src" / "relkd"
    reader = re.compile(r"\b(?:yaml\.(?:safe_load|load|full_load|unsafe_load)|OmegaConf\.load)\(")
    offenders = [
        f"{p.relative_to(src)}:{n}"
        for p in sorted(src.rglob("*.py"))
        if p.name != "_yaml.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if reader.search(line)
    ]
    assert offenders == []
    assert strict_load("a: yes\nb: on\nc: true\nd: 1e3\n") == {
        "a": "yes", "b": "on", "c": True, "d": 1000.0,
    }  # fmt: skip
    cfg = load_config({"student": {"name": "cnn_tiny"}, "name": "no"})
    text = to_yaml(cfg)
    assert strict_load(text)["name"] == "no"  # relkd's own record reads back the same
    (tmp_path / "config.yaml").write_text("name: on\ntrain: {progress: true}\n")
    assert read_yaml_or_none(tmp_path / "config.yaml") == {
        "name": "on", "train": {"progress": True},
    }  # fmt: skip
