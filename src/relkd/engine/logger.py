"""Run-folder outputs: JSONL metrics, optional TensorBoard, messages. Only rank 0 writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from relkd import distributed as D


class RunLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.quiet = quiet
        self.main = D.is_main()
        self._tb = None
        if self.main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    def info(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("epoch", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
