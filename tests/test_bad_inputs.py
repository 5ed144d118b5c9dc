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
