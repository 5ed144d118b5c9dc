import pytest

from relkd.registry import Registry, RelkdError


def test_get_and_close_match_hint():
    r: Registry[int] = Registry("thing")
    r.add("resnet20", 1)
    r.add("resnet32", 2)
    assert r.get("resnet20") == 1
    assert r.get("RESNET32") == 2  # case-insensitive
    with pytest.raises(RelkdError) as e:
        r.get("resnet2O")
    msg = str(e.value)
    assert "'resnet2O'" in msg and "Did you mean" in msg and "resnet20, resnet32" in msg


def test_duplicate_registration_fails():
    r: Registry[int] = Registry("thing")
    r.add("a", 1)
    with pytest.raises(KeyError):
        r.add("a", 2)
