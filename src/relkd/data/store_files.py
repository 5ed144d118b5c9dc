"""File helpers of the stored teacher outputs, shared by the teacher cache
(:mod:`relkd.data.teacher_cache`) and the replay store (:mod:`relkd.data.replay`).

sha256 checksums of the stored files and their check on open (:func:`file_sha256`,
:func:`verify_files`); before writing through a memory map, a free-space check and the files'
blocks reserved up front (:func:`check_free_space`, :func:`reserve_file`), so a full disk ends in
one line naming the folder instead of a SIGBUS; and the no-read-ahead advice for memory maps
read in random row order (:func:`_advise_random`). These names stay importable from
:mod:`relkd.data.teacher_cache`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from relkd.registry import RelkdError


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 16 MiB blocks; ~1 s per GB on one core)."""
    from relkd._fs import open_regular

    h = hashlib.sha256()
    with open_regular(path, "store", "stored file") as f:  # never a FIFO or a device
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def check_free_space(folder: Path, nbytes: int, what: str) -> None:
    """RelkdError (one line naming ``folder`` and the bytes needed) when the file system holding
    ``folder`` has less than ``nbytes`` free: a memory map on a full disk ends in SIGBUS, not in
    a message."""
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise RelkdError(
            f"{what}: not enough disk space in {folder}: needs {nbytes} bytes "
            f"({nbytes / 2**20:.1f} MiB), {free} bytes free. Free space or point the cache "
            "elsewhere (RELKD_CACHE_DIR or a folder path)"
        )


#: Room kept for a store's small files beyond its arrays (the manifest of a teacher cache is
#: ~2 KiB, a replay epoch's checksums.json ~0.3 KiB): a free-space check that counted only the
#: arrays passed with exactly their bytes free, and the manifest write then hit the full disk.
SMALL_FILES_ROOM = 64 << 10

_DISK_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM") if hasattr(errno, n)
)


@contextlib.contextmanager
def writing(folder: Path, what: str) -> Iterator[None]:
    """Turn a full, read-only or forbidden disk met while writing a store under ``folder`` into
    one line naming the folder (a RelkdError), instead of an ``OSError`` traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        where = e.filename if e.filename is not None else folder
        raise RelkdError(
            f"{what}: cannot write in {folder} ({e.strerror}: {where}). Free space, make it "
            "writable, or point the cache elsewhere (RELKD_CACHE_DIR or a folder path)"
        ) from None


def reserve_file(path: Path, folder: Path, what: str) -> None:
    """Allocate the blocks of the (sparse) file ``path`` now, so that writing through a memory
    map cannot hit a full disk later (SIGBUS). No-op where ``posix_fallocate`` is missing."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not POSIX
        return
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise RelkdError(
            f"{what}: not enough disk space in {folder}: needs {size} bytes for {path.name} "
            f"({e.strerror})"
        ) from e
    finally:
        os.close(fd)


def verify_files(folder: Path, checksums: dict[str, str], what: str) -> None:
    """Check every ``name -> sha256`` of ``checksums`` against the file in ``folder``; a
    missing, truncated or altered file is a RelkdError naming it."""
    for name, digest in sorted(checksums.items()):
        f = folder / name
        if not f.is_file():
            raise RelkdError(f"{what} {str(folder)!r} is damaged: {name} is missing")
        if file_sha256(f) != digest:
            raise RelkdError(
                f"{what} {str(folder)!r} is damaged: {name} does not match its checksum "
                "(altered or truncated). Delete the folder to rebuild it"
            )


def _advise_random(arr: np.ndarray) -> None:
    """Tell the kernel that rows of the memory map are read in random order: no read-ahead.

    A batch reads B scattered rows; with the default read-ahead each cold row pulls in ~128 KiB
    of neighbours nobody asked for. Measured on the dev VM with the page cache dropped: 74 ms ->
    8.7 ms per cold batch lookup. A no-op where madvise is missing."""
    import mmap

    m = getattr(arr, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    advice = getattr(mmap, "MADV_RANDOM", None)
    if m is not None and advice is not None and hasattr(m, "madvise"):
        with contextlib.suppress(OSError, ValueError):
            m.madvise(advice)
