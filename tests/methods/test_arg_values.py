"""Out-of-range method arguments stop at build time with one RelkdError line (no traceback in
the first training step, no silent gradient ascent from a negative weight)."""

from __future__ import annotations

import pytest

from relkd.config import load_config
from relkd.methods import MethodContext, build_method
from relkd.methods.base import check_value
from relkd.registry import RelkdError


@pytest.mark.parametrize(
    ("method", "key", "value", "words"),
    [
        ("kd", "temperature", -4.0, "must be > 0"),
        ("kd", "temperature", 0.0, "must be > 0"),
        ("kd", "weight", -1.0, "must be >= 0"),
        ("dkd", "beta", -8.0, "must be >= 0"),
        ("at", "p", 0.0, "must be > 0"),
        ("corsd", "margin", -1.0, "must be >= 0"),
        ("corsd", "w_kl", -0.1, "must be >= 0"),
        ("kd", "temperature", float("inf"), "finite"),
    ],
)
def test_bad_method_values_are_one_line(method, key, value, words) -> None:
    with pytest.raises(RelkdError, match=words) as e:
        check_value(method, key, value)
    assert "\n" not in str(e.value) and key in str(e.value)


def test_build_method_refuses_before_training_and_keeps_good_values() -> None:
    ctx = MethodContext(num_classes=10, student_shapes={"logits": (10,)})
    with pytest.raises(RelkdError, match="temperature=-4"):
        build_method("kd", ctx, {"temperature": -4.0})
    build_method("kd", ctx, {"temperature": 2.0, "weight": 0.0})  # a zero weight is allowed
    check_value("ft", "stage", -1)  # stage indices count from the end


def test_infinite_lr_is_refused() -> None:
    with pytest.raises(RelkdError, match=r"optim.lr=inf must be a finite number > 0"):
        load_config({"student": {"name": "cnn_tiny"}}, ["optim.lr=inf"])
