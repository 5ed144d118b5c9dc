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
