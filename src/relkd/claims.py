"""Claims that hold on shared file systems: who may write a run folder, build a teacher cache,
or store a replay epoch, when the workers run on several machines.

An OS file lock (``flock`` / ``fcntl``) is not an exclusion between machines on the file systems
clusters share (NFS with ``local_lock``, Lustre without ``-o flock``, GPFS), so relkd does not use
one for any of these. A claim is instead a small file, created only if it does not exist, and kept
alive by its holder. The protocol (``docs/distributed.md``, "Claims on shared file systems"):

- **Create**: the record (host, pid, process start, wall-clock start, a random 128-bit token) is
  written and fsynced to a uniquely named file, then hard-linked to the claim's name: ``link``
  fails when the name exists, on NFS (v2 on), Lustre and GPFS alike, and the claim appears with
  its whole content. A lost NFS reply is recognised by the link count. Where hard links are not
  supported, ``O_CREAT | O_EXCL`` is used (atomic on NFSv3+ too).
- **Heartbeat**: a daemon thread rewrites the record's fixed-width beat counter in place, through
  the descriptor of the file it created, and fsyncs, every ``stale_s / 6`` seconds. Writing
  through the descriptor touches the holder's own file even after someone renamed it away.
- **Staleness** (:data:`STALE_ENV`, default :data:`DEFAULT_STALE_S` seconds): a claim may be
  taken over when (a) its holder is a process of this host that no longer exists (pid gone, or
  reused: its start time differs), or (b) this process has seen the claim file unchanged (same
  bytes, inode, size and mtime) for ``stale_s`` on its own monotonic clock (no clock is compared
  across machines), or (c) on first sight, the claim's mtime is ``stale_s`` older than the mtime
  the file system gives a file created now beside it (the file system's clock against itself;
  on NFS the server sets both; on Lustre / GPFS the clients do, so their clocks must agree to
  well within ``stale_s``, as NTP keeps them).
- **Takeover**: the taker renames the claim to a unique name (one rename of a given file
  succeeds), reads it back and compares it with the bytes it judged stale. Equal: it deletes it
  and creates its own claim (an exclusive create again, so two takers cannot both win).
  Different (a beat landed, or it renamed a newer claim): it links the file back and backs off.
- **Fencing**: before each write (checkpoint, metrics line, summary, cache commit) the holder
  calls :meth:`Claim.check`: it beats through its descriptor, then reads the claim's name back;
  if the token there is not its own it raises :class:`ClaimLost` and writes nothing. A taker
  judges staleness only after ``stale_s`` without a beat, so a write that completes within
  ``stale_s`` of its check cannot overlap a new holder. A process paused *during* a write for
  longer than that can still overlap (no file system enforces tokens); documented, not solved.

Claims are re-entrant per process through :func:`held`: the grid runner claims a run folder and
``relkd.train`` in the same process uses that claim instead of taking a second one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relkd.registry import RelkdError

STALE_ENV = "RELKD_CLAIM_STALE_S"
#: The claim file of a run folder (the grid runner and ``relkd.train`` share it).
RUN_CLAIM = ".relkd.claim"
#: Seconds without a heartbeat after which a claim may be taken over (:data:`STALE_ENV`).
DEFAULT_STALE_S = 300.0
_BEAT_WIDTH = 20


class ClaimLost(RelkdError):
    """This process's claim was taken over by another worker; it must stop without writing."""


def stale_seconds() -> float:
    """The staleness timeout: ``$RELKD_CLAIM_STALE_S`` seconds, else :data:`DEFAULT_STALE_S`."""
    raw = os.environ.get(STALE_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_STALE_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0 or v != v or v == float("inf"):
        raise RelkdError(f"{STALE_ENV}={raw!r} is not a positive number of seconds (default 300)")
    return v


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _host() -> str:
    return socket.gethostname()


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record of the claim at ``path`` (host, pid, start, token, what, beat), or None
    when there is no claim or it cannot be parsed (e.g. mid-creation without hard links)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return _parse(data)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        head, beat = data.split(b"\n")[:2]
        rec = json.loads(head)
        if not isinstance(rec, dict) or "token" not in rec:
            return None
        rec["beat"] = int(beat.split()[1])
        return rec
    except (ValueError, IndexError):
        return None


# What this process has seen of other processes' claims: path -> (state, first seen, probed).
_seen: dict[str, tuple[tuple[Any, ...], float, str | None]] = {}
# Claims this process holds, by path (re-entrancy: see held()).
_held: dict[str, Claim] = {}
_registry_lock = threading.Lock()


def held(path: str | os.PathLike) -> Claim | None:
    """The live claim this process holds on ``path``, or None."""
    with _registry_lock:
        c = _held.get(os.path.abspath(path))
    return c if c is not None and c.holds() else None


class Claim:
    """A claim on ``path`` (a file name; its folder must exist or be creatable).

    Use ``claim.try_acquire()`` (False while another live worker holds it) or
    ``claim.acquire()`` (waits), ``claim.check(what)`` before every write, ``claim.release()``.
    ``what`` names the claimed thing in messages (``run folder X``).
    """

    def __init__(
        self, path: str | os.PathLike, what: str = "", stale_s: float | None = None
    ) -> None:
        self.path = Path(os.path.abspath(path))
        self.what = what or str(self.path)
        self.stale_s = float(stale_s) if stale_s is not None else stale_seconds()
        self.token: str | None = None
        self.took_over: str | None = None  # why the previous claim was judged stale
        self._fd: int | None = None
        self._header = b""
        self._beat_n = 0
        self._beat_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # -------------------------------------------------------------------------- acquiring
    def try_acquire(self) -> bool:
        """Create the claim, or take over a stale one; False if a live worker holds it."""
        if self._fd is not None:
            raise RuntimeError(f"claim {self.path} is already held by this object")
        self.took_over = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._started()
                return True
            try:
                data = self.path.read_bytes()
                st = os.stat(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            why = self._stale(data, st)
            if why is None:
                return False
            if self._take_over(data):
                self.took_over = why
                self._started()
                return True
        return False

    def acquire(
        self,
        poll_s: float | None = None,
        on_wait: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> None:
        """Wait until the claim is ours (polling; a stale claim is taken over). ``on_wait`` is
        called once, with the holder's record, when the first attempt fails."""
        poll = poll_s if poll_s is not None else min(2.0, self.stale_s / 4)
        told = False
        while not self.try_acquire():
            if not told and on_wait is not None:
                on_wait(read_record(self.path))
            told = True
            time.sleep(poll)

    def _record(self) -> bytes:
        rec = {
            "relkd_claim": 1,
            "what": self.what,
            "host": _host(),
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "start": time.time(),
            "stale_s": self.stale_s,
            "token": self.token,
        }
        return json.dumps(rec, sort_keys=True).encode() + b"\n"

    def _beat_line(self) -> bytes:
        return f"beat {self._beat_n:0{_BEAT_WIDTH}d}\n".encode()

    def _create(self) -> bool:
        """One exclusive create of the claim file; True if it is now ours."""
        self.token = secrets.token_hex(16)
        self._header = self._record()
        self._beat_n = 0
        data = self._header + self._beat_line()
        tmp = self.path.with_name(f"{self.path.name}.new-{self.token[:16]}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        no_links = False
        try:
            os.write(fd, data)
            os.fsync(fd)
            try:
                os.link(tmp, self.path)
                won = True
            except FileExistsError:
                won = os.fstat(fd).st_nlink == 2  # NFS: the link was made, its reply lost
            except OSError:  # no hard links on this file system
                won, no_links = False, True
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(tmp)
        if not won:
            os.close(fd)
            self.token = None
            return self._create_excl(data) if no_links else False
        self._fd = fd
        return True

    def _create_excl(self, data: bytes) -> bool:
        """Exclusive create of the name itself (readers may see it half written: an unparsable
        record is never judged by its pid, only by its age and by watching it)."""
        self.token = _parse(data)["token"]  # type: ignore[index]
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self.token = None
            return False
        os.write(fd, data)
        os.fsync(fd)
        self._fd = fd
        return True

    def _stale(self, data: bytes, st: os.stat_result) -> str | None:
        """Why the claim with bytes ``data`` may be taken over, or None while it is live."""
        rec = _parse(data)
        key = str(self.path)
        try:
            pid = int(rec["pid"]) if rec is not None and rec.get("host") == _host() else 0
        except (KeyError, TypeError, ValueError):
            pid = 0
        if pid > 0:
            if pid == os.getpid():
                mine = held(self.path)
                if mine is None or mine.token != rec["token"]:
                    return "its holder (this process) no longer holds it"
            else:
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                except OSError:
                    alive = True  # EPERM: it exists
                if not alive:
                    return f"its holder (pid {pid} on this host) is gone"
                if rec.get("proc_start") and _proc_start(pid) not in (None, rec["proc_start"]):
                    return f"its holder (pid {pid} on this host) is gone (pid reused)"
        state = (st.st_ino, st.st_size, st.st_mtime_ns, data)
        now = time.monotonic()
        seen = _seen.get(key)
        token = rec.get("token") if rec else None
        if seen is not None and seen[0] == state:
            if now - seen[1] >= self.stale_s:
                return f"it was not refreshed for {now - seen[1]:.0f} s (stale after {self.stale_s:g} s)"
            return None
        probed = seen[2] if seen is not None else None
        _seen[key] = (state, now, token)
        if token is not None and probed == token:
            return None  # a beat: the holder is alive
        age = self._fs_age(st)
        if age is not None and age >= self.stale_s:
            return f"its last refresh is {age:.0f} s old by the file system's clock"
        return None

    def _fs_age(self, st: os.stat_result) -> float | None:
        """Seconds between the claim's mtime and that of a file created now in its folder."""
        probe = self.path.with_name(f"{self.path.name}.clock-{uuid.uuid4().hex[:16]}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"t")
                os.fsync(fd)
                now_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError:
            return None
        return (now_ns - st.st_mtime_ns) / 1e9

    def _take_over(self, judged: bytes) -> bool:
        """Rename the stale claim away, check it is the one judged stale, create ours."""
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(8)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()  # another taker (or its release) was first
        try:
            got = aside.read_bytes()
        except OSError:
            got = None
        if got != judged:
            # It was refreshed after we judged it, or a newer claim took its place: put it
            # back (link: never over a claim created meanwhile) and leave it alone.
            with contextlib.suppress(OSError):  # someone claimed in between: aside one is fenced
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        _seen.pop(str(self.path), None)
        return self._create()

    def _started(self) -> None:
        self._lost = None
        self._stop.clear()
        with _registry_lock:
            _held[str(self.path)] = self
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"relkd-claim-{self.path.name}", daemon=True
        )
        self._thread.start()

    # -------------------------------------------------------------------------- holding
    def holds(self) -> bool:
        return self._fd is not None and self._lost is None

    def _beat(self) -> None:
        with self._beat_lock:
            if self._fd is None:
                return
            self._beat_n += 1
            os.pwrite(self._fd, self._beat_line(), len(self._header))
            os.fsync(self._fd)

    def _owner_token(self) -> str | None:
        rec = read_record(self.path)
        return rec.get("token") if rec else None

    def _heartbeat(self) -> None:
        interval = self.stale_s / 6
        while not self._stop.wait(interval):
            try:
                self._beat()
            except OSError:
                continue  # transient (server hiccup); check() decides before any write
            if self._owner_token() != self.token and self._confirm_lost():
                return

    def _confirm_lost(self) -> bool:
        """The claim's name does not hold our token: look again once (a taker that moved it
        aside by mistake puts it back within moments) and record the loss."""
        time.sleep(min(0.2, self.stale_s / 10))
        if self._owner_token() == self.token:
            return False
        rec = read_record(self.path)
        if rec is None:
            who = "another process took it over (and has released it since)"
        else:
            who = f"it was taken over by pid {rec.get('pid')} on {rec.get('host')}"
        self._lost = (
            f"this process (pid {os.getpid()} on {_host()}) lost its claim on {self.what}: {who} "
            f"after no heartbeat for over {self.stale_s:g} s ({STALE_ENV}; was the process "
            "paused or its node cut off?)"
        )
        return True

    def check(self, action: str = "writing") -> None:
        """Fence: raise :class:`ClaimLost` unless the claim is still ours. Call right before a
        write; a write that completes within ``stale_s`` of this check cannot overlap another
        holder's."""
        if self._fd is None:
            raise RuntimeError(f"claim {self.path} is not held")
        if self._lost is None:
            with contextlib.suppress(OSError):  # the read below decides
                self._beat()
            if self._owner_token() != self.token:
                self._confirm_lost()
        if self._lost is not None:
            raise ClaimLost(f"{self._lost}; stopping before {action}")

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours (never another's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        with _registry_lock:
            if _held.get(str(self.path)) is self:
                del _held[str(self.path)]
        with self._beat_lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._lost is None and self._owner_token() == self.token:
                aside = self.path.with_name(f"{self.path.name}.done-{secrets.token_hex(8)}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    return
                if (_parse(aside.read_bytes()) or {}).get("token") != self.token:
                    with contextlib.suppress(OSError):  # not ours after all: put it back
                        os.link(aside, self.path)
                os.unlink(aside)
        finally:
            os.close(fd)
            self.token = None

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({str(self.path)!r}, held={self.holds()})"


def claim_now(path: str | os.PathLike, what: str, busy: str) -> tuple[Claim, bool]:
    """``(claim, acquired_here)``: this process's live claim on ``path`` if it holds one (then
    not this caller's to release), else a new claim acquired without waiting (a stale one is
    taken over). A live holder elsewhere is a :class:`RelkdError` with the message ``busy``,
    whose ``{holder}`` becomes `` (pid P on HOST since T)``."""
    mine = held(path)
    if mine is not None:
        return mine, False
    claim = Claim(path, what=what)
    try:
        got = claim.try_acquire()
    except OSError as e:
        raise RelkdError(f"cannot claim {what}: {e}") from e
    if not got:
        raise RelkdError(busy.format(holder=describe(read_record(claim.path))))
    return claim, True


def describe(rec: dict[str, Any] | None) -> str:
    """`` (pid P on HOST since T)`` for a holder record; empty when unknown."""
    if not rec:
        return ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("start", 0))))
    return f" (pid {rec.get('pid')} on {rec.get('host')} since {since})"
