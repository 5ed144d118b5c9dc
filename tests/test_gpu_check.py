"""benchmarks/gpu/run.sh without a GPU exits 0 saying it skipped; its summary flags failures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def test_run_sh_without_cuda_skips_with_exit_0(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable}  # no GPU visible
    p = subprocess.run(
        ["bash", str(GPU / "run.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "no CUDA device: GPU check skipped" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["status"] == "skipped" and "torch.cuda.is_available() is False" in summary["reason"]
    )
    assert "status: **skipped**" in (out / "summary.md").read_text()
    assert not list(out.glob("*.rc.json")), "no step ran"


def test_summary_fails_on_a_failed_or_missing_step(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_summarize", GPU / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in mod.STEPS:
        (tmp_path / f"{name}.rc.json").write_text(json.dumps({"rc": 0, "seconds": 1, "limit_s": 9}))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><skipped message="why"/></testcase></testsuite></testsuites>'
    )
    rec = {"config": "online_step", "method": "kd", "precision": "bf16", "compile": True,
           "status": "ok", "step_ms_median": 4.0, "images_per_s": 16000.0, "peak_mem_mb": 300.0}  # fmt: skip
    (tmp_path / "speed_eager.log").write_text("a warning line\n" + json.dumps(rec) + "\n")
    run = tmp_path / "torchrun" / "ce"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"best_top1": 50.0, "last_top1": 49.0}))
    s, ok = mod.summarize(tmp_path)
    assert ok and s["status"] == "ok" and s["tests"]["passed"] == 1 and s["tests"]["skipped"] == 1
    md = mod.markdown(s)
    assert "| online_step | kd | bf16 | on | 4.00 | 16000 | 300 |" in md
    (tmp_path / "torchrun.rc.json").write_text(
        json.dumps({"rc": 124, "seconds": 50, "limit_s": 50})
    )
    assert mod.summarize(tmp_path)[1] is False  # timed out
    (tmp_path / "torchrun.rc.json").write_text(json.dumps({"rc": 0}))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"><failure message="boom"/>'
        "</testcase></testsuite></testsuites>"
    )
    s, ok = mod.summarize(tmp_path)
    assert not ok and s["tests"]["failed"] == 1 and "- failed: `t::a` boom" in mod.markdown(s)
    assert mod.main([str(tmp_path)]) == 1
