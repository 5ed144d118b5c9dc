"""Property-based: malformed configs always end in exit code 2 with a message naming the
offending key or value, never in a traceback (hypothesis)."""

from __future__ import annotations

import contextlib
import io

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relkd.cli import main as cli_main
from relkd.config import CHOICES, POSITIVE

SECTIONS = ["student", "data", "optim", "schedule", "method", "train"]
KNOWN = {
    "data": ["batch_size", "eval_batch_size", "num_workers", "augment", "train_subset"],
    "optim": ["lr", "momentum", "weight_decay", "nesterov"],
    "train": ["epochs", "seed", "eval_every", "deterministic", "max_steps_per_epoch"],
    "schedule": ["gamma", "warmup_epochs", "pct_start"],
}
ident = st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True)
junk = st.one_of(
    st.text(alphabet="abcxyz!?", min_size=1, max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(ident, st.integers(), min_size=1, max_size=2),
)


def _base() -> dict:
    return {"student": {"name": "cnn_tiny"}, "method": {"name": "ce"}, "train": {"epochs": 1}}


@st.composite
def malformed(draw) -> tuple[dict, str]:
    """A config with exactly one defect, and the text its error message must contain."""
    cfg = _base()
    kind = draw(st.sampled_from(["unknown_key", "bad_type", "bad_choice", "non_positive", "top"]))
    if kind == "unknown_key":
        sect = draw(st.sampled_from(SECTIONS))
        key = draw(ident.filter(lambda k: k not in _fields(sect)))
        cfg.setdefault(sect, {})[key] = draw(st.integers())
        return cfg, key
    if kind == "top":
        key = draw(ident.filter(lambda k: k not in _fields(None)))
        cfg[key] = 1
        return cfg, key
    if kind == "bad_type":
        sect = draw(st.sampled_from(sorted(KNOWN)))
        key = draw(st.sampled_from(KNOWN[sect]))
        cfg.setdefault(sect, {})[key] = draw(junk)
        return cfg, key
    if kind == "bad_choice":
        dotted = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(ident.filter(lambda v: v not in CHOICES[dotted]))
        sect, key = dotted.split(".")
        cfg.setdefault(sect, {})[key] = value
        return cfg, value
    dotted = draw(st.sampled_from(POSITIVE))
    sect, key = dotted.split(".")
    cfg.setdefault(sect, {})[key] = draw(st.integers(max_value=0))
    return cfg, dotted


def _fields(section: str | None) -> set[str]:
    import dataclasses

    from relkd import config as C

    t = {
        None: C.Config,
        "student": C.ModelConfig,
        "data": C.DataConfig,
        "optim": C.OptimConfig,
        "schedule": C.ScheduleConfig,
        "method": C.MethodConfig,
        "train": C.TrainConfig,
    }[section]
    return {f.name for f in dataclasses.fields(t)}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=malformed())
def test_malformed_configs_fail_clearly(case, tmp_path_factory):
    cfg, needle = case
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["train", str(path)])
    msg = err.getvalue()
    assert code == 2, msg
    assert needle in msg, (needle, msg)
    assert "Traceback" not in msg
