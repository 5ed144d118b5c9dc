"""Run-folder outputs: JSONL metrics, optional TensorBoard, messages. Only rank 0 writes.

Nothing is written until the first :meth:`RunLogger.metrics` / :meth:`RunLogger.set_history`
call (the run folder's checks come first). ``metrics.jsonl`` is rewritten atomically with the
whole history on every record, so it never holds a torn line or an epoch twice.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from relkd import distributed as D
from relkd._fs import atomic_write_text

METRICS = "metrics.jsonl"


_TB_WARNED = False


def warn_no_tensorboard() -> None:
    """TensorBoard curves are on by default (``train.tensorboard``): say so once when the
    package is missing instead of silently writing no ``tb/`` folder."""
    global _TB_WARNED
    if _TB_WARNED or importlib.util.find_spec("tensorboard") is not None:
        return
    _TB_WARNED = True
    warnings.warn(
        "train.tensorboard is on but the tensorboard package is not installed: no TensorBoard "
        "curves (tb/) will be written; metrics.jsonl is. `pip install tensorboard`, or set "
        "train.tensorboard=false to silence this",
        stacklevel=2,
    )


class RunLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.quiet = quiet
        self.main = D.is_main()
        self.tensorboard = tensorboard
        self.history: list[dict[str, Any]] = []
        self._tb: Any = None
        self._tb_tried = False
        self._resumed_after: int | None = None  # last epoch of the history resumed from

    def info(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def _writer(self):
        if not self._tb_tried and self.main and self.tensorboard:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                # On resume, purge_step makes TensorBoard drop the earlier session's events
                # from the epoch the run continues at (the killed session may have logged
                # epochs past its last checkpoint): each epoch shows once, as metrics.jsonl.
                purge = self._resumed_after + 1 if self._resumed_after is not None else None
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
        return self._tb

    def set_history(self, records: list[dict[str, Any]]) -> None:
        """``metrics.jsonl`` := exactly ``records`` (the checkpoint's history on resume)."""
        self.history = [dict(r) for r in records]
        done = [int(r.get("epoch", 0)) for r in records]
        self._resumed_after = max(done) if done else None
        if self.main:
            self._write()

    def _write(self) -> None:
        atomic_write_text(
            self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.history)
        )

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.history.append(dict(record))
        self._write()
        tb = self._writer()
        if tb is not None:
            step = record.get("epoch", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    tb.add_scalar(k, v, step)
            tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
