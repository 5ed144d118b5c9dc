"""Inputs at the edges of the command line: each ends in one line on stderr and exit 2."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from relkd.cli import main


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return code, err.getvalue()


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


LONG = "a" * 300  # one path component over the 255 bytes of most file systems


@pytest.mark.parametrize(
    "argv",
    [
        ["train", LONG],
        ["train", "fashion_mnist/kd", f"train.epochs={LONG}", "--print-config"],
        ["train", LONG, "train.epochs=1"],
        ["bench", "accuracy", LONG],
        ["eval", LONG],
        ["report", LONG],
        ["configs", "show", LONG],
    ],
)
def test_arguments_over_255_bytes_are_one_line(argv):
    """`OSError: File name too long` escaped while placing positionals, or later."""
    code, err = _cli(argv)
    line = _one_line(err)
    assert code == 2 and line.startswith("relkd: error:"), line


_BAD_YAML = {
    "unclosed": "name: s\nmethods: [ce, kd\n",
    "duplicate": "name: s\nname: t\n",
    "recursive": "name: &a [*a]\n",
    "laughs": "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)),
}


@pytest.mark.parametrize("kind", sorted(_BAD_YAML))
def test_a_malformed_suite_file_is_one_line(tmp_path, kind):
    """The suite reader caught ValueError; PyYAML raises YAMLError (a traceback)."""
    suite = tmp_path / f"{kind}.yaml"
    suite.write_text(_BAD_YAML[kind])
    code, err = _cli(["bench", "accuracy", str(suite), "--out", str(tmp_path / "o")])
    line = _one_line(err)
    assert code == 2 and f"{kind}.yaml' is not valid YAML" in line, line
    assert not (tmp_path / "o").exists()


def test_dry_run_of_a_good_suite_still_reads(tmp_path):
    """The counterpart: a well-formed suite passes the same reader."""
    from relkd.bench.suite import load_suite

    p = Path(__file__).resolve().parents[1] / "src" / "relkd" / "suites" / "fmnist-mini.yaml"
    assert load_suite(p).name


# --- item 1: one-cycle settings and huge floats --------------------------------------------------
@pytest.mark.parametrize(
    "override, named",
    [
        ("schedule.div_factor=0", "schedule.div_factor"),
        ("schedule.div_factor=-2", "schedule.div_factor"),
        ("schedule.final_div_factor=0", "schedule.final_div_factor"),
        ("schedule.final_div_factor=-1", "schedule.final_div_factor"),
        ("schedule.base_momentum=-0.5", "schedule.base_momentum"),
        ("schedule.max_momentum=-1", "schedule.max_momentum"),
        ("schedule.max_momentum=1.5", "schedule.max_momentum"),
        ("optim.lr=1e308", "optim.lr"),
        ("optim.weight_decay=1e300", "optim.weight_decay"),
        ("schedule.gamma=1e300", "schedule.gamma"),
        ("schedule.final_div_factor=1e308", "schedule.final_div_factor"),
    ],
)
def test_one_cycle_settings_and_huge_floats_are_refused(override, named):
    """Negatives trained on with a negative lr / momentum (exit 0), zeros divided by zero, huge
    finite floats overflowed inside torch (for gamma after an epoch was saved). Every shipped
    Fashion-MNIST config uses the one-cycle schedule."""
    code, err = _cli(["train", "fashion_mnist/ce", override, "--print-config"])
    line = _one_line(err.split("# run folder")[-1] if "# run folder" in err else err)
    assert code == 2 and named in line, line


def test_a_multistep_lr_that_leaves_float32_is_refused():
    code, err = _cli(
        ["train", "fashion_mnist/ce", "schedule.name=multistep", "schedule.milestones=[1,2]",
         "schedule.gamma=1e25", "--print-config"]
    )  # fmt: skip
    line = _one_line(err)
    assert code == 2 and "learning rate reaches" in line and "float32" in line, line


def test_the_shipped_one_cycle_values_still_pass():
    from relkd.config import load_config
    from relkd.resources import resolve

    cfg = load_config(resolve("fashion_mnist/ce"))
    assert cfg.schedule.name == "onecycle"
    assert cfg.schedule.div_factor > 0 and cfg.schedule.final_div_factor > 0


# --- item 7: nested lists in typed fields ---------------------------------------------------------
@pytest.mark.parametrize(
    "override", ["schedule.milestones=[[1]]", "student.mean=[[1]]", "optim.betas=[[0.9],0.99]"]
)
def test_nested_lists_in_typed_fields_are_one_line(override):
    code, err = _cli(["train", "fashion_mnist/ce", override, "--print-config"])
    line = _one_line(err)
    key = override.split("=")[0]
    assert code == 2 and f"{key}=" in line and "flat list" in line, line


# --- item 10: --print-config runs the checks of a real run ----------------------------------------
@pytest.mark.parametrize(
    "config, override, named",
    [
        ("fashion_mnist/kd", "method.args.temperature=-1", "temperature=-1"),
        ("fashion_mnist/ce", "data.name=cifar1000", "data.name"),
        ("fashion_mnist/ce", "train.device=gpu:7", "train.device='gpu:7'"),
    ],
)
def test_print_config_refuses_what_a_real_run_refuses(tmp_path, config, override, named):
    for extra in (["--print-config"], [f"output_dir={tmp_path}"]):
        code, err = _cli(["train", config, override, *extra])
        line = [x for x in err.splitlines() if x.startswith("relkd: error:")]
        assert code == 2 and len(line) == 1 and named in line[0], (extra, err)
        assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the real run wrote nothing either


# --- item 11: names and paths are strings, booleans are booleans ----------------------------------
def _run_folder(tmp_path: Path, *overrides: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "fashion_mnist/ce", f"output_dir={tmp_path}", *overrides,
                     "--print-config"])  # fmt: skip
    assert code == 0
    folder = [x for x in out.getvalue().splitlines() if x.startswith("# run folder:")]
    return Path(folder[0].split(": ", 1)[1]).name


@pytest.mark.parametrize("name", ["yes", "no", "1E-3", "1e3", "1000.0", "0x10", "on", "2024-01-01"])
def test_a_name_is_the_string_written(tmp_path, name):
    """`name=yes` made the folder `True`, `name=1E-3` made `0.001`; `1e3` and `1000.0` shared
    one folder."""
    assert _run_folder(tmp_path, f"name={name}") == name


def test_a_name_with_a_newline_is_refused_not_folded(tmp_path):
    code, err = _cli(["train", "fashion_mnist/ce", f"output_dir={tmp_path}", "name=a\nb",
                      "--print-config"])  # fmt: skip
    assert code == 2 and "control characters" in err, err


@pytest.mark.parametrize("value", ["-9", "1", "0", "yes_please", "2.5"])
def test_a_boolean_takes_only_true_or_false(value):
    code, err = _cli(["train", "fashion_mnist/ce", f"train.sync_bn={value}", "--print-config"])
    line = _one_line(err)
    assert code == 2 and "train.sync_bn" in line, line


@pytest.mark.parametrize(
    "text, key",
    [("train: {sync_bn: yes}\n", "train.sync_bn"), ("name: 1e3\n", "name"),
     ("output_dir: 1e3\n", "output_dir"),
     ("train: {sync_bn: -9}\n", "train.sync_bn"), ("data: {root: 5}\n", "data.root")],
)  # fmt: skip
def test_config_files_with_implicit_types_are_one_line(tmp_path, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student: {name: cnn_tiny}\nmethod: {name: ce}\n" + text)
    code, err = _cli(["train", str(cfg), "--print-config"])
    line = _one_line(err)
    assert code == 2 and f"{key}=" in line and "c.yaml" in line, line


def test_booleans_and_quoted_names_still_work(tmp_path):
    assert _run_folder(tmp_path, "name='yes'") == "yes"
    assert _run_folder(tmp_path, "train.sync_bn=true", "name=x") == "x"
    assert _run_folder(tmp_path, "data.in_memory=true", "name=y") == "y"


# --- item 12: a folder given as the config ---------------------------------------------------------
def test_a_folder_given_as_config_says_it_is_a_folder(tmp_path):
    code, err = _cli(["train", str(tmp_path), "--print-config"])
    line = _one_line(err)
    assert code == 2 and "is a folder, not a config file" in line, line


@pytest.mark.parametrize("argv", [["train", "/dev/zero"], ["bench", "accuracy", "/dev/zero"]])
def test_a_config_or_suite_that_is_not_a_regular_file_is_one_line(argv):
    """Read only as regular files within a size bound (a device would be read forever)."""
    code, err = _cli([*argv, "--dry-run"] if argv[0] == "bench" else [*argv, "--print-config"])
    line = _one_line(err)
    assert code == 2 and "'/dev/zero' is not a regular file" in line, line
