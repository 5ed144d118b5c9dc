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
fresh. A run is claimed with an OS-level lock on ``<run>/.lock`` (:mod:`filelock`), so several
``relkd bench accuracy`` processes (``workers=N`` starts N of them) can work through one grid: a run held by another process is waited for, never trained twice. The operating system
releases the lock when its holder exits, however it exits (a SIGKILLed or crashed worker does not
block the run). A run that fails is recorded in ``<run>/failed.json`` and not retried by the same
invocation; the next invocation retries it.

Progress: after every job it finishes, a runner prints ``[ 7/66] finished; ETA 12 min (...)``:
runs of the selected grid done (finished by anyone, or failed in this invocation) out of all, and
the time left estimated as mean wall time of the runs *this process* finished in this invocation
x runs left / workers (``ETA unknown`` until the first). Teachers still to train and runs resumed
from a checkpoint (shorter) are not modelled, so the estimate is rough early on.

Teacher reuse: a teacher is trained once per suite output folder and read by every run. With
``teacher_cache: auto`` in the suite, every distillation run also sets ``train.teacher_cache=auto``:
the exact teacher-output cache (:mod:`relkd.data.teacher_cache`) is keyed by teacher, data,
transform and taps, so the first run that needs it builds it (under a file lock: concurrent
workers wait instead of building twice) and every later method and seed of that teacher reads
it. Runs that read one cache form a group; while another process runs a group's first run (and
so probably builds its cache) and no run of the group is through an epoch yet, a worker runs
other jobs of the grid first and comes back to the group's runs, instead of idling in the build
lock; with nothing else left it polls until the cache is there. It pays when the grid's online teacher passes outnumber the K augmentation outcomes per image
(162 on CIFAR): yes for 240-epoch tables, not for 3-epoch CPU mini-suites.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from relkd.registry import RelkdError

SUITE_KEYS = ("name", "description", "reference", "data_label", "base", "teachers", "pairs")
SUITE_KEYS += ("methods", "seeds", "overrides", "teacher_cache")
_CACHE_CHOICES = ("off", "auto")
_ENTRY_KEYS = ("name", "method", "config", "pairs")
_TEACHER_KEYS = ("checkpoint", "train", "kwargs")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
#: Config keys that describe the machine, not the experiment: ignored when checking that a run
#: about to be resumed still has the config it was started with.
_ENV_KEYS = ("data.root", "data.num_workers", "data.download", "train.device", "train.progress")
_ENV_KEYS += ("train.tensorboard",)


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
    data_label: str | None = None  # what the data set is, for the report ("CIFAR-10 JPEG")


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
    #: Runs that read one teacher cache share a group (a scheduling hint, see ``_work``): the
    #: lock file a worker holds while it runs the group's first run, None without a cache.
    cache_group: Path | None = None

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def started(self) -> bool:
        """Finished, or through at least one epoch (so a cache it reads has been built)."""
        if self.finished():
            return True
        try:
            return (self.run_dir / "metrics.jsonl").stat().st_size > 0
        except OSError:
            return False

    def state(self) -> str:
        if self.finished():
            return "finished"
        ckpts = ("checkpoint.pt", "checkpoint.prev.pt")
        return "resume" if any((self.run_dir / n).is_file() for n in ckpts) else "new"

    def failed_in(self, token: str) -> dict[str, Any] | None:
        """The failure record written by the invocation ``token``, if any."""
        rec = _read_json(self.run_dir / "failed.json")
        return rec if isinstance(rec, dict) and rec.get("token") == token else None


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _deep_merge(out[k], v) if both else v
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _fail(where: str, errors: list[str]) -> None:
    if errors:
        raise RelkdError(f"suite {where} is invalid:\n  - " + "\n  - ".join(errors))


def _pairs(items: Any, where: str, errors: list[str]) -> list[tuple[str | None, str]]:
    out = []
    for i, p in enumerate(items or []):
        ok = isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], str)
        if ok and (p[0] is None or isinstance(p[0], str)):
            out.append((p[0], p[1]))
        else:
            errors.append(
                f"{where}[{i}]: {p!r} is not a [teacher, student] pair (teacher may be null)"
            )
    return out


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


def _teacher_spec(name: str, spec: Any, errors: list[str]) -> TeacherSpec | None:
    at = f"teachers.{name}"
    if not isinstance(spec, dict) or set(spec) - set(_TEACHER_KEYS):
        errors.append(f"{at}: must be a mapping with keys among {', '.join(_TEACHER_KEYS)}")
    elif ("checkpoint" in spec) == ("train" in spec):
        errors.append(f"{at}: give exactly one of `checkpoint` or `train`")
    elif not isinstance(spec.get("train") or {}, dict):
        errors.append(f"{at}.train must be a mapping (config overrides)")
    else:
        ckpt = str(spec["checkpoint"]) if spec.get("checkpoint") else None
        train = dict(spec.get("train") or {}) if "train" in spec else None
        return TeacherSpec(name, ckpt, train, dict(spec.get("kwargs") or {}))
    return None


def _method_entry(i: int, item: Any, pairs: list, errors: list[str]) -> MethodEntry | None:
    item = {"name": item} if isinstance(item, str) else item
    if not isinstance(item, dict) or "name" not in item or set(item) - set(_ENTRY_KEYS):
        errors.append(
            f"methods[{i}]: {item!r} must be a method name or a mapping with `name` and "
            f"optionally {', '.join(_ENTRY_KEYS[1:])}"
        )
        return None
    label = str(item["name"])
    if not _LABEL_RE.match(label) or label.startswith("."):
        errors.append(f"methods[{i}]: name {label!r} may only hold letters, digits and _.+-")
        return None
    section = {"name": label, **(item.get("method") or {})}
    own = None
    if item.get("pairs") is not None:
        own = _pairs(item["pairs"], f"methods[{i}].pairs", errors)
        if missing := [p for p in own if p not in pairs]:
            errors.append(f"methods[{i}] ({label}): pair(s) {missing} are not in the suite's pairs")
    return MethodEntry(label, section, dict(item.get("config") or {}), own)


def parse_suite(data: dict[str, Any], path: Path | None = None) -> Suite:
    """Check the structure of a suite mapping (names are checked by :func:`validate`)."""
    errors: list[str] = []
    if unknown := sorted(set(data) - set(SUITE_KEYS)):
        errors.append(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SUITE_KEYS)}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        errors.append("base must be a mapping (a partial relkd config)")
        base = {}
    errors += [
        f"base.{key} is set by the suite (teachers come from `teachers` and `pairs`, run "
        "folders from the output folder); remove it"
        for key in ("teacher", "output_dir", "name")
        if key in base
    ]
    teachers = {
        str(n): t
        for n, spec in (data.get("teachers") or {}).items()
        if (t := _teacher_spec(str(n), spec, errors)) is not None
    }
    pairs = _pairs(data.get("pairs"), "pairs", errors)
    if not pairs:
        errors.append("pairs: give at least one [teacher, student] pair")
    if len(set(pairs)) != len(pairs):
        errors.append("pairs: a pair is listed twice")
    methods = [
        m
        for i, item in enumerate(data.get("methods") or [])
        if (m := _method_entry(i, item, pairs, errors)) is not None
    ]
    if not methods:
        errors.append("methods: give at least one method")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        errors.append(f"seeds must be a non-empty list of integers, got {seeds!r}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(
        isinstance(o, str) and "=" in o for o in overrides
    ):
        errors.append(f"overrides must be a list of key=value strings, got {overrides!r}")
    cache = data.get("teacher_cache", "off")
    cache = "off" if cache is False else str(cache)  # YAML reads a bare off as False
    if cache not in _CACHE_CHOICES:
        errors.append(f"teacher_cache={cache!r} is not valid; choose {', '.join(_CACHE_CHOICES)}")
    _fail(str(path) if path else "suite", errors)
    return Suite(
        name=str(data.get("name") or (path.stem if path else "suite")),
        path=path,
        base=base,
        teachers=teachers,
        pairs=pairs,
        methods=methods,
        seeds=list(seeds),
        overrides=[str(o) for o in overrides],
        reference=str(data["reference"]) if data.get("reference") else None,
        teacher_cache=cache,
        data_label=str(data["data_label"]) if data.get("data_label") else None,
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
    if len(parts) > 1 and set(args) - set(parts):
        bad = ", ".join(sorted(set(args) - set(parts)))
        return [f"method {name!r}: args must be keyed by part ({', '.join(parts)}); got {bad}"]
    errors = []
    for part, a in ({parts[0]: args} if len(parts) == 1 else args).items():
        params = inspect.signature(METHODS.get(part).__init__).parameters
        valid = [k for k in params if k not in ("self", "ctx")]
        errors += [
            f"method {part!r} has no argument {key!r} (valid: {', '.join(valid) or 'none'})"
            for key in a or {}
            if key not in valid
        ]
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
    parts = {p for e in suite.methods for p in _method_parts(e.section["name"])}
    unknown_methods = sorted(parts - registered)
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
        errors += [
            f"{e.label}: {msg}" for e in suite.methods for msg in _method_arg_errors(e.section)
        ]
    if missing := sorted({t for t, _ in suite.pairs if t is not None and t not in suite.teachers}):
        errors.append(
            f"teacher(s) {', '.join(missing)} are used in pairs but have no entry under "
            "`teachers` (give a checkpoint or a train recipe)"
        )
    _fail(str(suite.path) if suite.path else suite.name, errors)


# ------------------------------------------------------------------------------------ the grid
def _teacher_job(suite: Suite, spec: TeacherSpec, out: Path, overrides: list[str]) -> Job:
    from omegaconf import OmegaConf

    base = {k: v for k, v in suite.base.items() if k != "method"}
    cfg = _deep_merge(base, {"student": {"name": spec.name, "kwargs": dict(spec.kwargs)}})
    cfg["method"] = {"name": "ce"}
    # Suite / CLI overrides first (data roots, devices), then the teacher's own recipe.
    if overrides:
        cfg = _deep_merge(cfg, OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
    cfg = {**_deep_merge(cfg, spec.train or {}), "output_dir": str(out / "teachers")}
    cfg["name"] = _safe(spec.name)
    meta = {"suite": suite.name, "kind": "teacher", "teacher_of": spec.name}
    run_dir = out / "teachers" / _safe(spec.name)
    return Job(
        f"teacher/{_safe(spec.name)}", "teacher", run_dir, cfg, [], student=spec.name, meta=meta
    )


def build_grid(
    suite: Suite, out_dir: str | os.PathLike, overrides: Sequence[str] = ()
) -> tuple[list[Job], list[Job]]:
    """The suite's teacher jobs and run jobs (grid order: method, pair, seed)."""
    out = Path(out_dir)
    all_overrides = [*suite.overrides, *overrides]
    teacher_jobs: dict[str, Job] = {}
    runs: list[Job] = []
    for entry in suite.methods:
        needs_teacher = _requires_teacher(entry.section["name"])
        for t, s in entry.pairs or suite.pairs:
            if needs_teacher and t is None:
                continue  # a teacher-free pair only feeds teacher-free methods
            teacher = t if needs_teacher else None
            pair_dir = f"{_safe(teacher)}_{_safe(s)}" if teacher else _safe(s)
            for seed in suite.seeds:
                rid = f"{entry.label}/{pair_dir}/s{seed}"
                if any(j.id == rid for j in runs):
                    if teacher is None:
                        continue  # the same teacher-free student listed in several pairs
                    raise RelkdError(
                        f"suite {suite.name}: method {entry.label!r} is listed twice for pair "
                        f"{teacher} -> {s}; give the entries different names or disjoint `pairs`"
                    )
                cfg = _deep_merge(suite.base, entry.config)
                cfg = _deep_merge(cfg, {"student": {"name": s}, "method": entry.section})
                cfg = _deep_merge(cfg, {"train": {"seed": seed}})
                needs = None
                if teacher is not None:
                    spec = suite.teachers[teacher]
                    ckpt = spec.checkpoint
                    if not ckpt:
                        if teacher not in teacher_jobs:
                            teacher_jobs[teacher] = _teacher_job(suite, spec, out, all_overrides)
                        needs = teacher_jobs[teacher].id
                        ckpt = str(teacher_jobs[teacher].run_dir / "student.pt")
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
                cfg.update(output_dir=str(out), name=f"runs/{rid}")
                index = len(runs) + 1
                meta = {"suite": suite.name, "kind": "run", "id": rid, "method": entry.label}
                meta.update(method_name=entry.section["name"], teacher=teacher, student=s)
                meta.update(seed=seed, index=index, reference=suite.reference)
                if suite.data_label:
                    meta["data_label"] = suite.data_label
                job = Job(rid, "run", out / "runs" / rid, cfg, list(all_overrides), index=index)
                job.label, job.teacher, job.student, job.seed = entry.label, teacher, s, seed
                job.needs, job.meta = needs, meta
                if teacher is not None and _cache_on(cfg, all_overrides):
                    job.cache_group = _cache_group_lock(out, cfg, entry.section["name"])
                runs.append(job)
    for j in runs:
        j.total = j.meta["total"] = len(runs)
    return list(teacher_jobs.values()), runs


def _cache_on(cfg: dict[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the run asks for the teacher cache: its config, then the last override, wins."""
    mode = (cfg.get("train") or {}).get("teacher_cache", "off")
    for o in overrides:
        k, _, v = str(o).partition("=")
        if k.strip() == "train.teacher_cache":
            mode = v.strip().strip("'\"")
    return str(mode) not in ("off", "False", "false", "None", "none", "")


def _cache_group_lock(out: Path, cfg: dict[str, Any], method_name: str) -> Path:
    """The group lock of the runs that read one teacher cache: same teacher checkpoint, data
    section and teacher taps. Only a scheduling hint -- the cache's own key (teacher weights,
    images, transform, taps, dtype) decides what is shared, so a coarse or wrong group can make
    a worker idle or wait, never change a result."""
    import hashlib

    from relkd.methods import METHODS

    taps: list[str] = []
    for part in _method_parts(method_name):
        try:  # methods whose taps depend on their settings get a group of their own
            taps += METHODS.get(part).teacher_taps(None)
        except Exception:
            taps.append(f"method:{part}")
    ident = {
        "teacher": (cfg.get("teacher") or {}).get("checkpoint"),
        "data": cfg.get("data") or {},
        "dtype": (cfg.get("train") or {}).get("teacher_cache_dtype"),
        "taps": sorted(set(taps)),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    return out / ".locks" / f"cache-{digest[:16]}.lock"


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
            msg = f"unknown data set {cfg.data.name!r} (valid: {', '.join(DATASETS.names())})"
            errors.setdefault(msg, key)
    if errors:
        lines = [f"{where}: {msg}" for msg, where in errors.items()]
        raise RelkdError("suite configs are invalid:\n  - " + "\n  - ".join(lines))
    return missing_roots


# ------------------------------------------------------------------------------------ running
def run_lock(run_dir: Path) -> FileLock:
    """The lock that claims a run folder: an OS-level lock on ``<run>/.lock``, held while the run
    trains; the OS drops it when the holder exits, however it exits."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return FileLock(Path(run_dir) / ".lock")


def _comparable(yaml_text: str) -> Any:
    import yaml

    d = yaml.safe_load(yaml_text) or {}
    d.pop("output_dir", None)  # the same folder, spelled relative or absolute
    for sect, key in (k.split(".") for k in _ENV_KEYS):
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


#: The clock that times runs (monkeypatched by tests of the ETA arithmetic).
_clock = time.time


def format_eta(seconds: float | None) -> str:
    """``ETA 45 s`` / ``ETA 12 min`` / ``ETA 3.4 h``; ``ETA unknown`` for ``None``."""
    if seconds is None:
        return "ETA unknown"
    if seconds < 60:
        return f"ETA {seconds:.0f} s"
    if seconds < 100 * 60:
        return f"ETA {seconds / 60:.0f} min"
    return f"ETA {seconds / 3600:.1f} h"


def eta_seconds(run_times: Sequence[float], left: int, workers: int = 1) -> float | None:
    """Time left for ``left`` runs on ``workers`` processes at the mean of ``run_times`` (the
    wall times of the runs finished so far in this invocation); ``None`` before the first."""
    if not run_times:
        return None
    return sum(run_times) / len(run_times) * left / max(1, workers)


class _Progress:
    """Counts the selected grid's runs done (on disk, so runs finished by other workers count)
    and times the runs this process trains, for the ``[ k/N] finished; ETA ...`` lines."""

    def __init__(self, runs: list[Job], token: str, workers: int = 1):
        self.runs, self.token, self.workers = runs, token, workers
        self.run_times: list[float] = []

    def add(self, res: dict[str, Any]) -> None:
        if res["kind"] == "run" and res["status"] in ("trained", "resumed"):
            self.run_times.append(float(res["elapsed_s"]))

    def line(self) -> str:
        total = len(self.runs)
        done = sum(j.finished() or j.failed_in(self.token) is not None for j in self.runs)
        eta = eta_seconds(self.run_times, total - done, self.workers)
        text = f"[{done:>{len(str(total))}}/{total}] finished; {format_eta(eta)}"
        if self.run_times:
            n = len(self.run_times)
            mean = sum(self.run_times) / n
            text += f" (mean {mean:.1f} s over {n} run(s) here"
            text += f", {self.workers} workers)" if self.workers > 1 else ")"
        return text


def _tag(job: Job) -> str:
    if job.kind == "teacher":
        return f"[teacher] {job.student}"
    return f"[{job.index:>{len(str(job.total))}}/{job.total}] {job.id}"


def _result(job: Job, status: str, **kw: Any) -> dict[str, Any]:
    s = (_read_json(job.run_dir / "summary.json") or {}) if status != "failed" else {}
    out = {"id": job.id, "kind": job.kind, "method": job.label, "teacher": job.teacher}
    out.update(student=job.student, seed=job.seed, run_dir=str(job.run_dir), status=status)
    out.update(best_top1=s.get("best_top1"), last_top1=s.get("last_top1"), **kw)
    return out


def _execute(job: Job, token: str, quiet: bool, say) -> dict[str, Any]:
    """Train (or resume) one claimed job; failures are recorded, not raised."""
    import relkd

    resume = job.state() == "resume"
    t0 = _clock()
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
        rec = {
            "token": token,
            "error": msg,
            "traceback": traceback.format_exc(),
            "time": time.time(),
        }
        _write_json(job.run_dir / "failed.json", rec)
        dt = _clock() - t0
        say(f"{_tag(job)} FAILED after {dt:.1f} s: {msg}")
        return _result(job, "failed", elapsed_s=dt, error=msg)
    dt = _clock() - t0
    (job.run_dir / "failed.json").unlink(missing_ok=True)
    say(f"{_tag(job)} done in {dt:.1f} s: best {res['best_top1']:.2f} last {res['last_top1']:.2f}")
    return _result(job, "resumed" if resume else "trained", elapsed_s=dt, error=None)


def _claim_group(job: Job, groups: dict[Path, list[Job]]) -> FileLock | bool | None:
    """Before ``job`` is claimed: ``None`` if it needs no group lock (no cache, or a run of its
    group is through an epoch, so the cache exists), the acquired group lock if ``job`` may be
    the run that builds the cache, ``False`` if another process holds that lock. Workers thus
    never sit in the cache's build lock while other runs of the grid are waiting; a worker with
    nothing else left polls until the cache is built, as it would have waited in the lock."""
    if job.cache_group is None or any(j.started() for j in groups.get(job.cache_group, [job])):
        return None
    job.cache_group.parent.mkdir(parents=True, exist_ok=True)
    glock = FileLock(job.cache_group)
    try:
        glock.acquire(timeout=0)
    except Timeout:
        return False
    return glock


def _work(
    jobs: list[Job],
    token: str,
    quiet: bool,
    say,
    poll_s: float = 2.0,
    progress: _Progress | None = None,
) -> Iterator[dict[str, Any]]:
    """Work through ``jobs`` (teachers first), claiming each with its lock; yields the result of
    every job this process ran or failed. Waits for jobs held by other processes and for teachers
    being trained elsewhere, and returns when nothing is left to do. With ``progress``, prints
    its ``[ k/N] finished; ETA ...`` line after each job this process ran."""
    by_id = {j.id: j for j in jobs}
    groups: dict[Path, list[Job]] = {}
    for j in jobs:
        if j.cache_group is not None:
            groups.setdefault(j.cache_group, []).append(j)
    handled: set[str] = set()
    noted: set[str] = set()
    while True:
        waiting = ran = False
        for job in jobs:
            if job.id in handled or job.finished() or job.failed_in(token):
                handled.add(job.id)
                continue
            dep = by_id.get(job.needs) if job.needs else None
            if dep is not None and (failed := dep.failed_in(token)):
                msg = f"teacher {dep.student} failed: {failed.get('error')}"
                job.run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(job.run_dir / "failed.json", {"token": token, "error": msg})
                handled.add(job.id)
                say(f"{_tag(job)} skipped: {msg}")
                yield _result(job, "failed", elapsed_s=0.0, error=msg)
                continue
            if dep is not None and not dep.finished():
                waiting = True  # its teacher is being trained (here or elsewhere)
                continue
            glock = _claim_group(job, groups)
            if glock is False:
                # Another process runs the first run of this run's cache group, i.e. is
                # probably building the cache this run would block on: run other jobs first.
                if str(job.cache_group) not in noted:
                    say(
                        f"{_tag(job)} reads a teacher cache another process is building; "
                        "running other jobs first"
                    )
                noted.add(str(job.cache_group))
                waiting = True
                continue
            lock = run_lock(job.run_dir)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                if glock is not None:
                    glock.release()
                if job.id not in noted:
                    say(f"{_tag(job)} is being run by another process; waiting")
                noted.add(job.id)
                waiting = True
                continue
            try:
                res = None if job.finished() else _execute(job, token, quiet, say)
            finally:
                lock.release()
                if glock is not None:
                    glock.release()
            handled.add(job.id)
            if res is not None:
                ran = True
                if progress is not None:
                    progress.add(res)
                    say(progress.line())
                yield res
        if not waiting:
            return
        if not ran:
            time.sleep(poll_s)


def _printer(prefix: str = ""):
    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {prefix}{msg}", flush=True)

    return say


def _silent(msg: str) -> None:
    pass


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_env(wid: int, threads: int, gpus: list[str]) -> dict[str, str]:
    """Environment of worker ``wid``: its torch threads and, with GPUs, one GPU (round-robin)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[wid % len(gpus)]
    return env


def _run_pool(
    suite_path, out: Path, todo: list[Job], token: str, workers: int, opts: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``workers`` independent ``relkd bench accuracy`` processes on the same grid: they share it
    through the run locks, as separate invocations do. CPU: ``cpu_count // workers`` torch
    threads each; GPUs: CUDA_VISIBLE_DEVICES round-robin."""
    import subprocess

    gpus = _visible_gpus()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cpus or 1) // workers)
    cmd = [sys.executable, "-m", "relkd", "bench", "accuracy", str(suite_path), *opts["overrides"]]
    cmd += ["--out", str(out), "--no-report", *([] if opts["quiet"] else ["--verbose"])]
    if opts["only"]:
        only = opts["only"]
        cmd += ["--only", only if isinstance(only, str) else ",".join(only)]
    before = {j.id: j.state() for j in todo}
    procs = []
    for wid in range(workers):
        env = {**os.environ, **worker_env(wid, threads, gpus), "RELKD_BENCH_TOKEN": token}
        env["RELKD_BENCH_PREFIX"] = f"[w{wid}] "
        env["RELKD_BENCH_WORKERS"] = str(workers)  # for the workers' ETA
        stdout = None if opts["progress"] else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=stdout))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    if dead := [f"w{i} (exit {c})" for i, c in enumerate(codes) if c not in (0, 1)]:
        print(f"warning: worker(s) {', '.join(dead)} exited abnormally", file=sys.stderr)
    done = [j for j in todo if j.kind == "run" and j.finished()]
    return {j.id: _result(j, "resumed" if before[j.id] == "resume" else "trained") for j in done}


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
        progress: print one line per run start / finish, and after each finished run
            ``[ k/N] finished; ETA ...`` (runs done / all selected; time left from the mean
            wall time of the runs finished so far by this process in this call).

    Each dict holds ``id, kind, method, teacher, student, seed, run_dir, status, best_top1,
    last_top1`` (+ ``elapsed_s``, ``error``). ``status``: ``trained`` / ``resumed`` (by this
    call), ``skipped`` (finished before, or by another process meanwhile), ``failed``,
    ``incomplete`` (left unfinished, e.g. a worker was killed) or, with ``dry_run``,
    ``planned`` (with ``state``: finished / resume / new).

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
    teachers = [t for t in teachers if t.id in {j.needs for j in runs}]
    missing = {
        "data root(s) not found: ": sorted(_validate_configs(teachers, runs)),
        "teacher checkpoint(s) not found: ": sorted(
            {
                str(j.config["teacher"]["checkpoint"])
                for j in runs
                if j.needs is None
                and j.teacher
                and not Path(j.config["teacher"]["checkpoint"]).expanduser().is_file()
            }
        ),
    }
    hints = [
        " (set data.root=DIR on the command line or the variable the suite reads)",
        " (download the RepDistiller / mdistiller teachers or change `teachers` in the suite)",
    ]
    say = _printer(os.environ.get("RELKD_BENCH_PREFIX", "")) if progress else _silent
    if dry_run:
        say(f"suite {suite.name}: {len(runs)} run(s) in {out} (dry run, nothing is trained)")
        for t in teachers:
            say(f"  teacher {t.student}: {t.state().replace('new', 'train')} -> {t.run_dir}")
        for what, items in missing.items():
            for m in items:
                say(f"  warning: {what.strip()} {m} (a real run would stop here)")
        for j in runs:
            say(f"  {_tag(j)}: {j.state()}")
        return [_result(j, "planned", state=j.state()) for j in runs]
    for (what, items), hint in zip(missing.items(), hints):
        if items:
            raise RelkdError(what + ", ".join(items) + hint)
    # Workers of a pool (below) record failures under their parent's token.
    token = os.environ.get("RELKD_BENCH_TOKEN") or uuid.uuid4().hex
    t0 = time.time()
    todo = [j for j in [*teachers, *runs] if not j.finished()]
    say(
        f"suite {suite.name}: {len(runs)} run(s), {sum(j.finished() for j in runs)} finished "
        f"before, {len(teachers)} teacher(s) to train or reuse; output {out}"
    )
    if not todo:
        results: dict[str, dict[str, Any]] = {}
    elif workers <= 1:
        # A pool worker (its parent set RELKD_BENCH_WORKERS) shares the grid with the others.
        shared = int(os.environ.get("RELKD_BENCH_WORKERS") or 1)
        prog = _Progress(runs, token, shared)
        if shared <= 1:
            say(prog.line())
        results = {res["id"]: res for res in _work(todo, token, quiet, say, progress=prog)}
    else:
        opts = {"overrides": list(overrides), "only": only, "quiet": quiet, "progress": progress}
        results = _run_pool(suite_path, out, todo, token, workers, opts)
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
    tally = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    say(f"suite {suite.name} in {time.time() - t0:.0f} s: {tally}")
    return final
