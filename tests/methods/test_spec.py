"""MethodSpec: one reading of ``"a+b"`` and its arguments. The same mistake gives the same
message from every entry point (CLI, relkd.train, relkd.Distillation, build_method, the
benchmark suites, relkd bench speed), and a method schedule longer than the run is said once."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

import relkd
from relkd.cli import main
from relkd.methods import METHODS, MethodContext, MethodSpec, build_method, list_methods
from relkd.methods.spec import MethodScheduleWarning
from relkd.models import create_model
from relkd.registry import RelkdError

#: (method, args) -> a mistake; each is checked config-only, before any data or model.
MISTAKES = {
    "unknown argument": ("kd", {"tau": 2.0}),
    "unknown part": ("rrd+kdd", {}),
    "args not keyed by part": ("rrd+kd", {"temperature": 2.0}),
    "wrong type": ("kd", {"temperature": "hot"}),
    "negative weight": ("rrd+kd", {"kd": {"weight": -1.0}}),
    "repeated part": ("kd+kd", {}),
}


def _spec_message(method: str, args: dict) -> str:
    with pytest.raises(RelkdError) as e:
        MethodSpec.parse(method, args).check()
    return str(e.value)


def _config(method: str, args: dict, tmp_path) -> dict:
    # Nothing here exists: the method is checked before any file, folder or model.
    return {
        "student": {"name": "cnn_tiny"},
        "teacher": {"name": "cnn_small", "checkpoint": str(tmp_path / "missing.pt")},
        "method": {"name": method, "args": args},
        "data": {"name": "fashion_mnist", "root": str(tmp_path / "no-data")},
        "output_dir": str(tmp_path / "runs"),
    }


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_same_mistake_gives_the_same_message_everywhere(mistake, tmp_path, capsys):
    method, args = MISTAKES[mistake]
    msg = _spec_message(method, args)
    assert "\n" not in msg and ("method" in msg or "Valid" in msg), msg

    with pytest.raises(RelkdError) as e:  # relkd.train (-> fit -> preflight)
        relkd.train(_config(method, args, tmp_path), quiet=True)
    assert str(e.value) == msg

    cfg = tmp_path / "c.yaml"  # relkd train CONFIG: one line on stderr, exit 2
    cfg.write_text(yaml.safe_dump(_config(method, args, tmp_path)))
    assert main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"relkd: error: {msg}"

    with pytest.raises(RelkdError) as e:  # the engine's build
        build_method(method, MethodContext(num_classes=10), args)
    assert str(e.value) == msg

    with pytest.raises(RelkdError) as e:  # relkd.Distillation, before any model runs
        student = create_model("cnn_tiny", 10)
        relkd.Distillation(method, student, None, example_input=(1, 28, 28), **args)
    assert str(e.value) == msg


def test_the_suites_and_bench_speed_say_it_the_same_way(tmp_path, fmnist_root):
    from relkd.bench import run_suite
    from relkd.bench.speed import run_speed
    from tests.test_bench_accuracy import write_suite

    method, args = MISTAKES["unknown argument"]
    msg = _spec_message(method, args)
    bad = write_suite(
        tmp_path / "s.yaml", fmnist_root, {"checkpoint": "nowhere.pt"},
        methods=[{"name": method, "method": {"args": args}}],
    )  # fmt: skip
    with pytest.raises(RelkdError) as e:
        run_suite(bad, tmp_path / "o", progress=False)
    assert f"{method}: {msg}" in str(e.value)

    method, args = MISTAKES["args not keyed by part"]
    bad = write_suite(
        tmp_path / "s2.yaml", fmnist_root, {"checkpoint": "nowhere.pt"},
        methods=[{"name": method, "method": {"args": args}}],
    )  # fmt: skip
    with pytest.raises(RelkdError) as e:
        run_suite(bad, tmp_path / "o2", progress=False)
    assert _spec_message(method, args) in str(e.value)

    with pytest.raises(RelkdError) as e:
        run_speed("cnn_small", "cnn_tiny", ["rrd+kdd"], device="cpu")
    assert str(e.value) == _spec_message("rrd+kdd", {})


def test_what_a_spec_says_about_its_parts():
    s = MethodSpec.parse("rrd + kd", {"kd": {"temperature": 2}})
    assert s.parts == ("rrd", "kd") and s.is_composite and s.requires_teacher
    assert s.part_args("kd") == {**METHODS.get("kd").composite_defaults, "temperature": 2}
    assert s.resolved("kd", "temperature") == 2
    assert s.default_ce_weight == max(
        METHODS.get("rrd").default_ce_weight, METHODS.get("kd").default_ce_weight
    )
    ce = MethodSpec.parse("ce")
    assert not ce.is_composite and not ce.requires_teacher and ce.part_args("ce") == {}
    assert MethodSpec.split("a + b") == ("a", "b")  # no lookup
    ctx = MethodContext(
        num_classes=10,
        student_shapes={"pooled": (8,), "logits": (10,)},
        teacher_shapes={"pooled": (16,), "logits": (10,)},
    )
    method, ce_weight = build_method("rrd+kd", ctx)
    assert type(method).__name__ == "Composite" and ce_weight == s.default_ce_weight


@pytest.mark.parametrize("name", list_methods())
def test_every_declared_epoch_argument_is_an_argument(name):
    spec = MethodSpec.parse(name)
    for arg in METHODS.get(name).epoch_args:
        assert arg in spec.valid_args(name), (name, arg)
        assert isinstance(spec.resolved(name, arg), int), (name, arg)


@pytest.mark.parametrize(
    ("method", "args", "epochs", "said"),
    [
        ("dkd", {}, 8, ["dkd", "warmup=20", "train.epochs=8", "method.args.warmup"]),
        ("dkd", {"warmup": 8}, 8, None),
        ("dkd", {}, 240, None),
        ("ab", {}, 8, ["ab", "init_epochs=30", "pre-training phase"]),
        ("ft", {}, 8, ["ft", "init_epochs=30"]),
        ("fsp", {}, 8, ["fsp", "init_epochs=30"]),
        ("fitnet", {}, 8, None),  # no pre-training phase by default
        ("fitnet", {"init_epochs": 10}, 8, ["fitnet", "init_epochs=10"]),
        ("rrd+dkd", {"dkd": {"warmup": 30}}, 8, ["'dkd'", "method.args.dkd.warmup"]),
        ("kd", {}, 1, None),
    ],
)
def test_a_method_schedule_longer_than_the_run_is_noted(method, args, epochs, said):
    notes = MethodSpec.parse(method, args).schedule_notes(epochs)
    if said is None:
        assert notes == []
    else:
        assert len(notes) == 1 and all(s in notes[0] for s in said), notes


def test_the_note_is_said_once_through_the_cli_and_the_api(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    conf = _config("dkd", {}, tmp_path)
    conf["teacher"]["checkpoint"] = str(cfg)  # any existing file: --print-config trains nothing
    conf["train"] = {"epochs": 8}
    cfg.write_text(yaml.safe_dump(conf))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert main(["train", str(cfg), "--print-config"]) == 0
    notes = [x for x in w if issubclass(x.category, MethodScheduleWarning)]
    assert len(notes) == 1 and "warmup=20" in str(notes[0].message)
    assert "train.epochs=8" in str(notes[0].message)

    student, teacher = create_model("cnn_tiny", 10), create_model("cnn_small", 10)
    with pytest.warns(MethodScheduleWarning, match=r"warmup=20 is longer than the run"):
        relkd.Distillation("dkd", student, teacher, example_input=(1, 28, 28), epochs=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodScheduleWarning)  # unknown length: no note
        relkd.Distillation("dkd", student, teacher, example_input=(1, 28, 28))
    assert torch.is_tensor(next(student.parameters()))
