"""Progress display for every long loop of relkd: a tqdm bar on a terminal, plain lines elsewhere.

Where stderr is not a terminal (a Slurm ``.out`` file, a pipe, CI logs), a bar's carriage-return
redraws pile up in the file (hundreds per epoch). There :func:`progress` prints plain lines
instead: nothing for a loop shorter than ``RELKD_PROGRESS_MIN_S`` (default 10 s), otherwise
one line at each quarter it passes, and at least every 5 minutes, each with the count, the rate
and the time left (``epoch 3/240: 1200/3125 (38%), 85.2 it/s, ETA 23 s, loss=1.234``).
``RELKD_PROGRESS=bar`` / ``lines`` forces either form.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def use_lines(stream: TextIO | None = None) -> bool:
    """True where progress should be printed as plain lines (``stream``, default stderr, is no
    terminal), unless ``RELKD_PROGRESS`` says ``bar`` or ``lines``."""
    force = os.environ.get("RELKD_PROGRESS", "").strip().lower()
    if force in ("bar", "lines"):
        return force == "lines"
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 100 * 60:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_eta(seconds: float) -> str:
    """``ETA 45 s`` / ``ETA 12 min`` / ``ETA 3.4 h``."""
    return f"ETA {_duration(max(0.0, seconds))}"


class LineProgress:
    """tqdm's small interface (iterate, ``update``, ``set_postfix``, ``close``) printing plain
    lines: at each quarter of ``total`` passed once ``min_s`` seconds have gone, and whenever
    ``max_gap_s`` seconds passed since the last line."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        stream: TextIO | None = None,
        min_s: float | None = None,
        max_gap_s: float = 300.0,
        clock=time.monotonic,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream = stream
        env_min = os.environ.get("RELKD_PROGRESS_MIN_S")
        self.min_s = float(env_min) if min_s is None and env_min else (min_s or 10.0)
        if min_s == 0:
            self.min_s = 0.0
        self.max_gap_s, self.clock = max_gap_s, clock
        self.n, self.postfix = 0, ""
        self.t0 = self.last = clock()
        self.next_quarter = 1
        self.lines = 0

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        elapsed = now - self.t0
        due = False
        if self.total:
            while self.next_quarter < 4 and self.n >= self.next_quarter * self.total / 4:
                self.next_quarter += 1
                due = due or elapsed >= self.min_s
        if now - self.last >= self.max_gap_s and (not self.total or self.n < self.total):
            due = True
        if due:
            self._print(now, elapsed)

    def line(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self, now: float, elapsed: float) -> None:
        self.last = now
        self.lines += 1
        print(self.line(elapsed), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Off:
    """A disabled display: iterates and ignores updates."""

    def __init__(self, iterable: Iterable[Any] | None = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    **tqdm_kw: Any,
) -> Any:
    """A progress display over ``iterable`` (or for ``total`` manual ``update`` s): tqdm on a
    terminal, :class:`LineProgress` elsewhere, nothing with ``disable``."""
    if disable:
        return _Off(iterable)
    if use_lines():
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_kw)
