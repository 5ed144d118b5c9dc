"""Accuracy benchmark suites, defined: the YAML format, its checks, and the grid of runs it expands to.

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
      - mypkg.methods:MyKD                 # your own method by import path (row label: MyKD)
    seeds: [0, 1, 2]
    overrides: [train.epochs=4]            # key=value on every run (CLI overrides come after)

Models in ``teachers`` and ``pairs`` and methods may be import paths (``mypkg.models:ResNetA``,
:mod:`relkd.plugins`) or names that packages register through entry points.

The grid is every method entry x its pairs x seeds. Methods that need no teacher (``ce``,
``corsd``) run once per *student* (the teacher of the pair is dropped); methods that need one
skip pairs whose teacher is null. Layout under the output folder::

    teachers/<teacher>/                       teachers trained by the suite (plain relkd runs)
    runs/<method>/<teacher>_<student>/s<seed>/   one relkd run folder each (+ bench.json)
    runs/<method>/<student>/s<seed>/              teacher-free methods

Everything that can be wrong with a suite (unknown methods, models, data sets, method
arguments, config keys, teachers without a checkpoint or recipe) fails before any training,
naming all the bad entries at once.

Running a grid (claiming, resuming, workers, progress, the teacher cache): :mod:`relkd.bench.accuracy`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relkd.registry import RelkdError, own_hint

SUITE_KEYS = ("name", "description", "reference", "data_label", "base", "teachers", "pairs")
SUITE_KEYS += ("methods", "seeds", "overrides", "teacher_cache", "slurm")
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
    slurm: dict[str, Any] | None = None  # sbatch options of the Slurm launcher (bench.slurm)


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
    #: claim file a worker holds while it runs the group's first run, None without a cache.
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
    from relkd._fs import read_text

    try:
        return json.loads(read_text(path, "json"))
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
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from relkd._fs import open_regular

    if not path.exists():
        raise RelkdError(f"suite file {str(path)!r} does not exist")
    try:
        from relkd._yaml import load_yaml  # YAML 1.2 booleans, as config files

        with open_regular(path, "config", "suite file") as f:
            raw = load_yaml(f)
        if not isinstance(raw, DictConfig):
            raise RelkdError(f"suite file {str(path)!r} must hold a mapping at the top")
        # resolve=True expands ${oc.env:VAR,default} (data roots from the environment)
        data = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as e:
        raise RelkdError(f"suite file {str(path)!r}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:  # unclosed bracket, duplicate key, recursive or huge aliases
        from relkd.config import yaml_error

        raise yaml_error(f"suite file {str(path)!r}", e) from None
    except ValueError as e:
        raise RelkdError(f"suite file {str(path)!r} is not valid YAML: {e}") from None
    except OSError as e:  # not a regular file, too large, unreadable
        raise RelkdError(str(e) if e.strerror is None else f"suite file {str(path)!r}: {e}") from e
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
    if isinstance(item, str) and ":" in item:
        # A method of one's own by import path ("mypkg.methods:MyKD", "mypkg.methods:MyKD+kd"):
        # the row label (and run folder) is its attribute name, the config keeps the path.
        label = "+".join(p.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1] for p in item.split("+"))
        item = {"name": label, "method": {"name": item}}
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
        slurm=data.get("slurm"),
    )


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and structurally check a suite file (see the module docstring for the format)."""
    p = Path(path)
    return parse_suite(_read_yaml(p), p)


# ----------------------------------------------------------------------------- name checks
def _method_parts(name: str) -> list[str]:
    from relkd.methods import MethodSpec

    return list(MethodSpec.split(name))


def _requires_teacher(method_name: str) -> bool:
    from relkd.methods import MethodSpec

    return MethodSpec.parse(method_name).requires_teacher


def _method_arg_errors(section: dict[str, Any]) -> list[str]:
    """The method spec's errors (:class:`relkd.methods.MethodSpec`: the messages ``relkd
    train`` gives for the same mistake), all of them."""
    from relkd.methods import MethodSpec

    try:
        spec = MethodSpec.parse(str(section.get("name")), section.get("args"))
    except RelkdError as e:
        return [str(e)]
    return spec.argument_errors()


def _model_known(name: str) -> bool:
    from relkd.models import MODELS
    from relkd.plugins import is_import_path

    if is_import_path(name):
        MODELS.get(name)  # imported once here; a bad path is one line naming it
        return True
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
    from relkd.methods import METHODS, list_methods
    from relkd.plugins import is_import_path

    registered = set(list_methods())
    parts = {p for e in suite.methods for p in _method_parts(e.section["name"])}
    errors = []
    # Import paths are imported here, once, before anything else is checked; a bad one is its
    # own line (module not found, attribute not found, not a method / model).
    for p in sorted(x for x in parts if is_import_path(x)):
        try:
            METHODS.get(p)
        except RelkdError as e:
            errors.append(str(e))
    unknown_methods = sorted(x for x in parts - registered if not is_import_path(x))
    models = {m for pair in suite.pairs for m in pair if m is not None}
    unknown_models = []
    for m in sorted(models):
        try:
            if not _model_known(m):
                unknown_models.append(m)
        except RelkdError as e:
            errors.append(str(e))
    if unknown_methods:
        errors.append(
            f"unknown method(s): {', '.join(unknown_methods)} (registered: "
            f"{', '.join(sorted(registered))}; {own_hint('method')})"
        )
    if unknown_models:
        errors.append(
            f"unknown model(s): {', '.join(unknown_models)} (zoo: relkd list models; "
            f"torchvision:<name>, timm:<name> with timm installed; {own_hint('model')})"
        )
    if not unknown_methods and not errors:
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

    from relkd._yaml import strict_dotlist

    base = {k: v for k, v in suite.base.items() if k != "method"}
    cfg = _deep_merge(base, {"student": {"name": spec.name, "kwargs": dict(spec.kwargs)}})
    cfg["method"] = {"name": "ce"}
    # Suite / CLI overrides first (data roots, devices), then the teacher's own recipe.
    if overrides:
        cfg = _deep_merge(cfg, OmegaConf.to_container(strict_dotlist(overrides)))
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
    """The group claim of the runs that read one teacher cache: same teacher checkpoint, data
    section and teacher taps. Only a scheduling hint -- the cache's own key (teacher weights,
    images, transform, taps, dtype) decides what is shared, so a coarse or wrong group can make
    a worker idle or wait, never change a result."""
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
            valid = ", ".join(DATASETS.names())
            msg = f"unknown data set {cfg.data.name!r} (valid: {valid}; {own_hint('dataset')})"
            errors.setdefault(msg, key)
    if errors:
        lines = [f"{where}: {msg}" for msg, where in errors.items()]
        raise RelkdError("suite configs are invalid:\n  - " + "\n  - ".join(lines))
    return missing_roots
