"""File-system helpers shared by the run folder and the teacher-output caches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


# ------------------------------------------------------------------------- bounded reads
MiB = 1 << 20
GiB = 1 << 30
#: The most bytes relkd reads from a file of each kind: far above anything relkd writes (a
#: config is a few KiB, a metrics line about 1 KiB per epoch, a checkpoint the model plus its
#: optimizer state), far below what would exhaust a machine's memory. A file above its bound is
#: refused in one line instead of being read.
LIMITS: dict[str, int] = {
    "config": 16 * MiB,  # config.yaml, a suite file
    "json": 64 * MiB,  # run.json, summary.json, bench.json, manifests, checksum lists
    "metrics": 1 * GiB,  # metrics.jsonl
    "checkpoint": 64 * GiB,  # checkpoint.pt, student.pt, teacher weights
    "store": 1 << 40,  # an array of a teacher cache or replay epoch (read in blocks)
}


class UnreadableFile(OSError):
    """A file relkd refuses to read: not a regular file (a FIFO, a device such as /dev/zero, a
    folder), or larger than the bound of its kind. An ``OSError``, so every reader that already
    treats an unreadable file as missing or damaged does so for these too; ``str()`` is one
    line naming the file."""

    def __str__(self) -> str:
        return str(self.args[0])


def open_regular(path: str | os.PathLike[str], kind: str, what: str = "file") -> Any:
    """``open(path, 'rb')`` for a regular file within ``LIMITS[kind]`` bytes, else
    :class:`UnreadableFile`. Opened without blocking (a FIFO would wait for a writer forever)
    and checked on the open descriptor, so what is read is what was checked."""
    import stat

    limit = LIMITS[kind]
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{what} {str(path)!r} is not a regular file; refusing to read it")
        if st.st_size > limit:
            raise UnreadableFile(
                f"{what} {str(path)!r} is {st.st_size} bytes, more than the {limit} bytes a "
                f"{kind} file may have; refusing to read it"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


def read_bytes(path: str | os.PathLike[str], kind: str, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``LIMITS[kind]`` bytes (see :func:`open_regular`;
    a file that grew since the check is read up to the bound only, and refused)."""
    limit = LIMITS[kind]
    chunks, total = [], 0
    with open_regular(path, kind, what) as f:
        size = os.fstat(f.fileno()).st_size
        while total <= limit:  # the size known, plus whatever was appended since
            chunk = f.read(min(max(size - total, 1 << 16), limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    data = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    if len(data) > limit:
        raise UnreadableFile(f"{what} {str(path)!r} grew past {limit} bytes while being read")
    return data


def read_text(path: str | os.PathLike[str], kind: str, what: str = "file") -> str:
    """:func:`read_bytes` decoded as UTF-8; undecodable bytes raise ``UnicodeDecodeError``, a
    ``ValueError`` (as ``json.loads`` of such bytes would)."""
    return read_bytes(path, kind, what).decode("utf-8")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: ``json.dumps`` would
    write ``NaN`` / ``Infinity``, which is not JSON (other readers refuse it). A diverged run's
    ``test_loss`` is written as ``null``."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
