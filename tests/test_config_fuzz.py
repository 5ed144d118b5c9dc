"""Property-based: malformed configs -- unknown keys, wrong types, bad choices and values out of
their range -- always end in exit code 2 with one line naming the offending key or value, never
in a traceback (hypothesis)."""

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


neg = st.floats(max_value=-1e-9, min_value=-1e6, allow_nan=False)
#: Out-of-range values per key (each accepted by the type but meaningless or harmful), drawn at
#: random: negative or zero where a positive value is needed, fractions outside their interval.
BAD_VALUES = {
    "schedule.min_lr": neg,
    "schedule.gamma": st.floats(max_value=0, min_value=-1e6, allow_nan=False),
    "train.grad_clip": st.floats(max_value=0, min_value=-1e6, allow_nan=False),
    "schedule.pct_start": st.one_of(
        st.floats(max_value=0, min_value=-10), st.floats(min_value=1, max_value=10)
    ),
    "schedule.warmup_epochs": st.one_of(neg, st.floats(min_value=1, max_value=1e4)),  # epochs 1
    "data.train_subset": st.integers(max_value=0, min_value=-(10**6)),
    "data.test_subset": st.integers(max_value=0, min_value=-(10**6)),
    "data.val_split": st.one_of(
        st.floats(max_value=0, min_value=-10), st.floats(min_value=1, max_value=10)
    ),
    "optim.momentum": st.one_of(neg, st.floats(min_value=1, max_value=100)),
    "optim.weight_decay": neg,
    "train.seed": st.one_of(
        st.integers(min_value=2**63, max_value=2**64 - 1), st.integers(max_value=-1, min_value=-10)
    ),
    "method.ce_weight": neg,
}


def _base() -> dict:
    return {"student": {"name": "cnn_tiny"}, "method": {"name": "ce"}, "train": {"epochs": 1}}


@st.composite
def malformed(draw) -> tuple[dict, str]:
    """A config with exactly one defect, and the text its error message must contain."""
    cfg = _base()
    kinds = ["unknown_key", "bad_type", "bad_choice", "non_positive", "top", "bad_value", "betas"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bad_value":
        dotted = draw(st.sampled_from(sorted(BAD_VALUES)))
        sect, key = dotted.split(".")
        cfg.setdefault(sect, {})[key] = draw(BAD_VALUES[dotted])
        return cfg, dotted
    if kind == "betas":
        good = st.floats(min_value=0, max_value=0.999)
        bad = st.one_of(neg, st.floats(min_value=1, max_value=10))
        betas = draw(st.one_of(st.tuples(good, bad), st.tuples(bad, good), st.tuples(good)))
        cfg["optim"] = {"name": "adamw", "betas": list(betas)}
        return cfg, "optim.betas"
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
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
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
    assert msg.strip().count("\n") == 0, msg
