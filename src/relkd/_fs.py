"""File-system helpers shared by the run folder and the teacher-output caches."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_dead_temp_dirs(parent: Path, prefix: str) -> list[str]:
    """Remove the folders ``parent/<prefix><PID>...`` whose process PID no longer runs here;
    returns their names. For temporary folders named after their writer's pid: one left by a
    SIGKILLed or OOM-killed writer (it cannot clean up; a teacher cache's can be GiBs) goes,
    one whose pid is alive stays (a live writer, or another machine's pid that exists here)."""
    gone = []
    for d in sorted(Path(parent).glob(f"{prefix}*")):
        digits = d.name[len(prefix) :].split("-", 1)[0].split("_", 1)[0]
        if not d.is_dir() or not digits.isdigit():
            continue
        try:
            os.kill(int(digits), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except OSError:  # EPERM: alive, someone else's
            continue
        import shutil

        shutil.rmtree(d, ignore_errors=True)
        gone.append(d.name)
    return gone
