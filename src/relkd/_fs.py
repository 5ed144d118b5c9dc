"""File-system helpers shared by the run folder, the model files and the teacher-output caches:
atomic writes (a file holds the old or the new bytes, never a part) and the clean-up of what a
killed writer left. A leaf module: it imports nothing of relkd."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

# Temporary names: ours (``.<name>.<pid>.tmp``), relkd 0.1's (``.<name>.tmp<pid>``) and
# save_student's old ``<name>.tmp``; only ever removed by the process holding the run's lock.
TMP_RE = re.compile(r"^(\..+\.\d+\.tmp|\..+\.tmp\d+|.+\.tmp)$")


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


def write_fsync(path: Path, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` goes through (same folder, hidden)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old or the new bytes, never
    a part: a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.
    The file mode follows the umask, like ``open(path, "w")``. A temporary file is removed when
    the write fails or is interrupted (a SIGKILL leaves it for :func:`remove_temp_files`)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        write_fsync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def remove_temp_files(folder: Path) -> list[str]:
    """Delete temporary files that killed atomic writes left in ``folder``; their names."""
    gone = []
    if not folder.is_dir():
        return gone
    for p in folder.iterdir():
        if p.is_file() and TMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return sorted(gone)
