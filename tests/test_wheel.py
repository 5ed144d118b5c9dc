"""A pip install is the whole product: build the wheel, install it into a fresh virtual
environment (reusing the installed torch), and run a packaged config from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import make_fmnist

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # ~90 s on a loaded 2-core machine: build, venv, one tiny run


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def test_the_wheel_runs_a_packaged_config_outside_the_clone(tmp_path):
    # no build isolation (nothing downloads at test time): the licence metadata needs this
    pytest.importorskip("setuptools", minversion="77")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    # Build from a copy: the build leaves build/ and *.egg-info behind.
    src = tmp_path / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(wheels), str(src)], tmp_path, env)  # fmt: skip
    (whl,) = wheels.glob("relkd-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    shipped = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src/relkd").rglob("*.yaml")}
    assert shipped and shipped <= set(names), sorted(shipped - set(names))[:5]
    assert any(n.endswith("licenses/LICENSE") for n in names)

    # A fresh venv; torch & co. come from this interpreter's site-packages through a .pth line
    # (read after the venv's own site-packages, so the installed wheel is the relkd imported).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    vpy = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    )  # fmt: skip
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()] or [
        sysconfig.get_paths()["purelib"]
    ]
    (purelib / "_outer_site.pth").write_text("\n".join(ours) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps",
          "--no-index", "-q", str(whl)], tmp_path, env)  # fmt: skip

    empty = tmp_path / "empty"
    empty.mkdir()
    relkd_bin = str(venv / "bin" / "relkd")
    p = _run([str(vpy), "-c", "import relkd; print(relkd.__file__)"], empty, env)
    assert Path(p.stdout.strip()).is_relative_to(venv), p.stdout  # not the clone's code
    p = _run([relkd_bin, "--version"], empty, env)
    assert p.stdout.strip().startswith("relkd ")
    p = _run([relkd_bin, "configs", "list"], empty, env)
    assert "fashion_mnist/ce" in p.stdout.split() and "suites/fmnist-mini" in p.stdout.split()

    data = make_fmnist(tmp_path / "fmnist")
    p = _run(
        [relkd_bin, "train", "fashion_mnist/ce", "--quiet", f"data.root={data}",
         "train.epochs=1", "data.train_subset=128", "train.max_steps_per_epoch=2"],
        empty, env,
    )  # fmt: skip
    summary = json.loads(p.stdout)
    run = empty / summary["run_dir"]
    assert run.is_relative_to(empty) and (run / "student.pt").is_file()
    assert (run / "tb").is_dir()  # TensorBoard curves by default
    p = _run([relkd_bin, "eval", str(run), "--no-progress", "--device", "cpu"], empty, env)
    assert json.loads(p.stdout)["top1"] == pytest.approx(summary["last_top1"])
    p = _run([relkd_bin, "bench", "accuracy", "fmnist-mini", "--dry-run", "--only", "ce/*",
              f"data.root={data}"], empty, env)  # fmt: skip
    assert "ce/cnn_tiny/s0: new" in p.stdout + p.stderr
