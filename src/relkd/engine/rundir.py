"""The run folder, in one place: its name, the checks before anything is written, the lock,
provenance, resume rules and every file the engine writes there.

Rules (what README's Reliability section promises):

- The folder is ``output_dir/name``; the default name is
  ``<method>_<teacher>_<student>_s<seed>`` (``<method>_<student>_s<seed>`` without a teacher).
  A name that is absolute, contains ``..`` or leaves ``output_dir`` after interpolation
  (``${oc.env:HOME}``) or through a symlink is refused.
- Nothing is written before every build-time check has passed: :meth:`RunFolder.check` only
  reads, :meth:`RunFolder.open` (called after the components are built) writes first.
- An existing folder that is not a relkd run (no ``run.json``, not a relkd 0.1 run) and holds
  anything but the grid runner's own files is never written into.
- Without ``resume`` a folder that holds a run (a checkpoint, history or a summary) is refused.
- With ``resume`` the config must equal the recorded one, except the machine-specific keys of
  :data:`ENV_KEYS` and the keys passed as ``allow_change``; the refusal names every changed key
  with its old and new value. Allowed changes are recorded in ``run.json`` and ``config.yaml``
  becomes the config the run continues with. A folder with history but no checkpoint is
  refused (it is never silently restarted); a checkpoint of another model or class count is
  refused in one line.
- One process per folder: rank 0 holds the claim ``.relkd.claim`` (:mod:`relkd.claims`: an
  exclusive create with a heartbeat, valid across the nodes of a shared file system; a dead
  holder's claim is taken over) for the whole run, and checks it before every write (config,
  run.json, checkpoint, metrics line, exported student, summary): a process whose claim was
  taken over stops with :class:`relkd.claims.ClaimLost` and writes nothing more. Inside
  ``relkd bench accuracy`` the runner's claim on the folder is used.
- ``run.json`` records every start and resume: relkd / torch / Python versions, git commit when
  relkd runs from a checkout, command line, host, pid, device, world size, global batch.
- Every file is written atomically (temp file, fsync, rename); temporary files of killed writes
  are removed when the folder is opened; SIGTERM interrupts like Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd import distributed as D
from relkd._fs import (
    atomic_write_json,
    atomic_write_text,
    count_nonblank_lines,
    first_odd_file,
    make_dirs,
    read_json_or_none,
    read_yaml_or_none,
    remove_empty_dirs,
    remove_temp_files,
)
from relkd._version import __version__
from relkd._yaml import strict_load
from relkd.claims import RUN_CLAIM, Claim, claim_now
from relkd.config import default_name
from relkd.engine.checkpoint import CKPT, MANIFEST, PREV, CheckpointStore
from relkd.engine.logger import METRICS, RunLogger
from relkd.engine.state import TrainState
from relkd.registry import RelkdError

RUN_FILE = "run.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
LOCK = ".relkd.lock"
#: Config keys that describe the machine, not the experiment: they may differ on resume
#: (the difference is recorded in run.json).
ENV_KEYS: tuple[str, ...] = (
    "data.root",
    "data.num_workers",
    "data.download",
    "train.device",
    "train.progress",
    "train.tensorboard",
)
#: Keys that locate the folder itself (compared by the path, not by their spelling).
_PLACE_KEYS = ("name", "output_dir")
#: Files the grid runner (``relkd bench accuracy``) writes into a run folder before training.
GRID_FILES = frozenset({"bench.json", "failed.json", ".lock", ".lock.break", RUN_CLAIM})
#: What relkd itself writes into a run folder.
RUN_FILES = frozenset(
    {RUN_FILE, CONFIG, SUMMARY, METRICS, LOCK, RUN_CLAIM, CKPT, PREV, MANIFEST, "tb", "plan.json"}
    | {CKPT + ".sha256", PREV + ".sha256"}
    | {"student.pt", "student.safetensors", "student_best.pt"}
)


def run_path(cfg: Any) -> Path:
    """``output_dir / name`` (the default name when ``name`` is unset), refusing names that
    would leave ``output_dir``: absolute, with ``..``, empty, or through a symlink."""
    name = default_name(cfg) if cfg.name is None else str(cfg.name)
    hint = "use a relative folder name inside output_dir, e.g. name=kd_run1"
    if not name.strip() or name.strip() in (".", "./"):
        raise RelkdError(f"name={name!r} is empty; {hint}")
    if any(ord(c) < 32 for c in name):
        raise RelkdError(f"name={name!r} holds control characters; {hint}")
    p = Path(name)
    if p.is_absolute() or name.startswith("~"):
        raise RelkdError(f"name={name!r} is an absolute path (it would leave output_dir); {hint}")
    if ".." in p.parts or ".." in name.replace("\\", "/").split("/"):
        raise RelkdError(f"name={name!r} contains '..' (it would leave output_dir); {hint}")
    out = Path(cfg.output_dir).expanduser()  # a part over NAME_MAX: refused by load_config
    path = out / p
    try:
        inside = path.resolve().is_relative_to(out.resolve())
    except OSError:
        inside = True  # unresolvable (e.g. a folder inside a file): the write reports it
    if not inside:
        raise RelkdError(
            f"name={name!r} leaves output_dir={str(out)!r} through a symlink "
            f"(it resolves to {str(path.resolve())!r}); {hint}"
        )
    return path


# ----------------------------------------------------------------------------------- configs
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and (d or not prefix):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


_ABSENT = "<absent>"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs (``<absent>`` where missing)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(
        k, _ABSENT
    )]  # fmt: skip


def _added_at_default(key: str, old: Any, new: Any) -> bool:
    """A key a newer relkd added (``relkd.config.ADDED_KEYS``), absent from the recorded config
    and at the value that keeps the old behaviour: not a change."""
    from relkd.config import ADDED_KEYS

    return old == _ABSENT and key in ADDED_KEYS and new == ADDED_KEYS[key]


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _show(v: Any) -> str:
    return v if v == _ABSENT else json.dumps(v) if isinstance(v, (str, list, dict)) else str(v)


# -------------------------------------------------------------------------------- provenance
def _git_commit() -> str | None:
    """The commit of the relkd checkout in use (``+dirty`` with local edits), or None."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.split()  # fmt: skip
        if len(top) != 2 or not here.is_relative_to(Path(top[0]).resolve()):
            return None
        dirty = subprocess.run(
            # no .git/index.lock taken (a concurrent `git commit` in the checkout would fail)
            ["git", "--no-optional-locks", "-C", top[0], "status", "--porcelain", "-uno"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        return top[1] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def provenance(device: Any = None, world_size: int = 1, global_batch: int | None = None) -> dict:
    """What produced a run: versions, git commit, command line, host, device, world size."""
    import torch

    dev = str(device) if device is not None else None
    info: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "relkd": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "command": shlex.join(sys.argv),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": dev,
        "world_size": int(world_size),
        "global_batch": global_batch,
    }
    if sched := D.scheduler_info():
        info["scheduler"] = sched  # job id, array task, node list: which job wrote the run
    if dev and dev.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    return info


def student_metadata(cfg: Any, info: Any, student: Any = None) -> dict[str, Any]:
    """What an exported student needs to be used again: architecture, classes, input."""
    arch = cfg.student.name if student is None else type(student).__name__
    return {
        "architecture": str(arch),
        "num_classes": int(info.num_classes),
        "in_chans": int(info.in_channels),
        "image_size": int(info.image_size),
        "mean": [float(v) for v in info.mean],
        "std": [float(v) for v in info.std],
        "dataset": str(getattr(info, "name", cfg.data.name)),
    }


# ------------------------------------------------------------------------------- the folder
class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, Kubernetes) turned into the Ctrl-C path: same message, same checkpoint."""

    signum = signal.SIGTERM


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main
    thread; a handler the user installed is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = signal.getsignal(signal.SIGTERM)
    if prev not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


@dataclass
class Resumed:
    """What a resumed run continues from."""

    state: dict[str, Any]
    path: Path
    start_epoch: int
    step: int
    history: list[dict[str, Any]]
    best: dict[str, Any]


@dataclass
class FolderState:
    exists: bool
    is_run: bool  # run.json, or a relkd 0.1 run (config.yaml + its files)
    foreign: list[str] = field(default_factory=list)  # entries of a folder that is no run
    has_checkpoint: bool = False
    epochs_recorded: int = 0  # lines in metrics.jsonl
    finished: bool = False
    saved_before: bool = False  # the manifest says a checkpoint save completed
    exported: list[str] = field(default_factory=list)  # student.pt / .safetensors: a pruned run


class RunFolder:
    """One run folder. Use::

        run = RunFolder(run_path(cfg), log)
        run.check(cfg, resume=..., allow_change=...)   # reads only; may be called early
        ... build everything; every build-time check passes ...
        resumed = run.open(cfg, resume=..., allow_change=..., device=..., world_size=...)
        run.restore(resumed, distiller, optimizer, scaler)
        ... per epoch: run.save_best(...); run.end_epoch(record, state) ...
        run.finish(student, summary, metadata); run.close()

    Only rank 0 takes the lock and writes; every rank reads the checkpoint.
    """

    def __init__(self, path: str | os.PathLike, log: RunLogger | None = None) -> None:
        self.path = Path(path)
        self.main = D.is_main()
        self.log = log or RunLogger(self.path, tensorboard=False)
        self.store = CheckpointStore(self.path, log=self.log.info)
        self._claim: Claim | None = None
        self._own_claim = False
        self._opened = False
        self._created: list[Path] = []  # folders open() made (deepest last), for a failed open

    # ------------------------------------------------------------------------- inspection
    def state(self) -> FolderState:
        p = self.path
        if not p.exists():
            return FolderState(exists=False, is_run=False)
        if not p.is_dir():
            raise RelkdError(f"run folder {str(p)!r} exists and is a file, not a folder")
        try:
            names = sorted(x.name for x in p.iterdir())
        except OSError as e:
            raise RelkdError(f"cannot read the run folder {str(p)!r}: {e}") from e
        is_run = RUN_FILE in names and _is_run_json(p / RUN_FILE)
        if not is_run and CONFIG in names and _looks_like_config(p / CONFIG):
            # relkd 0.1 (no run.json): a run with its files, or only relkd's own names
            # (e.g. the config.yaml and tb/ of a failed build)
            only_ours = all(
                n in RUN_FILES | GRID_FILES or _is_tmp(n) or _is_claim(n) for n in names
            )
            is_run = only_ours or bool({CKPT, PREV, METRICS, SUMMARY} & set(names))
        own = GRID_FILES | {LOCK}
        foreign = [
            n for n in names if not is_run and n not in own and not _is_tmp(n) and not _is_claim(n)
        ]
        st = FolderState(exists=True, is_run=is_run, foreign=foreign)
        if is_run:
            st.has_checkpoint = self.store.exists()
            st.epochs_recorded = count_nonblank_lines(p / METRICS)
            st.finished = (p / SUMMARY).exists()
            st.saved_before = self.store.completed_before()
            st.exported = [n for n in ("student.pt", "student.safetensors") if n in names]
        return st

    def _recorded_config(self) -> dict[str, Any] | None:
        cfg = read_yaml_or_none(self.path / CONFIG)
        return cfg if isinstance(cfg, dict) else None

    def check(
        self, cfg: Any, *, resume: bool = False, allow_change: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Every refusal that the folder alone decides, without writing anything. Returns the
        config changes a resume accepts (environment keys and ``allow_change`` ones)."""
        st = self.state()
        where = f"run folder {str(self.path)!r}"
        self._refuse_foreign(st)
        odd = first_odd_file(self.path, sorted(RUN_FILES - {"tb", LOCK}))  # checkpoint.pt as a
        if st.exists and odd:  # folder failed the first save, after an epoch; a FIFO hung reads
            raise RelkdError(f"{where}: {odd[0]} is not a regular file ({odd[1]}); relkd writes "
                             "only regular files there: remove it or choose another name")  # fmt: skip
        holds_run = st.has_checkpoint or st.epochs_recorded > 0 or st.finished or st.saved_before
        holds_run = holds_run or bool(st.exported)
        if not resume:
            if holds_run:
                raise RelkdError(
                    f"{where} already holds a run; pass --resume (resume=True) to continue it, "
                    "or choose another output_dir / name"
                )
            return []
        if not st.has_checkpoint and holds_run:
            what = (
                f"{st.epochs_recorded} epoch(s) in {METRICS}"
                if st.epochs_recorded
                else ("a summary.json" if st.finished else None)
            )
            what = what or (f"its {st.exported[0]}" if st.exported else f"a {MANIFEST}")
            raise RelkdError(
                f"{where} has history ({what}) but no checkpoint ({CKPT} and {PREV} are "
                "missing): it cannot be resumed and is not restarted silently; restore the "
                "checkpoint, or delete the folder to start again"
            )
        return self._check_config(cfg, allow_change) if st.is_run else []

    def _refuse_foreign(self, st: FolderState) -> None:
        if st.exists and not st.is_run and st.foreign:
            shown = ", ".join(st.foreign[:5]) + (", ..." if len(st.foreign) > 5 else "")
            raise RelkdError(
                f"run folder {str(self.path)!r} exists and is not a relkd run (it holds {shown}); "
                "relkd never writes into it: choose another output_dir / name"
            )

    def _check_config(self, cfg: Any, allow_change: Sequence[str]) -> list[dict[str, Any]]:
        from relkd.config import to_yaml

        old = self._recorded_config()
        if old is None:
            if self.store.exists():
                raise RelkdError(
                    f"run folder {str(self.path)!r} has a checkpoint but no readable {CONFIG}: "
                    "the run cannot be checked against its config"
                )
            return []
        new = strict_load(to_yaml(cfg))  # as the recorded one is read
        known = set(_flatten(new)) | set(_flatten(old))
        for pat in allow_change:
            if not any(_matches(k, [pat]) for k in known):
                raise RelkdError(
                    f"--allow-change {pat!r} is not a config key (e.g. train.epochs, "
                    "method.args.temperature)"
                )
        changes = [
            c
            for c in config_changes(old, new)
            if not _matches(c[0], _PLACE_KEYS) and not _added_at_default(*c)
        ]
        refused = [c for c in changes if not _matches(c[0], [*ENV_KEYS, *allow_change])]
        if refused:
            listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in refused)
            flags = " ".join(f"--allow-change {k}" for k, _, _ in refused)
            raise RelkdError(
                f"--resume refused: the config differs from the one {str(self.path)!r} was "
                f"trained with ({len(refused)} key(s)): {listed}. Start a new run (another name) "
                f"or, if the change is meant, pass {flags}"
            )
        return [
            {"key": k, "old": a, "new": b, "why": "allowed" if _matches(k, allow_change) else "env"}
            for k, a, b in changes
        ]

    # ----------------------------------------------------------------------------- opening
    def open(
        self,
        cfg: Any,
        *,
        resume: bool = False,
        allow_change: Sequence[str] = (),
        device: Any = None,
        world_size: int = 1,
        extra: Mapping[str, Any] | None = None,
        into: TrainState | None = None,
    ) -> Resumed | None:
        """Take the folder (rank 0: the lock), check it again under the lock, load the
        checkpoint when resuming (into the live ``TrainState`` when given, see
        :meth:`TrainState.load`), and only then write ``config.yaml``, ``run.json`` and a
        ``metrics.jsonl`` equal to the checkpoint's history. Returns what to resume from."""
        from relkd.config import to_yaml

        if self.main:
            self._acquire()
        try:
            changes = self.check(cfg, resume=resume, allow_change=allow_change)
            loaded = self.store.load_latest() if resume else None
            resumed = None
            if loaded is not None:
                resumed = Resumed(
                    state=loaded,
                    path=self.store.loaded_from or self.path / CKPT,
                    start_epoch=int(loaded["epoch"]) + 1,
                    step=int(loaded["step"]),
                    history=list(loaded.get("history", [])),
                    best=dict(loaded.get("best", {"top1": -1.0, "epoch": -1})),
                )
            elif resume and self.state().exists:
                self.log.info(f"no checkpoint in {self.path} yet: starting from the beginning")
            if resumed is not None and into is not None:
                into.load(resumed.state, resumed.path)
                e = resumed.start_epoch  # epochs done; the next line prints epoch e + 1
                self.log.info(f"resumed {self.path} after epoch {e} (next: epoch {e + 1})")
            if not self.main:
                self._opened = True
                return resumed
            self._fence("writing run.json and config.yaml")
            gone = remove_temp_files(self.path)
            if gone:
                self.log.info(f"removed temporary files of interrupted writes: {', '.join(gone)}")
            # Samples per optimizer step: batch x processes x accumulated micro-batches.
            k = int(cfg.train.grad_accum_steps)
            session = provenance(device, world_size, cfg.data.batch_size * int(world_size) * k)
            session["kind"] = "resume" if resumed else "start"
            session["start_epoch"] = resumed.start_epoch if resumed else 0
            if changes:
                session["config_changes"] = changes
            if extra:
                session.update(extra)
            record = read_json_or_none(self.path / RUN_FILE) if resumed else None
            if not isinstance(record, dict) or not isinstance(record.get("sessions"), list):
                record = {"relkd_run": 1, "created": session["time"], "sessions": []}
            record["sessions"].append(session)
            atomic_write_json(self.path / RUN_FILE, record)
            atomic_write_text(self.path / CONFIG, to_yaml(cfg))
            if resumed:
                (self.path / SUMMARY).unlink(missing_ok=True)  # unfinished again until the end
            self.log.set_history(resumed.history if resumed else [])
            self._opened = True
            return resumed
        except BaseException:
            self.close()
            remove_empty_dirs(self._created)  # no empty output_dir left behind
            raise

    def _acquire(self) -> None:
        # Checked before the claim file is created: never a claim in someone else's folder.
        self._refuse_foreign(self.state())
        try:  # the folders made here are removed again if the open fails
            make_dirs(self.path, self._created)
        except OSError as e:
            raise RelkdError(f"cannot write the run folder {str(self.path)!r}: {e}") from e
        self._claim, self._own_claim = claim_now(
            self.path / RUN_CLAIM,
            f"run folder {self.path}",
            f"run folder {str(self.path)!r} is in use by another relkd process{{holder}}; one "
            "process per run folder (wait for it, or choose another name)",
        )  # inside relkd bench accuracy: the runner's claim on the folder (not ours to release)
        if self._own_claim and self._claim.took_over:
            self.log.info(f"took over the run folder's claim: {self._claim.took_over}")

    def _fence(self, action: str) -> None:
        """Stop (:class:`relkd.claims.ClaimLost`) if another process took the folder over."""
        if self._claim is not None:
            self._claim.check(action)

    # ----------------------------------------------------------------------------- training
    def save_best(self, student: Any, metadata: Mapping[str, Any] | None = None) -> None:
        if self.main:
            from relkd.models.checkpoint import save_student

            self._fence("writing student_best.pt")
            save_student(student, self.path / "student_best.pt", metadata=metadata)

    def end_epoch(self, record: dict[str, Any], state: TrainState) -> None:
        """The epoch's checkpoint (``state``) first, then its metrics line: ``metrics.jsonl``
        never runs ahead of the checkpoint (a kill in between is repaired by the resume)."""
        if self.main:
            self._fence("writing the checkpoint")
            self.store.save(state.state_dict())
            self._fence("writing the metrics line")
            self.log.metrics(record)

    def finish(
        self,
        student: Any,
        cfg: Any,
        state: TrainState,
        *,
        t_start: float,
        metadata: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Export the student (``.pt`` and ``.safetensors``, with metadata) and write
        ``summary.json`` (:meth:`TrainState.summary` plus ``extra``) last: its presence means
        the run finished. Returns the summary."""
        summary = {**state.summary(cfg, t_start, self.path), **(extra or {})}
        if self.main:
            from relkd.models.checkpoint import save_student

            self._fence("exporting the student")
            save_student(student, self.path / "student.pt", metadata=metadata)
            save_student(student, self.path / "student.safetensors", metadata=metadata)
            self._fence("writing summary.json")
            atomic_write_json(self.path / SUMMARY, dict(summary))
        return summary

    def write_json(self, name: str, obj: Any) -> None:
        """Any other file of the run folder (e.g. the pipeline plan), written atomically."""
        if self.main:
            self._fence(f"writing {name}")
            atomic_write_json(self.path / name, obj)

    def close(self) -> None:
        self.log.close()
        if self._claim is not None and self._own_claim:
            self._claim.release()
        self._claim, self._own_claim = None, False

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_claim(name: str) -> bool:
    """The run claim or one of its transient siblings (``.relkd.claim.new-...`` etc.)."""
    return name == RUN_CLAIM or name.startswith(RUN_CLAIM + ".")


def _is_tmp(name: str) -> bool:
    from relkd._fs import TMP_RE

    return bool(TMP_RE.match(name))


def _is_run_json(path: Path) -> bool:
    rec = read_json_or_none(path)
    return isinstance(rec, dict) and rec.get("relkd_run") is not None


def _looks_like_config(path: Path) -> bool:
    cfg = read_yaml_or_none(path)
    return isinstance(cfg, dict) and {"student", "method", "train"} <= set(cfg)
