"""RunLogger: TensorBoard shows each epoch once after a resume, as metrics.jsonl does."""

from __future__ import annotations

import json

import pytest

from relkd.engine.logger import METRICS, RunLogger


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(run_dir / "tb"), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_purges_the_killed_sessions_later_epochs(tmp_path):
    # Session 1 logged epochs 1-3, but (killed) its last checkpoint holds epochs 1-2 only.
    first = RunLogger(tmp_path)
    for e in (1, 2, 3):
        first.metrics({"epoch": e, "train/loss": float(e)})
    first.close()
    # Session 2 resumes from that checkpoint and logs epoch 3 again (another value), then 4.
    second = RunLogger(tmp_path)
    second.set_history([{"epoch": 1, "train/loss": 1.0}, {"epoch": 2, "train/loss": 2.0}])
    for e in (3, 4):
        second.metrics({"epoch": e, "train/loss": 10.0 * e})
    second.close()
    lines = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert _scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_fresh_run_purges_nothing(tmp_path):
    log = RunLogger(tmp_path)
    log.set_history([])
    for e in (1, 2):
        log.metrics({"epoch": e, "train/loss": float(e)})
    log.close()
    assert _scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 2.0)]
