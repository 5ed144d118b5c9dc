"""The data of a report: recipes and data-set names, the run folders read back
(:class:`RunRecord`) and their grouping into (method, teacher, student, data set) rows
(:class:`Group`). The tables and files are written by :mod:`relkd.bench.report`."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What the registry's data set names are, in words.
DATA_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "fashion_mnist": "Fashion-MNIST",
    "stl10": "STL-10",
    "tiny_imagenet": "Tiny-ImageNet",
    "cub200": "CUB-200-2011",
    "imagenet": "ImageNet",
    "imagefolder": "image folder",
    "folder_jpg": "JPEG folder",
}
#: Folder data sets named after their root folder: (pattern on the folder name, what it is).
_ROOT_NAMES = [
    (re.compile(r"cifar[-_]?100", re.I), "CIFAR-100"),
    (re.compile(r"cifar[-_]?10", re.I), "CIFAR-10"),
    (re.compile(r"imagenet|ilsvrc", re.I), "ImageNet"),
]
_JPEG = re.compile(r"jpe?g", re.I)
#: Recipe fields listed when a row's recipe differs from its table's, in this order.
_DIFF_KEYS = ("subset", "epochs", "batch", "optimizer", "lr", "weight_decay", "schedule")
_DIFF_KEYS += ("steps_per_epoch", "val_split", "test_subset")


def data_label(name: str, root: str | None = None, label: str | None = None) -> str:
    """``"CIFAR-10 JPEG"`` for ``folder_jpg`` on a ``cifar10-jpg`` folder, ``"CIFAR-100"`` for
    ``cifar100``; ``label`` (a suite's ``data_label``) wins."""
    if label:
        return label
    if name in ("folder_jpg", "imagefolder") and root:
        base = Path(str(root).rstrip("/")).name
        for pat, what in _ROOT_NAMES:
            if pat.search(base):
                return f"{what} JPEG" if name == "folder_jpg" or _JPEG.search(base) else what
        return f"{DATA_NAMES[name]} {base}"
    return DATA_NAMES.get(name, name)


def _schedule(s: dict[str, Any]) -> str | None:
    name = s.get("name")
    if name == "multistep":
        steps = ",".join(str(m) for m in s.get("milestones") or [])
        text = f"multistep {steps} ×{float(s.get('gamma', 0.1)):g}"
    else:
        text = {"onecycle": "one-cycle"}.get(name, name)
    if text and s.get("warmup_epochs"):
        text += f", {float(s['warmup_epochs']):g}-epoch warm-up"
    return text


def recipe_of(cfg: dict[str, Any], student: str, label: str | None = None) -> dict[str, Any]:
    """The recipe of a run from its resolved ``config.yaml`` (keys of :data:`_DIFF_KEYS`, ``data``
    and ``dataset``); a key the config lacks is None."""
    data, optim = cfg.get("data") or {}, cfg.get("optim") or {}
    train = cfg.get("train") or {}
    lr = (optim.get("lr_by_student") or {}).get(student, optim.get("lr"))
    return {
        "data": data_label(str(data.get("name")), data.get("root"), label),
        "dataset": data.get("name"),
        "subset": data.get("train_subset"),
        "epochs": train.get("epochs"),
        "batch": data.get("batch_size"),
        "optimizer": optim.get("name"),
        "lr": lr,
        "weight_decay": optim.get("weight_decay"),
        "schedule": _schedule(cfg.get("schedule") or {}),
        "steps_per_epoch": train.get("max_steps_per_epoch"),
        # A run with data.val_split is evaluated on that hold-out of the training set, not on
        # the test set: the report must say which (issue 17: choices are made on validation).
        "val_split": _val_text(data) if data.get("val_split") else None,
        # A capped evaluation set (data.test_subset) is not the split: the report says so.
        "test_subset": data.get("test_subset"),
    }


def _val_text(data: dict[str, Any]) -> str:
    frac = float(data["val_split"])
    return f"{100 * frac:g} % validation hold-out (val_seed {data.get('val_seed', 0)})"


def eval_split(recipes: list[dict[str, Any]]) -> str:
    """What the top-1 numbers of runs with these recipes are measured on: ``"test split"``,
    ``"validation split"`` (every run has ``data.val_split``) or both named."""
    vals = {bool(r.get("val_split")) for r in recipes}
    if vals == {True}:
        return "validation split"
    if vals == {False} or not vals:
        return "test split"
    return "test or validation split (see each table's recipe)"


def eval_set_text(recipes: list[dict[str, Any]], images: list[int | None] = ()) -> str:
    """The evaluation set in words, e.g. ``"the test split (10000 images)"`` or ``"a stratified
    2000-image subset of the test split"``; ``images``: the runs' recorded evaluation-set sizes
    (``summary.json`` ``eval_images``; None for runs written before it was recorded)."""
    split = eval_split(recipes)
    subsets = {r.get("test_subset") for r in recipes}
    sizes = sorted({n for n in images if n is not None})
    n = f" ({sizes[0]} images)" if len(sizes) == 1 else ""
    if subsets == {None} or not subsets:
        return f"the {split}{n}"
    if len(subsets) == 1:
        return f"a stratified {subsets.pop()}-image subset of the {split}{n}"
    return f"subsets of the {split} (data.test_subset differs: see each table's recipe)"


def _recipe_part(key: str, v: Any) -> str:
    return {
        "subset": f"{v}-image training subset" if v else "full training set",
        "epochs": f"{v} epoch{'' if v == 1 else 's'}",
        "batch": f"batch {v}",
        "optimizer": str(v).upper() if v == "sgd" else str(v),
        "lr": f"lr {v:g}" if isinstance(v, (int, float)) else f"lr {v}",
        "weight_decay": f"wd {v:g}" if isinstance(v, (int, float)) else f"wd {v}",
        "schedule": f"{v} schedule",
        "steps_per_epoch": f"at most {v} steps per epoch" if v else "every step of each epoch",
        "val_split": f"top-1 on a {v}" if v else "top-1 on the test split",
        "test_subset": f"top-1 on a {v}-image evaluation subset"
        if v
        else "the whole evaluation split",
    }[key]


def recipe_text(r: dict[str, Any]) -> str:
    keys = [k for k in _DIFF_KEYS if r.get(k) is not None or k == "subset"]
    keys = [k for k in keys if k == "subset" or r.get(k) is not None]
    return ", ".join([r.get("data") or "?", *(_recipe_part(k, r.get(k)) for k in keys)])


@dataclass
class RunRecord:
    run_dir: Path
    method: str
    teacher: str | None
    student: str
    seed: int
    dataset: str
    order: int = 10**9
    best: float | None = None
    last: float | None = None
    curve: dict[int, float] = field(default_factory=dict)  # epoch -> top-1
    method_name: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None  # train time of the run (summary.json)
    eval_images: int | None = None  # size of the evaluation set (summary.json; newer runs)
    cfg: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.best is not None


@dataclass
class Group:
    method: str
    teacher: str | None
    student: str
    dataset: str
    runs: list[RunRecord]
    unfinished: int = 0
    method_name: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.method, self.teacher, self.student, self.dataset)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def best(self) -> list[float]:
        return [float(r.best) for r in self.runs]

    @property
    def last(self) -> list[float]:
        return [float(r.last) for r in self.runs]

    @property
    def times(self) -> list[float]:
        return [r.time_s for r in self.runs if r.time_s is not None]

    @property
    def eval_images(self) -> list[int | None]:
        return [r.eval_images for r in self.runs]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _read_json(path: Path) -> Any:
    from relkd._fs import read_text

    try:
        return json.loads(read_text(path, "json"))
    except (OSError, ValueError):
        return None


class Unreadable(Exception):
    """A folder the report cannot read (damaged or foreign files); the message says why."""


def _mapping(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise Unreadable(f"{what} is a {type(obj).__name__}, not a mapping")
    return obj


def _number(v: Any, what: str) -> float:
    """A finite number from a run file (a bool, a string, NaN or inf is damage)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Unreadable(f"{what} is {v!r}, not a finite number")
    return float(v)


def _integer(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Unreadable(f"{what} is {v!r}, not an integer")
    return v


def _text(v: Any, what: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise Unreadable(f"{what} is {v!r}, not a string")
    return v


#: The teacher label of a run that distilled from an ``nn.Module`` passed to :func:`relkd.train`
#: (its config names no teacher).
PYTHON_TEACHER = "teacher passed from Python"


def _needs_teacher(method_name: str) -> bool:
    from relkd.methods import MethodSpec

    try:
        return MethodSpec.parse(method_name).requires_teacher
    except Exception:  # not a registered method (renamed since, or a foreign run folder)
        return False


def _read_run(run_dir: Path) -> RunRecord | None:
    """The record of one run folder; None when its ``config.yaml`` is not a relkd config (a
    stray file); :class:`Unreadable` when its files are damaged."""
    import yaml

    from relkd._fs import open_regular, read_text
    from relkd._yaml import strict_load

    try:
        cfg = strict_load(read_text(run_dir / "config.yaml", "config"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise Unreadable(f"config.yaml cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not {"student", "method", "train"} <= set(cfg):
        raise Unreadable("config.yaml is not a relkd run config (no student / method / train)")
    for sect in ("student", "method", "train", "data", "optim", "schedule"):
        _mapping(cfg.get(sect), f"config.yaml section {sect!r}")
    teacher_cfg = _mapping(cfg.get("teacher"), "config.yaml section 'teacher'")
    meta = _read_json(run_dir / "bench.json") if (run_dir / "bench.json").exists() else None
    if (run_dir / "bench.json").exists() and meta is None:
        raise Unreadable("bench.json cannot be read")
    meta = _mapping(meta, "bench.json")
    method_cfg = cfg["method"]
    student = str(_text(meta.get("student"), "bench.json student") or cfg["student"].get("name"))
    seed = meta.get("seed", cfg["train"].get("seed", 0))
    teacher = meta.get("teacher", teacher_cfg.get("name"))
    rec = RunRecord(
        run_dir=run_dir,
        method=str(_text(meta.get("method"), "bench.json method") or method_cfg.get("name")),
        teacher=_text(teacher, "the teacher's name"),
        student=student,
        seed=_integer(seed, "the seed"),
        dataset=str(
            _text(meta.get("reference"), "bench.json reference") or cfg["data"].get("name") or "?"
        ),
        order=_integer(meta.get("index", 10**9), "bench.json index"),
        method_name=str(
            _text(meta.get("method_name"), "bench.json method_name") or method_cfg.get("name")
        ),
        recipe=recipe_of(cfg, student, _text(meta.get("data_label"), "bench.json data_label")),
        cfg=cfg,
    )
    from relkd.plugins import PYTHON_MODULE

    if isinstance(rec.teacher, str) and rec.teacher.startswith(PYTHON_MODULE):
        # a teacher module passed from Python that relkd cannot import (config.yaml says so)
        rec.teacher = f"{PYTHON_TEACHER} ({rec.teacher.rsplit('.', 1)[-1]})"
    elif rec.teacher is None and _needs_teacher(rec.method_name):
        rec.teacher = PYTHON_TEACHER
        # The engine records the module's class in run.json (modules_from_python).
        sessions = (_read_json(run_dir / "run.json") or {}).get("sessions") or [{}]
        given = (sessions[-1] if isinstance(sessions[-1], dict) else {}).get("modules_from_python")
        cls = ((given or {}).get("teacher") or {}).get("class")
        if isinstance(cls, str) and cls:
            rec.teacher = f"{PYTHON_TEACHER} ({cls.rsplit('.', 1)[-1]})"
    if (run_dir / "summary.json").exists():
        summary = _mapping(_read_json(run_dir / "summary.json"), "summary.json")
        if not summary:
            raise Unreadable("summary.json cannot be read")
        if summary.get("best_top1") is not None:
            rec.summary = summary
            rec.best = _number(summary["best_top1"], "summary.json best_top1")
            rec.last = _number(summary.get("last_top1"), "summary.json last_top1")
            if summary.get("train_time_s") is not None:
                rec.time_s = _number(summary["train_time_s"], "summary.json train_time_s")
            if summary.get("eval_images") is not None:
                rec.eval_images = _integer(summary["eval_images"], "summary.json eval_images")
    if (run_dir / "metrics.jsonl").exists():
        try:
            with open_regular(run_dir / "metrics.jsonl", "metrics", "metrics.jsonl") as f:
                lines = f.read().decode("utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise Unreadable(f"metrics.jsonl cannot be read ({e})") from None
        for i, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run (never written by relkd itself)
            r = _mapping(r, f"metrics.jsonl line {i}")
            if "top1" in r and "phase" not in r:
                epoch = _integer(r.get("epoch"), f"metrics.jsonl line {i} epoch")
                rec.curve[epoch] = _number(r["top1"], f"metrics.jsonl line {i} top1")
    return rec


def collect_runs(
    runs_dir: str | Path, skipped: list[tuple[Path, str]] | None = None
) -> list[RunRecord]:
    """Every run folder (one holding ``config.yaml``) under ``runs_dir``. A folder whose files
    cannot be read (damaged, foreign, of the wrong types) is left out and, with ``skipped``,
    appended there as ``(folder, why)``: one bad folder never stops a report."""
    out = []
    for c in sorted(Path(runs_dir).rglob("config.yaml")):
        try:
            rec = _read_run(c.parent)
        except (Unreadable, OSError, RecursionError, TypeError, ValueError, AttributeError) as e:
            # Unreadable: what the checks above found; the others: a value of a type no relkd
            # run has, met further down (e.g. a schedule's milestones that are not a list).
            if skipped is not None:
                skipped.append((c.parent, str(e) or type(e).__name__))
            continue
        if rec is not None:
            out.append(rec)
    return out


def _common(recipes: list[dict[str, Any]]) -> dict[str, Any]:
    """The most frequent recipe (ties: the first seen)."""
    if not recipes:
        return {}
    keyed = [json.dumps(r, sort_keys=True) for r in recipes]
    return json.loads(Counter(keyed).most_common(1)[0][0])


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
    return out


def _label_variants(records: list[RunRecord]) -> None:
    """Runs of one method whose method settings differ (``relkd train`` runs of kd at two
    temperatures) are variants, not seeds: their label gets the differing settings,
    ``kd (args.temperature=2.0)``, so each variant is a row of its own."""
    by: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in records:
        by[(r.method, r.teacher, r.student, r.dataset)].append(r)
    for rs in by.values():
        flat = [_flat(r.cfg.get("method") or {}) for r in rs]
        keys = sorted(
            k
            for k in {k for f in flat for k in f}
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
        )
        for r, f in zip(rs, flat) if keys else ():
            r.method = f"{r.method} ({', '.join(f'{k}={f.get(k)}' for k in keys)})"


def group_runs(records: list[RunRecord]) -> list[Group]:
    """Finished runs grouped by (method, teacher, student, data set), in suite order; runs of
    one method with different method settings are separate rows (:func:`_label_variants`)."""
    _label_variants(records)
    groups: dict[tuple, Group] = {}
    first: dict[tuple, int] = {}
    recipes: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = (r.method, r.teacher, r.student, r.dataset)
        g = groups.setdefault(key, Group(*key, runs=[], method_name=r.method_name))
        first[key] = min(first.get(key, r.order), r.order)
        recipes.setdefault(key, []).append(r.recipe)
        if r.finished:
            g.runs.append(r)
        else:
            g.unfinished += 1
    for key, g in groups.items():
        g.runs.sort(key=lambda r: r.seed)
        g.recipe = _common(recipes[key])
    return sorted(groups.values(), key=lambda g: (first[g.key], g.method != "ce", g.method))
