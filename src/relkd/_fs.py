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


def read_json_or_none(path: str | os.PathLike[str]) -> Any:
    """A JSON file's value (a bounded read), or None when it is missing or unreadable."""
    try:
        return json.loads(read_text(path, "json"))
    except (OSError, ValueError):
        return None


def read_yaml_or_none(path: str | os.PathLike[str]) -> Any:
    """A YAML file's value (:func:`relkd._yaml.strict_load`, a bounded read), or None when
    unreadable."""
    import yaml

    from relkd._yaml import strict_load

    try:
        return strict_load(read_text(path, "config"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def count_nonblank_lines(path: str | os.PathLike[str]) -> int:
    """Non-blank lines of a text file such as ``metrics.jsonl``; 0 when unreadable."""
    try:
        return sum(1 for line in read_text(path, "metrics").splitlines() if line.strip())
    except (OSError, ValueError):
        return 0


def first_odd_file(folder: Path, names: list[str]) -> tuple[str, str] | None:
    """``(name, what it is)`` of the first of ``names`` in ``folder`` that exists but is not a
    regular file (a folder, a link to nothing, a FIFO or a device), else None."""
    for name in names:
        f = Path(folder) / name
        if os.path.lexists(f) and not f.is_file():
            kind = "a folder" if f.is_dir() else "a special file" if f.exists() else "a dead link"
            return name, kind
    return None


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
    atomic_write_bytes(
        path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode()
    )


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


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (bytes) the file system of ``folder`` allows (its nearest existing
    ancestor's ``NAME_MAX``), else 255, the usual value."""
    p = Path(folder).expanduser().absolute()
    while p != p.parent:
        try:
            if p.exists():
                break
        except OSError:  # e.g. the name is too long: look at its parent
            pass
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no limit known
        return 255


def long_name_part(path: str, base: str | os.PathLike[str]) -> str | None:
    """What is wrong with a relative folder path ``path`` to be created under ``base`` when a
    part of it is longer than the file system allows (``mkdir`` would fail with "File name too
    long" after the checks): a short description, or None when every part fits."""
    limit = name_max(base)
    for part in re.split(r"[/\\]" if os.sep == "\\" else "/", path):
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-8:]}"
            return (
                f"its part {shown!r} is {size} bytes long, more than the {limit} bytes a file "
                "name may have on this file system (NAME_MAX)"
            )
    return None


def short_text(text: str) -> str:
    """``text``, or its start and end around ``...`` when longer than 60 characters."""
    return text if len(text) <= 60 else f"{text[:30]}...{text[-20:]}"


def make_dirs(path: Path, created: list[Path]) -> None:
    """``mkdir -p path``, appending each folder it makes to ``created`` (outermost first); on
    failure the ones made are removed again (:func:`remove_empty_dirs`) and the error raised."""
    missing, p = [], path.absolute()
    while p != p.parent:
        try:
            if p.exists():
                break
        except OSError:  # e.g. a name too long: its mkdir reports it
            pass
        missing.append(p)
        p = p.parent
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by another process: not ours to remove
                if not folder.is_dir():
                    raise
                continue
            created.append(folder)
    except OSError:
        remove_empty_dirs(created)
        del created[:]
        raise


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the folders ``created`` (outermost first), deepest first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written) or gone: keep it and its parents
            break
