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


@pytest.mark.parametrize(
    ("override", "kind", "some_valid", "forms"),
    [("method.name=logit_mse", "method", "crd, dist, dkd", ""),
     ("student.name=mynet", "model", "cnn_small, cnn_tiny", "; torchvision:<name>, timm:<name>"),
     ("data.name=flowers", "dataset", "cifar10, cifar100", "")],
)  # fmt: skip
def test_an_unknown_name_lists_the_valid_ones_and_the_import_path_form(
    override, kind, some_valid, forms, capsys
):
    """A user's method registered under a short name in a module the CLI never imported is
    not found; the one-line error says how to name it (its import path) next to the valid
    names, for methods, models and data sets alike (`relkd train`, as `relkd.train`)."""
    from relkd.cli import main

    code = main(["train", "fashion_mnist/kd", override, "--print-config"])
    err = capsys.readouterr().err
    bad = override.split("=", 1)[1]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"unknown {kind} {bad!r}." in err and "Valid choices: " in err and some_valid in err
    assert err.rstrip().endswith(
        f"{forms}; or your own {kind} by its import path package.module:Name (a short name your "
        "module registers is known only once that module is imported, e.g. as an entry point)"
    )
