"""Crash-safe checkpoints: atomic files, a checksum manifest, the previous checkpoint as fallback.

Files in a run folder::

    checkpoint.pt        the newest state (``torch.save``; loads with ``weights_only=True``)
    checkpoint.prev.pt   the state before it (the fallback)
    checkpoint.json      manifest: the sha256 of every checkpoint file that may be present

A file is *verified* when its sha256 is listed in the manifest, whatever its name. That is what
makes the rotation safe at every instruction: a save (1) adds the new file's hash to the manifest,
(2) writes the new file to a temporary name and fsyncs it, (3) renames ``checkpoint.pt`` to
``checkpoint.prev.pt`` (only when ``checkpoint.pt`` is known good), (4) renames the temporary file
to ``checkpoint.pt``, (5) writes the manifest of the two files now present. A kill after any one
of these leaves every present checkpoint file complete and listed, so resuming finds the newest
finished save or the one before it (tests/engine/test_reliability.py kills a subprocess after
each file operation). Checksums in ``checkpoint.pt.sha256`` sidecars (relkd 0.1's layout) are
still read; a checkpoint with no checksum at all loads with a warning that it is unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from relkd._fs import (
    atomic_write_json,
    tmp_name,
    write_fsync,
)
from relkd._fs import (
    fsync_dir as _fsync_dir,
)
from relkd.registry import RelkdError

CKPT = "checkpoint.pt"
PREV = "checkpoint.prev.pt"
MANIFEST = "checkpoint.json"
_LEGACY_SIDECARS = (CKPT + ".sha256", PREV + ".sha256")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The checkpoints of one run folder (written by one process: the run folder's lock holder).

    It remembers which of ``checkpoint.pt`` / ``checkpoint.prev.pt`` it knows to be good (written
    by it, or loaded and verified), so a save after a fallback never rotates the known-corrupt
    ``checkpoint.pt`` over the good previous one.
    """

    def __init__(self, run_dir: str | os.PathLike, log=print) -> None:
        self.run_dir = Path(run_dir)
        self.log = log
        self._good: dict[str, str] = {}  # file name -> sha256 of its known-good content
        self._info: dict[str, dict[str, Any]] = {}  # sha256 -> epoch / step (manifest entries)
        self.loaded_from: Path | None = None

    # ---------------------------------------------------------------------------- reading
    def _known_hashes(self) -> set[str] | None:
        """Every hash the manifest (or relkd 0.1's sidecars) lists; None: no checksum at all."""
        found: set[str] | None = None
        m = self.run_dir / MANIFEST
        if m.exists():
            try:
                found = set(json.loads(m.read_text())["files"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log(f"warning: checkpoint manifest {str(m)!r} cannot be read ({e})")
                found = set()
        for name in _LEGACY_SIDECARS:
            p = self.run_dir / name
            if p.exists():
                try:
                    h = p.read_text().strip()
                except OSError:
                    continue
                found = (found or set()) | {h}
        return found

    def exists(self) -> bool:
        return (self.run_dir / CKPT).exists() or (self.run_dir / PREV).exists()

    def _load_one(self, path: Path, known: set[str] | None) -> dict[str, Any]:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RelkdError(f"checkpoint {str(path)!r} cannot be read: {e}") from e
        h = _sha256(data)
        if known is not None and h not in known:
            raise RelkdError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch)")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RelkdError(f"checkpoint {str(path)!r} cannot be read: {load_error(e)}") from e
        if not isinstance(state, dict) or not {"distiller", "epoch", "step"} <= set(state):
            raise RelkdError(f"checkpoint {str(path)!r} is not a relkd training checkpoint")
        if known is None:
            self.log(
                f"warning: checkpoint {str(path)!r} has no checksum ({MANIFEST} is missing): "
                "loaded unverified"
            )
        self._good = {path.name: h}
        self._info = {h: {"epoch": state.get("epoch"), "step": state.get("step")}}
        self.loaded_from = path
        return state

    def load_latest(self) -> dict[str, Any] | None:
        """The newest readable verified checkpoint (falling back to the previous one), or None
        when there is none. Raises RelkdError when checkpoints exist but none is readable."""
        known = self._known_hashes()
        errors = []
        ckpt, prev = self.run_dir / CKPT, self.run_dir / PREV
        if not ckpt.exists() and prev.exists():
            self.log(f"note: {CKPT} is missing (a save was interrupted); using {PREV}")
        for p in (ckpt, prev):
            if not p.exists():
                continue
            try:
                return self._load_one(p, known)
            except RelkdError as e:
                errors.append(str(e))
                if p is ckpt and prev.exists():
                    self.log(f"warning: {e}; trying the previous checkpoint")
        self._good = {}
        if errors:
            raise RelkdError("no readable checkpoint: " + "; ".join(errors))
        return None

    # ---------------------------------------------------------------------------- writing
    def _write_manifest(self, hashes: list[str], completed: bool) -> None:
        files = {h: self._info.get(h, {}) for h in hashes}
        atomic_write_json(self.run_dir / MANIFEST, {"completed": completed, "files": files})

    def _manifest_entries(self) -> dict[str, dict[str, Any]]:
        try:
            files = json.loads((self.run_dir / MANIFEST).read_text())["files"]
            return {str(k): dict(v) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def completed_before(self) -> bool:
        """Whether a save ever completed in this folder (the manifest says so)."""
        try:
            return bool(json.loads((self.run_dir / MANIFEST).read_text()).get("completed"))
        except (OSError, ValueError, AttributeError):
            return False

    def save(self, state: dict[str, Any]) -> Path:
        """Serialise ``state`` as ``checkpoint.pt``; a known-good ``checkpoint.pt`` becomes
        ``checkpoint.prev.pt``. Safe against a kill at every step (see the module docstring)."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        h = _sha256(data)
        self._info[h] = {"epoch": state.get("epoch"), "step": state.get("step")}
        ckpt, prev = self.run_dir / CKPT, self.run_dir / PREV
        completed = self.completed_before()
        old = self._manifest_entries()
        self._info = {**old, **self._info}
        # (1) the new hash is listed before its file exists (the old ones stay listed)
        self._write_manifest(list(dict.fromkeys([*old, *self._good.values(), h])), completed)
        tmp = tmp_name(ckpt)
        try:  # (2) complete and fsynced under a temporary name
            write_fsync(tmp, data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        good = dict(self._good)
        if (
            CKPT in good and ckpt.exists()
        ):  # (3) only a known-good checkpoint.pt becomes the fallback
            os.replace(ckpt, prev)
            good = {PREV: good[CKPT]}
        elif ckpt.exists():  # corrupt or unverifiable: replaced, the good fallback stays
            self.log(f"note: replacing the unusable {CKPT}; {PREV} stays the fallback")
        os.replace(tmp, ckpt)  # (4)
        _fsync_dir(self.run_dir)
        good[CKPT] = h
        self._good = good
        self._write_manifest(list(good.values()), True)  # (5) exactly the files present
        for name in _LEGACY_SIDECARS:  # superseded by the manifest
            (self.run_dir / name).unlink(missing_ok=True)
        return ckpt


def load_error(e: BaseException) -> str:
    """One line for a failed ``torch.load``: never empty, and never torch's advice to retry
    with ``weights_only=False`` (that would run whatever code the file carries)."""
    msg = str(e).strip()
    if "Weights only load failed" in msg or isinstance(e, pickle.UnpicklingError):
        m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        what = f" ({m.group(1)})" if m else ""
        return (
            f"it holds objects other than tensors and plain containers{what}; relkd loads "
            "weights only and refuses it"
        )
    if isinstance(e, EOFError) or not msg:
        return f"the file is empty or truncated ({type(e).__name__})"
    first = msg.splitlines()[0]
    if "central directory" in first or "zip archive" in first:
        return "the file is truncated or not a torch checkpoint (no zip central directory)"
    return f"{type(e).__name__}: {first}"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """One-shot :meth:`CheckpointStore.save` for a folder this process has not loaded from:
    the files present count as good when their checksums verify."""
    store = CheckpointStore(run_dir, log=lambda m: None)
    known = store._known_hashes() or set()
    for name in (CKPT, PREV):
        p = Path(run_dir) / name
        h = _sha256(p.read_bytes()) if p.exists() else None
        if h in known:
            store._good[name] = h
    return store.save(state)


def load_latest(run_dir: Path, log=print) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``run_dir`` (falls back to the previous one), or None."""
    return CheckpointStore(run_dir, log=log).load_latest()
