"""Every shipped config loads, names registered models and methods, and matches its generator."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from relkd import list_methods, list_models
from relkd.config import load_config

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "src" / "relkd" / "configs"  # ./configs in a clone is a link to it
# transfer/ holds `relkd probe` options, not training configs.
CONFIGS = sorted(p for p in PACKAGED.rglob("*.yaml") if "transfer" not in p.parts)


def _gen():
    spec = importlib.util.spec_from_file_location("gen_configs", REPO / "scripts/gen_configs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_configs():
    assert len(CONFIGS) >= 28


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(PACKAGED)))
def test_config_loads_and_names_exist(path):
    cfg = load_config(path)
    models = set(list_models())
    for m in (cfg.student, cfg.teacher):
        if m is not None and ":" not in m.name:
            assert m.name in models, m.name
    for part in cfg.method.name.split("+"):
        assert part in list_methods()


def test_generated_configs_are_committed():
    gen = _gen()
    for path, cfg in gen.configs().items():
        assert path.exists(), f"{path} missing: run scripts/gen_configs.py"
        assert path.read_text() == gen.render(cfg), f"{path} differs from scripts/gen_configs.py"


def test_crd_protocol_lr_rule():
    gen = _gen()
    for t, s in gen.CRD_PAIRS:
        cfg = load_config(PACKAGED / "cifar100/kd" / f"{t}_{s}.yaml")
        lr = cfg.optim.lr_by_student.get(cfg.student.name, cfg.optim.lr)
        assert lr == (0.01 if s in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
        assert cfg.train.epochs == 240 and cfg.data.batch_size == 64
