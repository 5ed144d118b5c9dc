"""Accuracy benchmark suites: methods x (teacher, student) pairs x seeds, resumable and shareable.

A suite is a YAML file::

    name: fmnist-mini
    reference: fashion_mnist     # optional: reference tables to compare with (default: data.name)
    base: {...}                  # a partial relkd config applied to every run
    teachers:                    # one entry per teacher named in `pairs`
      cnn_small:                 # trained ONCE with method ce (base + this block) and reused
        train: {train: {epochs: 3}, data: {train_subset: null}}
      resnet56:                  # or a checkpoint (RepDistiller / mdistiller format, state dict...)
        checkpoint: teachers/resnet56_vanilla/ckpt_epoch_240.pth
    pairs: [[cnn_small, cnn_tiny]]         # [teacher, student]; teacher null = teacher-free only
    methods:
      - ce                                 # a registered method or composition ("rrd+kd")
      - {name: dkd, method: {args: {warmup: 1}}}      # label + method-section overrides
      - {name: dkd, method: {args: {beta: 2.0}}, pairs: [[resnet56, resnet20]]}  # per pair
      - {name: clkd_l1, method: {name: clkd, ce_weight: 1.0}, config: {optim: {lr: 0.1}}}
    seeds: [0, 1, 2]
    overrides: [train.epochs=4]            # key=value on every run (CLI overrides come after)

The grid is every method entry x its pairs x seeds. Methods that need no teacher (``ce``,
``corsd``) run once per *student* (the teacher of the pair is dropped); methods that need one
skip pairs whose teacher is null. Layout under the output folder::

    teachers/<teacher>/                       teachers trained by the suite (plain relkd runs)
    runs/<method>/<teacher>_<student>/s<seed>/   one relkd run folder each (+ bench.json)
    runs/<method>/<student>/s<seed>/              teacher-free methods

Everything that can be wrong with a suite (unknown methods, models, data sets, method
arguments, config keys, teachers without a checkpoint or recipe) fails before any training,
naming all the bad entries at once.

Resuming and sharing: a run folder with ``summary.json`` is finished and never redone; one with a
checkpoint but no summary is resumed (``relkd.train(..., resume=True)``); otherwise the run starts
fresh. A run is claimed by creating ``<run>/.lock`` with ``O_CREAT | O_EXCL`` (pid, host and
process start time inside), so several ``relkd bench accuracy`` processes, or ``workers > 1``
spawned processes, can work through one grid; the lock of a process that died on this host is
broken, a lock from another host is left alone (delete it by hand if that host is gone). A run
that fails is recorded in ``<run>/failed.json`` and not retried by the same invocation; the next
invocation retries it.

Teacher reuse: a teacher is trained once per suite output folder and read by every run. With
``teacher_cache: auto`` in the suite, every distillation run also sets ``train.teacher_cache=auto``:
the exact teacher-output cache (:mod:`relkd.data.teacher_cache`) is keyed by teacher, data,
transform and taps, so the first run that needs it builds it (under a file lock: concurrent
workers wait instead of building twice) and every later method and seed of that teacher reads
it. It pays when the grid's online teacher passes outnumber the K augmentation outcomes per image
(162 on CIFAR): yes for 240-epoch tables, not for 3-epoch CPU mini-suites.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import queue
import re
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.registry import RelkdError

SUITE_KEYS = ("name", "description", "reference", "base", "teachers", "pairs", "methods", "seeds")
SUITE_KEYS += ("overrides", "teacher_cache")
_CACHE_CHOICES = ("off", "auto")
_ENTRY_KEYS = ("name", "method", "config", "pairs")
_TEACHER_KEYS = ("checkpoint", "train", "kwargs")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
#: Config keys that describe the machine, not the experiment: ignored when checking that a run
#: about to be resumed still has the config it was started with.
_ENV_KEYS = (
    ("data", "root"),
    ("data", "num_workers"),
    ("data", "download"),
    ("train", "device"),
    ("train", "progress"),
    ("train", "tensorboard"),
)


# ----------------------------------------------------------------------------------- the suite
@dataclass
class TeacherSpec:
    name: str
    checkpoint: str | None = None
    train: dict[str, Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodEntry:
    label: str
    section: dict[str, Any]  # the config's `method` section (name, ce_weight, args)
    config: dict[str, Any] = field(default_factory=dict)  # other config overrides
    pairs: list[tuple[str | None, str]] | None = None


@dataclass
class Suite:
    name: str
    path: Path | None
    base: dict[str, Any]
    teachers: dict[str, TeacherSpec]
    pairs: list[tuple[str | None, str]]
    methods: list[MethodEntry]
    seeds: list[int]
    overrides: list[str]
    reference: str | None = None
    teacher_cache: str = "off"


@dataclass
class Job:
    """One relkd run of the grid (``kind="run"``) or a teacher trained by the suite."""

    id: str
    kind: str  # run | teacher
    run_dir: Path
    config: dict[str, Any]
    overrides: list[str]
    index: int = 0  # 1-based position in the grid (runs), 0 for teachers
    total: int = 0
    label: str = ""
    teacher: str | None = None
    student: str = ""
    seed: int = 0
    needs: str | None = None  # id of the teacher job this run waits for
    meta: dict[str, Any] = field(default_factory=dict)  # written to bench.json

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def has_checkpoint(self) -> bool:
        return any((self.run_dir / n).is_file() for n in ("checkpoint.pt", "checkpoint.prev.pt"))

    def failed_in(self, token: str) -> dict[str, Any] | None:
        """The failure record written by the invocation ``token``, if any."""
        try:
            rec = json.loads((self.run_dir / "failed.json").read_text())
        except (OSError, ValueError):
            return None
        return rec if rec.get("token") == token else None


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _as_pair(item: Any, where: str, errors: list[str]) -> tuple[str | None, str] | None:
    if (
        not isinstance(item, (list, tuple))
        or len(item) != 2
        or not isinstance(item[1], str)
        or not (item[0] is None or isinstance(item[0], str))
    ):
        errors.append(f"{where}: {item!r} is not a [teacher, student] pair (teacher may be null)")
        return None
    return (item[0], item[1])


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise RelkdError(f"suite file {str(path)!r} does not exist")
    try:
        raw = OmegaConf.load(path)
        if not isinstance(raw, DictConfig):
            raise RelkdError(f"suite file {str(path)!r} must hold a mapping at the top")
        # resolve=True expands ${oc.env:VAR,default} (data roots from the environment)
        data = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:
        raise RelkdError(f"suite file {str(path)!r}: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # yaml errors
        raise RelkdError(f"suite file {str(path)!r} is not valid YAML: {e}") from None
    assert isinstance(data, dict)
    return data


def parse_suite(data: dict[str, Any], path: Path | None = None) -> Suite:
    """Check the structure of a suite mapping (names are checked by :func:`validate`)."""
    where = str(path) if path else "suite"
    errors: list[str] = []
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        errors.append(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SUITE_KEYS)}")
    name = str(data.get("name") or (path.stem if path else "suite"))
    base = data.get("base") or {}
    if not isinstance(base, dict):
        errors.append("base must be a mapping (a partial relkd config)")
        base = {}
    for key in ("teacher", "output_dir", "name"):
        if key in base:
            errors.append(
                f"base.{key} is set by the suite (teachers come from `teachers` and `pairs`, run "
                "folders from the output folder); remove it"
            )
    teachers: dict[str, TeacherSpec] = {}
    for tname, spec in (data.get("teachers") or {}).items():
        if not isinstance(spec, dict) or set(spec) - set(_TEACHER_KEYS):
            errors.append(
                f"teachers.{tname}: must be a mapping with keys among {', '.join(_TEACHER_KEYS)}"
            )
            continue
        if ("checkpoint" in spec) == ("train" in spec):
            errors.append(f"teachers.{tname}: give exactly one of `checkpoint` or `train`")
            continue
        train = spec.get("train")
        if "train" in spec and not isinstance(train or {}, dict):
            errors.append(f"teachers.{tname}.train must be a mapping (config overrides)")
            continue
        teachers[str(tname)] = TeacherSpec(
            str(tname),
            checkpoint=str(spec["checkpoint"]) if spec.get("checkpoint") else None,
            train=dict(train or {}) if "train" in spec else None,
            kwargs=dict(spec.get("kwargs") or {}),
        )
    pairs = [
        p
        for i, item in enumerate(data.get("pairs") or [])
        if (p := _as_pair(item, f"pairs[{i}]", errors)) is not None
    ]
    if not pairs:
        errors.append("pairs: give at least one [teacher, student] pair")
    if len(set(pairs)) != len(pairs):
        errors.append("pairs: a pair is listed twice")
    methods: list[MethodEntry] = []
    for i, item in enumerate(data.get("methods") or []):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item or set(item) - set(_ENTRY_KEYS):
            errors.append(
                f"methods[{i}]: {item!r} must be a method name or a mapping with `name` and "
                f"optionally {', '.join(_ENTRY_KEYS[1:])}"
            )
            continue
        label = str(item["name"])
        if not _LABEL_RE.match(label) or label.startswith("."):
            errors.append(f"methods[{i}]: name {label!r} may only hold letters, digits and _.+-")
            continue
        section = dict(item.get("method") or {})
        section.setdefault("name", label)
        entry_pairs = None
        if item.get("pairs") is not None:
            entry_pairs = [
                p
                for j, x in enumerate(item["pairs"])
                if (p := _as_pair(x, f"methods[{i}].pairs[{j}]", errors)) is not None
            ]
            missing = [p for p in entry_pairs if p not in pairs]
            if missing:
                errors.append(
                    f"methods[{i}] ({label}): pair(s) {missing} are not in the suite's pairs"
                )
        methods.append(MethodEntry(label, section, dict(item.get("config") or {}), entry_pairs))
    if not methods:
        errors.append("methods: give at least one method")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        errors.append(f"seeds must be a non-empty list of integers, got {seeds!r}")
        seeds = []
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(
        isinstance(o, str) and "=" in o for o in overrides
    ):
        errors.append(f"overrides must be a list of key=value strings, got {overrides!r}")
        overrides = []
    cache = data.get("teacher_cache", "off")
    cache = "off" if cache is False else str(cache)  # YAML reads a bare off as False
    if cache not in _CACHE_CHOICES:
        errors.append(f"teacher_cache={cache!r} is not valid; choose {', '.join(_CACHE_CHOICES)}")
    if errors:
        raise RelkdError(f"suite {where} is invalid:\n  - " + "\n  - ".join(errors))
    return Suite(
        name=name,
        path=path,
        base=base,
        teachers=teachers,
        pairs=pairs,
        methods=methods,
        seeds=list(seeds),
        overrides=[str(o) for o in overrides],
        reference=str(data["reference"]) if data.get("reference") else None,
        teacher_cache=cache,
    )


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and structurally check a suite file (see the module docstring for the format)."""
    p = Path(path)
    return parse_suite(_read_yaml(p), p)


# ----------------------------------------------------------------------------- name checks
def _method_parts(name: str) -> list[str]:
    return [n.strip() for n in str(name).split("+")]


def _requires_teacher(method_name: str) -> bool:
    from relkd.methods import METHODS

    return any(METHODS.get(p).requires_teacher for p in _method_parts(method_name))


def _method_arg_errors(section: dict[str, Any]) -> list[str]:
    """Argument names of a method section checked against the method's signature."""
    from relkd.methods import METHODS

    name = str(section.get("name"))
    parts = _method_parts(name)
    args = section.get("args") or {}
    if not isinstance(args, dict):
        return [f"method {name!r}: args must be a mapping"]
    per_part = {parts[0]: args} if len(parts) == 1 else args
    errors = []
    if len(parts) > 1 and set(args) - set(parts):
        bad = ", ".join(sorted(set(args) - set(parts)))
        return [f"method {name!r}: args must be keyed by part ({', '.join(parts)}); got {bad}"]
    for part, a in per_part.items():
        params = inspect.signature(METHODS.get(part).__init__).parameters
        valid = [k for k in params if k not in ("self", "ctx")]
        for key in a or {}:
            if key not in valid:
                errors.append(
                    f"method {part!r} has no argument {key!r} (valid: {', '.join(valid) or 'none'})"
                )
    return errors


def _model_known(name: str) -> bool:
    from relkd.models import MODELS

    if name.startswith("torchvision:"):
        import torchvision

        return name.split(":", 1)[1] in torchvision.models.list_models(module=torchvision.models)
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            return False
        return bool(timm.is_model(name.split(":", 1)[1]))
    return name in MODELS


def _check_names(suite: Suite) -> None:
    """Unknown methods and models fail here, all named at once, before anything is built."""
    from relkd.methods import list_methods

    registered = set(list_methods())
    unknown_methods = sorted(
        {p for e in suite.methods for p in _method_parts(e.section["name"]) if p not in registered}
    )
    models = {m for pair in suite.pairs for m in pair if m is not None}
    unknown_models = sorted(m for m in models if not _model_known(m))
    errors = []
    if unknown_methods:
        errors.append(
            f"unknown method(s): {', '.join(unknown_methods)} (registered: "
            f"{', '.join(sorted(registered))})"
        )
    if unknown_models:
        errors.append(
            f"unknown model(s): {', '.join(unknown_models)} (zoo: relkd list models; "
            "torchvision:<name>, timm:<name> with timm installed)"
        )
    if not unknown_methods:
        for e in suite.methods:
            errors += [f"{e.label}: {msg}" for msg in _method_arg_errors(e.section)]
    missing = sorted({t for t, _ in suite.pairs if t is not None and t not in suite.teachers})
    if missing:
        errors.append(
            f"teacher(s) {', '.join(missing)} are used in pairs but have no entry under "
            "`teachers` (give a checkpoint or a train recipe)"
        )
    if errors:
        where = str(suite.path) if suite.path else suite.name
        raise RelkdError(f"suite {where} is invalid:\n  - " + "\n  - ".join(errors))


# ------------------------------------------------------------------------------------ the grid
def _teacher_job(suite: Suite, spec: TeacherSpec, out: Path, overrides: list[str]) -> Job:
    base = {k: v for k, v in suite.base.items() if k not in ("method",)}
    cfg = _deep_merge(base, {"student": {"name": spec.name, "kwargs": dict(spec.kwargs)}})
    cfg = _deep_merge(cfg, {"method": {"name": "ce"}})
    # Suite / CLI overrides first (data roots, devices), then the teacher's own recipe.
    if overrides:
        from omegaconf import OmegaConf

        cfg = _deep_merge(cfg, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
    cfg = _deep_merge(cfg, spec.train or {})
    cfg["output_dir"] = str(out / "teachers")
    cfg["name"] = _safe(spec.name)
    return Job(
        id=f"teacher/{_safe(spec.name)}",
        kind="teacher",
        run_dir=out / "teachers" / _safe(spec.name),
        config=cfg,
        overrides=[],
        student=spec.name,
        meta={"suite": suite.name, "kind": "teacher", "teacher_of": spec.name},
    )


def build_grid(
    suite: Suite, out_dir: str | os.PathLike, overrides: Sequence[str] = ()
) -> tuple[list[Job], list[Job]]:
    """The suite's teacher jobs and run jobs (grid order: method, pair, seed)."""
    out = Path(out_dir)
    all_overrides = [*suite.overrides, *overrides]
    teacher_jobs: dict[str, Job] = {}
    runs: list[Job] = []
    seen: dict[str, str] = {}
    for entry in suite.methods:
        needs_teacher = _requires_teacher(entry.section["name"])
        for t, s in entry.pairs or suite.pairs:
            if needs_teacher and t is None:
                continue  # a teacher-free pair only feeds teacher-free methods
            teacher = t if needs_teacher else None
            pair_dir = f"{_safe(teacher)}_{_safe(s)}" if teacher else _safe(s)
            for seed in suite.seeds:
                rid = f"{entry.label}/{pair_dir}/s{seed}"
                if rid in seen:
                    if teacher is None:
                        continue  # the same teacher-free student listed in several pairs
                    raise RelkdError(
                        f"suite {suite.name}: method {entry.label!r} is listed twice for pair "
                        f"{teacher} -> {s}; give the entries different names or disjoint `pairs`"
                    )
                seen[rid] = entry.label
                cfg = _deep_merge(suite.base, entry.config)
                cfg = _deep_merge(cfg, {"student": {"name": s}, "method": entry.section})
                cfg = _deep_merge(cfg, {"train": {"seed": seed}})
                needs = None
                if teacher is not None:
                    spec = suite.teachers[teacher]
                    if spec.checkpoint:
                        ckpt = spec.checkpoint
                    else:
                        tj = teacher_jobs.get(teacher)
                        if tj is None:
                            tj = teacher_jobs[teacher] = _teacher_job(
                                suite, spec, out, all_overrides
                            )
                        ckpt = str(tj.run_dir / "student.pt")
                        needs = tj.id
                    cfg["teacher"] = {
                        "name": teacher,
                        "checkpoint": ckpt,
                        "kwargs": dict(spec.kwargs),
                    }
                    if suite.teacher_cache == "auto":
                        # One exact cache per (teacher, data, transform, taps), keyed and shared
                        # by every run of the grid that can use it (the engine says when a run
                        # cannot and keeps the online teacher). A run's own config or a CLI
                        # override of train.teacher_cache still wins.
                        cfg = _deep_merge({"train": {"teacher_cache": "auto"}}, cfg)
                cfg["output_dir"] = str(out)
                cfg["name"] = f"runs/{rid}"
                meta = {
                    "suite": suite.name,
                    "kind": "run",
                    "id": rid,
                    "method": entry.label,
                    "method_name": entry.section["name"],
                    "teacher": teacher,
                    "student": s,
                    "seed": seed,
                    "index": len(runs) + 1,
                    "reference": suite.reference,
                }
                runs.append(
                    Job(
                        id=rid,
                        kind="run",
                        run_dir=out / "runs" / rid,
                        config=cfg,
                        overrides=list(all_overrides),
                        index=len(runs) + 1,
                        label=entry.label,
                        teacher=teacher,
                        student=s,
                        seed=seed,
                        needs=needs,
                        meta=meta,
                    )
                )
    for j in runs:
        j.total = len(runs)
        j.meta["total"] = len(runs)
    return list(teacher_jobs.values()), runs


def _select(runs: list[Job], only: str | Sequence[str] | None) -> list[Job]:
    if not only:
        return runs
    pats = [p.strip() for p in only.split(",")] if isinstance(only, str) else list(only)
    return [j for j in runs if any(fnmatch.fnmatchcase(j.id, p) for p in pats if p)]


def _validate_configs(teachers: list[Job], runs: list[Job]) -> set[str]:
    """load_config once per distinct (method, pair) and per teacher: bad keys, types, values and
    data set names fail here, before any training. Returns the data roots that do not exist."""
    from relkd.config import load_config
    from relkd.data import DATASETS

    errors: dict[str, str] = {}
    checked: set[str] = set()
    missing_roots: set[str] = set()
    for job in [*teachers, *runs]:
        key = job.id.rsplit("/s", 1)[0] if job.kind == "run" else job.id
        if key in checked:
            continue
        checked.add(key)
        try:
            cfg = load_config(job.config, job.overrides)
        except RelkdError as e:
            errors.setdefault(str(e), key)
            continue
        if cfg.data.root and not Path(cfg.data.root).expanduser().exists():
            missing_roots.add(f"{cfg.data.root} (data set {cfg.data.name})")
        if cfg.data.name not in DATASETS:
            errors.setdefault(
                f"unknown data set {cfg.data.name!r} (valid: {', '.join(DATASETS.names())})", key
            )
    if errors:
        lines = [f"{where}: {msg}" for msg, where in errors.items()]
        raise RelkdError("suite configs are invalid:\n  - " + "\n  - ".join(lines))
    return missing_roots


# ---------------------------------------------------------------------------------- run locks
def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot) on Linux, to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """Claim a run folder by creating ``.lock`` with O_CREAT | O_EXCL.

    The file holds ``{"pid", "host", "start", "time"}``. A lock is *stale* when its process is
    gone on this host (or its pid now belongs to a process that started later); stale locks are
    broken under a short ``.lock.break`` mutex so two processes never both break and re-take the
    same lock. Locks from other hosts are never broken automatically.
    """

    STALE_UNREADABLE_S = 60.0  # an empty / torn lock file older than this is stale

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False
        self._mine = ""

    def _stale(self, raw: str) -> bool:
        try:
            info = json.loads(raw)
            pid, host = int(info["pid"]), str(info["host"])
        except (ValueError, KeyError, TypeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return True
            return age > self.STALE_UNREADABLE_S
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        start = info.get("start")
        return bool(start) and _proc_start(pid) not in (None, start)

    def _break(self, raw: str) -> None:
        mutex = self.path.with_name(".lock.break")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a breaker that died mid-break leaves the mutex behind
                if time.time() - mutex.stat().st_mtime > self.STALE_UNREADABLE_S:
                    mutex.unlink()
            except OSError:
                pass
            return
        os.close(fd)
        try:
            try:
                now = self.path.read_text()
            except OSError:
                return
            if now == raw:  # still the same dead owner: nobody re-took it meanwhile
                self.path.unlink()
        finally:
            mutex.unlink()

    def acquire(self) -> bool:
        """Claim the run; False if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _proc_start(os.getpid()),
            "time": time.time(),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    raw = self.path.read_text()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if not self._stale(raw):
                    return False
                self._break(raw)
                continue
            self._mine = json.dumps(me)
            with os.fdopen(fd, "w") as f:
                f.write(self._mine)
            self.held = True
            return True
        return False

    def owner(self) -> str:
        """Who holds the lock, in words."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self._mine:
                self.path.unlink()
        except OSError:
            pass


# ------------------------------------------------------------------------------------ running
def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _comparable(yaml_text: str) -> Any:
    import yaml

    d = yaml.safe_load(yaml_text) or {}
    d.pop("output_dir", None)  # the same folder, spelled relative or absolute
    for sect, key in _ENV_KEYS:
        if isinstance(d.get(sect), dict):
            d[sect].pop(key, None)
    return d


def _config_changed(job: Job) -> bool:
    from relkd.config import load_config, to_yaml

    saved = job.run_dir / "config.yaml"
    if not saved.is_file():
        return False
    want = to_yaml(load_config(job.config, job.overrides))
    return _comparable(saved.read_text()) != _comparable(want)


def _summary(job: Job) -> dict[str, Any]:
    try:
        return json.loads((job.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _tag(job: Job) -> str:
    if job.kind == "teacher":
        return f"[teacher] {job.student}"
    width = len(str(job.total))
    return f"[{job.index:>{width}}/{job.total}] {job.id}"


def _result(job: Job, status: str, **kw: Any) -> dict[str, Any]:
    s = _summary(job) if status in ("trained", "resumed", "skipped") else {}
    out = {
        "id": job.id,
        "kind": job.kind,
        "method": job.label,
        "teacher": job.teacher,
        "student": job.student,
        "seed": job.seed,
        "run_dir": str(job.run_dir),
        "status": status,
        "best_top1": s.get("best_top1"),
        "last_top1": s.get("last_top1"),
    }
    out.update(kw)
    return out


def _execute(job: Job, token: str, quiet: bool, say) -> dict[str, Any]:
    """Train (or resume) one claimed job; failures are recorded, not raised."""
    import relkd

    resume = job.has_checkpoint()
    t0 = time.time()
    say(f"{_tag(job)} start ({'resume' if resume else 'new'})")
    try:
        if resume and _config_changed(job):
            raise RelkdError(
                f"{job.run_dir}/config.yaml differs from the suite's config for this run; "
                "restore the suite or delete the run folder to start it again"
            )
        if job.kind == "run":
            _write_json(job.run_dir / "bench.json", job.meta)
        res = relkd.train(job.config, overrides=job.overrides, resume=resume, quiet=quiet)
    except Exception as e:  # one failed run must not stop the grid
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        _write_json(
            job.run_dir / "failed.json",
            {
                "token": token,
                "error": msg,
                "traceback": traceback.format_exc(),
                "time": time.time(),
            },
        )
        dt = time.time() - t0
        say(f"{_tag(job)} FAILED after {dt:.1f} s: {msg}")
        return _result(job, "failed", elapsed_s=dt, error=msg)
    dt = time.time() - t0
    (job.run_dir / "failed.json").unlink(missing_ok=True)
    say(f"{_tag(job)} done in {dt:.1f} s: best {res['best_top1']:.2f} last {res['last_top1']:.2f}")
    return _result(job, "resumed" if resume else "trained", elapsed_s=dt, error=None)


def _work(
    jobs: list[Job], token: str, quiet: bool, say, poll_s: float = 2.0
) -> Iterator[dict[str, Any]]:
    """Work through ``jobs`` (teachers first), claiming each with a lock; yields the result of
    every job this process ran or failed. Waits for jobs held by other processes and for teachers
    being trained elsewhere, and returns when nothing is left to do."""
    by_id = {j.id: j for j in jobs}
    handled: set[str] = set()
    waiting_note: set[str] = set()
    while True:
        waiting = ran = False
        for job in jobs:
            if job.id in handled:
                continue
            if job.finished() or job.failed_in(token):
                handled.add(job.id)
                continue
            dep = by_id.get(job.needs) if job.needs else None
            if dep is not None:
                failed = dep.failed_in(token)
                if failed:
                    msg = f"teacher {dep.student} failed: {failed.get('error')}"
                    job.run_dir.mkdir(parents=True, exist_ok=True)
                    _write_json(job.run_dir / "failed.json", {"token": token, "error": msg})
                    handled.add(job.id)
                    say(f"{_tag(job)} skipped: {msg}")
                    yield _result(job, "failed", elapsed_s=0.0, error=msg)
                    continue
                if not dep.finished():
                    waiting = True
                    continue
            lock = RunLock(job.run_dir)
            if not lock.acquire():
                if job.id not in waiting_note:
                    waiting_note.add(job.id)
                    say(f"{_tag(job)} is being run by {lock.owner()}; waiting")
                waiting = True
                continue
            try:
                if job.finished():
                    handled.add(job.id)
                    continue
                res = _execute(job, token, quiet, say)
            finally:
                lock.release()
            handled.add(job.id)
            ran = True
            yield res
        if not waiting:
            return
        if not ran:
            time.sleep(poll_s)


def _printer(prefix: str = ""):
    def say(msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} {prefix}{msg}", flush=True)

    return say


def _silent(msg: str) -> None:
    pass


def _worker_main(wid, jobs, token, quiet, threads, progress, q) -> None:  # pragma: no cover
    """Entry point of a spawned worker process (covered by the multi-process test)."""
    import torch

    torch.set_num_threads(threads)
    say = _printer(f"[w{wid}] ") if progress else _silent
    try:
        for res in _work(jobs, token, quiet, say):
            q.put(("result", res))
    finally:
        q.put(("exit", wid))


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_env(wid: int, threads: int, gpus: list[str]) -> dict[str, str]:
    """Environment of worker ``wid``: its torch threads and, with GPUs, one GPU (round-robin)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[wid % len(gpus)]
    return env


def _run_pool(
    jobs: list[Job], token: str, workers: int, quiet: bool, progress: bool
) -> dict[str, dict[str, Any]]:
    """Spawn ``workers`` processes over the same job list; each claims runs with locks. CPU:
    ``cpu_count // workers`` torch threads each. GPUs: CUDA_VISIBLE_DEVICES round-robin."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    gpus = _visible_gpus()
    threads = max(1, _cpu_count() // workers)
    procs = []
    for wid in range(workers):
        env = worker_env(wid, threads, gpus)
        with _env(**env):  # a spawned child copies the environment at start()
            p = ctx.Process(
                target=_worker_main,
                args=(wid, jobs, token, quiet, threads, progress, q),
                name=f"relkd-bench-w{wid}",
            )
            p.start()
        procs.append(p)
    results: dict[str, dict[str, Any]] = {}
    exited = 0
    try:
        while exited < workers:
            try:
                kind, payload = q.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a worker died without saying so (killed); its lock is now stale
                continue
            if kind == "result":
                results[payload["id"]] = payload
            else:
                exited += 1
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
    dead = [p.name for p in procs if p.exitcode not in (0, None)]
    if dead:
        print(f"warning: worker(s) {', '.join(dead)} exited abnormally", file=sys.stderr)
    return results


def run_suite(
    suite_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    only: str | Sequence[str] | None = None,
    dry_run: bool = False,
    quiet: bool = True,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or continue) every run of a suite; returns one dict per selected run, grid order.

    Args:
        suite_path: the suite YAML (format in the module docstring).
        out_dir: where ``teachers/`` and ``runs/`` go; a second call with the same folder
            continues: finished runs are kept, interrupted ones resumed.
        workers: processes to spread the runs over (1: this process). Independent invocations
            on the same ``out_dir`` also share the work (run folders are claimed with locks).
        only: glob(s) on run ids ``<method>/<teacher>_<student>/s<seed>`` (comma separated or a
            list), e.g. ``"kd/*"`` or ``"*/s0"``; teachers are trained only if a selected run
            needs them.
        dry_run: validate and print the plan (state of every run), train nothing.
        quiet: silence relkd.train's own per-epoch output (progress lines are still printed).
        overrides: ``key=value`` applied to every run after the suite's own ``overrides``.
        progress: print one line per run start / finish.

    Each dict holds ``id, kind, method, teacher, student, seed, run_dir, status, best_top1,
    last_top1`` (+ ``elapsed_s``, ``error``). ``status``: ``trained`` / ``resumed`` (by this
    call), ``skipped`` (finished before, or by another process meanwhile), ``failed``, ``incomplete`` (left unfinished, e.g. a
    worker was killed) or, with ``dry_run``, ``planned`` (with ``state``: finished / resume /
    new).

    Raises:
        RelkdError: an invalid suite (unknown methods or models, bad keys...), before training.
    """
    if workers < 1:
        raise RelkdError(f"workers must be >= 1, got {workers}")
    suite = load_suite(suite_path)
    _check_names(suite)
    out = Path(out_dir)
    teachers, runs = build_grid(suite, out, overrides)
    runs = _select(runs, only)
    if not runs:
        raise RelkdError(f"no run of suite {suite.name} matches --only {only!r}")
    needed = {j.needs for j in runs if j.needs}
    teachers = [t for t in teachers if t.id in needed]
    missing_roots = sorted(_validate_configs(teachers, runs))
    missing = sorted(
        {
            str(j.config["teacher"]["checkpoint"])
            for j in runs
            if j.needs is None
            and j.teacher
            and not Path(j.config["teacher"]["checkpoint"]).expanduser().is_file()
        }
    )
    say = _printer() if progress else _silent
    if dry_run:
        return _plan(suite, out, teachers, runs, missing, missing_roots, say)
    if missing_roots:
        raise RelkdError(
            "data root(s) not found: "
            + ", ".join(missing_roots)
            + " (set data.root=DIR on the command line or the variable the suite reads)"
        )
    if missing:
        raise RelkdError(
            "teacher checkpoint(s) not found: "
            + ", ".join(missing)
            + " (download the RepDistiller / mdistiller teachers or change `teachers` in the suite)"
        )
    token = uuid.uuid4().hex
    t0 = time.time()
    todo = [j for j in [*teachers, *runs] if not j.finished()]
    say(
        f"suite {suite.name}: {len(runs)} run(s), {len(runs) - sum(not j.finished() for j in runs)}"
        f" finished before, {len(teachers)} teacher(s) to train or reuse; output {out}"
    )
    results: dict[str, dict[str, Any]] = {}
    if todo:
        if workers <= 1:
            for res in _work(todo, token, quiet, say):
                results[res["id"]] = res
        else:
            results = _run_pool(todo, token, workers, quiet, progress)
    final = []
    for job in runs:
        if job.id in results:
            final.append(results[job.id])
        elif job.finished():
            final.append(_result(job, "skipped"))
        elif (rec := job.failed_in(token)) is not None:
            final.append(_result(job, "failed", error=rec.get("error")))
        else:
            final.append(_result(job, "incomplete"))
    counts: dict[str, int] = {}
    for r in final:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    say(
        f"suite {suite.name} in {time.time() - t0:.0f} s: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    )
    return final


def _plan(suite, out, teachers, runs, missing, missing_roots, say) -> list[dict[str, Any]]:
    say(f"suite {suite.name}: {len(runs)} run(s) in {out} (dry run, nothing is trained)")
    for t in teachers:
        state = "finished" if t.finished() else ("resume" if t.has_checkpoint() else "train")
        say(f"  teacher {t.student}: {state} -> {t.run_dir}")
    for m in missing:
        say(f"  warning: teacher checkpoint {m} does not exist (a real run would stop here)")
    for m in missing_roots:
        say(f"  warning: data root {m} does not exist (a real run would stop here)")
    final = []
    for j in runs:
        state = "finished" if j.finished() else ("resume" if j.has_checkpoint() else "new")
        say(f"  {_tag(j)}: {state}")
        final.append(_result(j, "planned", state=state))
    return final
