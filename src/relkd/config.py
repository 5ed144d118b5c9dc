"""Typed, strict run configuration (OmegaConf structured configs over dataclasses).

A run config is YAML with the sections below; ``key=value`` overrides are merged on top. Unknown
keys and wrong types fail at load time with a message naming the key and the valid ones. Library
classes never read this object: :mod:`relkd.engine` turns it into plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from relkd._yaml import load_yaml, strict_dotlist
from relkd.registry import RelkdError


@dataclass
class ModelConfig:
    name: str = MISSING  # zoo name, torchvision:<name> or timm:<name>
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # weights to load (RepDistiller format, bare state dict, ...)
    # Pretrained weights from the local cache: a torchvision weights enum name (IMAGENET1K_V1,
    # DEFAULT) or, for timm models, "pretrained" / a pretrained tag; never downloaded.
    weights: str | None = None
    # The statistics the model was trained on (one value per channel); None: the model's own
    # (weights enum / timm pretrained_cfg / model.input_mean), else the data set's.
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 2
    augment: bool = True
    in_memory: str = "auto"  # auto | true | false: whole set as a tensor, batched augmentation
    train_subset: int | None = None  # first-n stratified subset (demos, smoke runs)
    image_size: int | None = None
    # Stratified hold-out of the training set for choosing variants (evaluation then runs on it,
    # the test set stays untouched): a fraction in (0, 1); the split is fixed by val_seed alone.
    val_split: float | None = None
    val_seed: int = 0
    test_subset: int | None = None  # cap the evaluation set (stratified; smoke runs)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # The CRD protocol's per-student rule: lr 0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2.
    lr_by_student: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    name: str = "multistep"  # multistep | cosine | onecycle | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    pct_start: float = 0.3  # onecycle: fraction of steps spent rising
    # onecycle, as torch's OneCycleLR: start lr/div_factor, end start/final_div_factor, and
    # momentum (SGD) / beta1 (AdamW) cycled max -> base -> max.
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass
class MethodConfig:
    name: str = "kd"  # a registered method or a composition "a+b"
    ce_weight: float | None = None  # None: the method's default (kd 0.1, others 1.0)
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the method


@dataclass
class TrainConfig:
    epochs: int = 240
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # At most this many optimizer steps per epoch (smoke tests, short runs); with
    # grad_accum_steps k each step is k micro-batches, so k x this many batches are read.
    max_steps_per_epoch: int | None = None
    eval_every: int = 1
    progress: bool = True
    deterministic: bool = False
    grad_clip: float | None = None
    on_nonfinite: str = "stop"  # stop | skip
    tensorboard: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = (
        "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    )
    log_every: int = (
        50  # steps between host reads of the loss sums (progress bar, non-finite check)
    )
    # Under DDP: batch norm statistics over the global batch (N ranks at batch b then train like
    # one process at N*b). Off by default, as in the CRD / mdistiller recipes (per-GPU BN).
    sync_bn: bool = False
    # Exact teacher-output cache (relkd.data.teacher_cache): off | auto (under the relkd cache
    # folder, keyed by teacher + data + transform) | PATH (that folder; a stale cache there is
    # refused). KD-family methods on in-memory data then run no teacher forward pass.
    teacher_cache: str = "off"
    teacher_cache_dtype: str = "fp16"  # fp16 | fp32: storage of the cached / replayed outputs
    # FKD-style replay (relkd.data.replay) for RandomResizedCrop on file-based data: off | auto
    # (under the relkd cache folder) | PATH. Crops then follow replay_seed, not seed, so every
    # method and seed of a table shares them and the teacher's stored outputs.
    teacher_replay: str = "off"
    replay_seed: int = 0
    # Exponential moving average of the student's weights (0: off). When on, the averaged
    # weights are what is evaluated, saved as student_best.pt / student.pt and exported; decay
    # warms up as min(ema_decay, (1 + t) / (10 + t)) over the first updates t (docs/architecture.md).
    ema_decay: float = 0.0
    # Micro-batches (of data.batch_size each) per optimizer step; the lr schedule counts
    # optimizer steps. 1: every batch is a step (docs/architecture.md: what differs for k > 1).
    grad_accum_steps: int = 1


#: Keys added after runs were recorded, with the value that keeps the old behaviour: a run
#: folder recorded without the key resumes when the key has this value.
ADDED_KEYS: dict[str, Any] = {"train.ema_decay": 0.0, "train.grad_accum_steps": 1}


@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    name: str | None = None  # run folder under output_dir; default <method>_<student>_s<seed>


CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("sgd", "adamw"),
    "schedule.name": ("multistep", "cosine", "onecycle", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.on_nonfinite": ("stop", "skip"),
    "data.in_memory": ("auto", "true", "false"),
    "train.teacher_cache_dtype": ("fp16", "fp32"),
    # torch.compile's modes (checked here, so --print-config refuses a typo too)
    "train.compile_mode": (
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ),
}
POSITIVE: tuple[str, ...] = (
    "optim.lr",
    "train.epochs",
    "data.batch_size",
    "data.eval_batch_size",
    "train.eval_every",
)


def _fields_of(node: Any) -> list[str]:
    t = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if t is not None and dataclasses.is_dataclass(t):
        return [f.name for f in dataclasses.fields(t)]
    return []


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> RelkdError:
    key = getattr(e, "full_key", None) or ""
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0].rstrip(".")
    parent = schema
    parts = key.split(".") if key else []
    for p in parts[:-1]:
        nxt = parent.get(p) if isinstance(parent, DictConfig) else None
        if not isinstance(nxt, DictConfig):
            if p in ("teacher",):
                nxt = OmegaConf.structured(ModelConfig)
            else:
                break
        parent = nxt
    valid = _fields_of(parent)
    unknown = "not in" in msg
    hint = f" Valid keys here: {', '.join(valid)}." if valid and unknown else ""
    return RelkdError(f"config error at {key!r}: {msg}.{hint}")


#: Seeds go to torch.manual_seed / numpy, which take unsigned 64-bit values; relkd mixes them
#: into signed int64 arithmetic, so the largest accepted seed is 2**63 - 1.
MAX_SEED = 2**63 - 1


def _bad(dotted: str, value: Any, want: str) -> RelkdError:
    return RelkdError(f"{dotted}={value!r} is not valid: {want}")


def _validate_values(cfg: Config) -> None:
    """Ranges of the numeric fields: values that would train silently wrong or crash later."""
    o, s, t, d = cfg.optim, cfg.schedule, cfg.train, cfg.data
    rules: list[tuple[str, Any, bool, str]] = [
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "must be in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "must be >= 0"),
        ("schedule.gamma", s.gamma, s.gamma > 0, "must be > 0 (the lr factor at a milestone)"),
        ("schedule.min_lr", s.min_lr, 0 <= s.min_lr <= o.lr, f"must be in [0, optim.lr={o.lr}]"),
        ("schedule.pct_start", s.pct_start, 0 < s.pct_start < 1, "must be in (0, 1)"),
        (
            "schedule.warmup_epochs",
            s.warmup_epochs,
            0 <= s.warmup_epochs < t.epochs,
            f"must be in [0, train.epochs={t.epochs})",
        ),
        ("train.seed", t.seed, 0 <= t.seed <= MAX_SEED, "must be in 0 .. 2**63 - 1"),
        ("train.replay_seed", t.replay_seed, 0 <= t.replay_seed <= MAX_SEED, "0 .. 2**63 - 1"),
        ("data.val_seed", d.val_seed, 0 <= d.val_seed <= MAX_SEED, "must be in 0 .. 2**63 - 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "must be >= 0"),
        ("train.log_every", t.log_every, t.log_every >= 1, "must be >= 1 (steps between reads)"),
        ("train.ema_decay", t.ema_decay, 0 <= t.ema_decay < 1, "must be in [0, 1) (0: off)"),
        ("train.grad_accum_steps", t.grad_accum_steps, t.grad_accum_steps >= 1, "must be >= 1"),
    ]
    optional: list[tuple[str, Any, Any, str]] = [
        ("train.grad_clip", t.grad_clip, lambda v: v > 0, "must be > 0 (or null: no clipping)"),
        ("train.max_steps_per_epoch", t.max_steps_per_epoch, lambda v: v > 0, "must be > 0"),
        ("data.train_subset", d.train_subset, lambda v: v >= 1, "must be >= 1 (or null: all)"),
        ("data.test_subset", d.test_subset, lambda v: v >= 1, "must be >= 1 (or null: all)"),
        ("data.val_split", d.val_split, lambda v: 0 < v < 1, "must be a fraction in (0, 1)"),
        ("data.image_size", d.image_size, lambda v: v > 0, "must be > 0"),
        ("method.ce_weight", cfg.method.ce_weight, lambda v: v >= 0, "must be >= 0"),
    ]
    rules += [(k, v, v is None or ok(v), w) for k, v, ok, w in optional]
    if o.name == "adamw":
        ok = len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)
        rules.append(("optim.betas", o.betas, ok, "AdamW needs two values in [0, 1)"))
    for name, lr in o.lr_by_student.items():
        rules.append((f"optim.lr_by_student.{name}", lr, lr > 0, "must be > 0"))
    for dotted, value, ok, want in rules:
        if not ok:
            raise _bad(dotted, value, want)
    for m in s.milestones:
        if m < 0:
            raise RelkdError(f"schedule.milestones has a negative epoch: {m}")
    if any(b <= a for a, b in zip(s.milestones, s.milestones[1:])):
        # torch's MultiStepLR counts a repeated milestone twice and an unsorted list silently
        # changes where the decays fall: a typo, not a schedule.
        raise _bad("schedule.milestones", list(s.milestones), "must be strictly increasing epochs")
    if cfg.method.name == "ce" and cfg.method.ce_weight == 0:
        raise _bad("method.ce_weight", 0, "method ce with ce_weight 0 has no loss to train on")
    if t.grad_accum_steps > 1 and t.on_nonfinite == "skip":
        # Checked with the config (so --print-config refuses it too), again in the step.
        raise RelkdError(
            f"train.grad_accum_steps={t.grad_accum_steps} with train.on_nonfinite=skip is not "
            "supported (a skipped micro-batch would leave a partial gradient): use stop"
        )
    for sect in ("student", "teacher"):
        model = getattr(cfg, sect)
        if model is not None and "num_classes" in model.kwargs:
            raise RelkdError(
                f"{sect}.kwargs.num_classes={model.kwargs['num_classes']!r} is not allowed: the "
                f"class count comes from the data set (data.name={d.name}); remove it"
            )


def _validate(cfg: Config) -> None:
    for dotted, choices in CHOICES.items():
        sect, key = dotted.split(".")
        value = getattr(getattr(cfg, sect), key)
        if str(value) not in choices:
            raise RelkdError(
                f"{dotted}={value!r} is not valid. Valid choices: {', '.join(choices)}"
            )
    for dotted in POSITIVE:
        sect, key = dotted.split(".")
        value = getattr(getattr(cfg, sect), key)
        if not value > 0 or value == float("inf"):
            raise RelkdError(f"{dotted}={value!r} must be a finite number > 0")
    if cfg.student.name in (MISSING, "???", None, ""):
        raise RelkdError("student.name is required (e.g. student.name=resnet8x4)")
    if not str(cfg.train.teacher_cache).strip():
        raise RelkdError("train.teacher_cache='' is not valid: use off, auto or a folder path")
    if not str(cfg.train.teacher_replay).strip():
        raise RelkdError("train.teacher_replay='' is not valid: use off, auto or a folder path")
    _validate_values(cfg)
    _validate_magnitudes(cfg)
    _validate_folder_names(cfg)


def _safe_part(name: str) -> str:
    return name.replace(":", "-").replace("/", "-").replace(os.sep, "-")


def default_name(cfg: Any) -> str:
    """``<method>_<teacher>_<student>_s<seed>``; ``<method>_<student>_s<seed>`` without a
    teacher (``:`` and ``/`` of hub names become ``-``)."""
    parts = [_safe_part(str(cfg.method.name))]
    if cfg.teacher is not None and cfg.teacher.name:
        parts.append(_safe_part(str(cfg.teacher.name)))
    parts.append(_safe_part(str(cfg.student.name)))
    return "_".join(parts) + f"_s{cfg.train.seed}"


def _validate_folder_names(cfg: Config) -> None:
    """``output_dir`` and ``name`` (or :func:`default_name`) become folders: a part longer than
    the file system's ``NAME_MAX`` (usually 255 bytes) is refused here, so ``--print-config``
    refuses what ``relkd train`` would fail on (its ``mkdir``). The other name rules (absolute,
    ``..``, empty, through a symlink) are :func:`relkd.engine.rundir.run_path`'s."""
    from relkd._fs import long_name_part, short_text

    out, name = str(cfg.output_dir), cfg.name if cfg.name is not None else default_name(cfg)
    for key, value in (("output_dir", out), ("name", name)):  # a default of long import paths
        problem = long_name_part(str(value), out)
        if problem:
            fix = "; set a shorter name=..." if key == "name" and cfg.name is None else ""
            raise RelkdError(f"{key}={short_text(str(value))!r} is not valid: {problem}{fix}")


def yaml_error(where: str, e: yaml.YAMLError) -> RelkdError:
    """One line for a YAML syntax error: what is wrong and where (line, column)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if "tag:yaml.org,2002:python" in str(problem):
        problem = f"{problem} (Python object tags are never loaded)"
    return RelkdError(f"{where} is not valid YAML: {problem}{at}")


def load_config(
    source: str | os.PathLike | Mapping[str, Any] | Config | DictConfig | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a validated :class:`Config` from a YAML path, a dict or a Config, plus overrides.

    Raises:
        RelkdError: unknown key, wrong type, bad choice or non-positive value, naming the key.
    """
    schema = OmegaConf.structured(Config)
    try:
        if source is None:
            merged = schema
        elif isinstance(source, Config):
            merged = OmegaConf.merge(schema, OmegaConf.structured(source))
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_dir():
                raise RelkdError(
                    f"config {str(path)!r} is a folder, not a config file: give a YAML file or "
                    "a packaged config name (relkd configs list)"
                )
            if not path.exists():
                raise RelkdError(f"config file {str(path)!r} does not exist")
            loaded = _load_yaml_file(path)
            _check_types(OmegaConf.to_container(loaded, resolve=False), Config, "", str(path))
            merged = OmegaConf.merge(schema, loaded)
        elif isinstance(source, (Mapping, DictConfig)):
            created = OmegaConf.create(dict(source))
            _check_types(OmegaConf.to_container(created, resolve=False), Config, "", None)
            merged = OmegaConf.merge(schema, created)
        else:
            raise RelkdError(f"cannot read a config from {type(source).__name__}")
        for item in overrides:
            merged = OmegaConf.merge(merged, _parse_override(item))
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    except (ValueError, TypeError) as e:  # yaml / dotlist parse errors
        if isinstance(e, RelkdError):
            raise
        raise RelkdError(f"config error: {e}") from None
    assert isinstance(obj, Config)
    _validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ----------------------------------------------------------- types the YAML parser cannot see
_FLOAT32_MAX = 3.4028234663852886e38  # torch keeps lrs and factors in float32 tensors


def _validate_magnitudes(cfg: Config) -> None:
    """The one-cycle factors, and every float that torch turns into a float32 (or multiplies
    into the lr): a zero divides by zero, a negative gives a negative lr or momentum (training
    went on, exit 0), a huge finite value (``optim.lr=1e308``) overflowed inside torch after an
    epoch had been saved."""
    o, s, t = cfg.optim, cfg.schedule, cfg.train
    rules: list[tuple[str, Any, bool, str]] = [
        ("schedule.div_factor", s.div_factor, s.div_factor > 0, "must be > 0 (start lr = lr / it)"),
        (
            "schedule.final_div_factor",
            s.final_div_factor,
            s.final_div_factor > 0,
            "must be > 0 (final lr = start lr / it)",
        ),
        ("schedule.base_momentum", s.base_momentum, 0 <= s.base_momentum < 1, "must be in [0, 1)"),
        ("schedule.max_momentum", s.max_momentum, 0 <= s.max_momentum < 1, "must be in [0, 1)"),
    ]
    for dotted, value, ok, want in rules:
        if not ok:
            raise _bad(dotted, value, want)
    floats: list[tuple[str, Any]] = [
        ("optim.lr", o.lr), ("optim.weight_decay", o.weight_decay), ("schedule.gamma", s.gamma),
        ("schedule.div_factor", s.div_factor), ("schedule.final_div_factor", s.final_div_factor),
        ("schedule.warmup_epochs", s.warmup_epochs), ("train.grad_clip", t.grad_clip),
        ("method.ce_weight", cfg.method.ce_weight),
        *((f"optim.lr_by_student.{k}", v) for k, v in o.lr_by_student.items()),
    ]  # fmt: skip
    for dotted, value in floats:
        if value is not None and not abs(value) <= _FLOAT32_MAX:  # also NaN
            raise _bad(dotted, value, f"must be a finite number of at most {_FLOAT32_MAX:.4g}")
    lrs = [o.lr, *o.lr_by_student.values()]
    peak = max(lrs) * (s.gamma ** len(s.milestones) if s.name == "multistep" and s.gamma > 1 else 1)
    if s.name == "onecycle":
        start = min(lrs) / s.div_factor
        peak = max(peak, max(lrs) / s.div_factor, max(lrs) / s.div_factor / s.final_div_factor)
        if start / s.final_div_factor == 0:
            raise _bad(
                "schedule.final_div_factor", s.final_div_factor,
                f"lr / div_factor / final_div_factor underflows to 0 (lr={o.lr})",
            )  # fmt: skip
    if not peak <= _FLOAT32_MAX:
        raise RelkdError(
            f"the schedule's learning rate reaches {peak:.4g} (optim.lr={o.lr}, "
            f"schedule.{s.name}): more than float32 holds ({_FLOAT32_MAX:.4g})"
        )


def _load_yaml_file(path: Path) -> DictConfig:
    """A config file's mapping (a regular file within the config size bound)."""
    from relkd._fs import open_regular

    try:
        with open_regular(path, "config", "config file") as f:
            loaded = load_yaml(f)  # YAML 1.2 booleans (relkd._yaml)
    except yaml.YAMLError as e:
        raise yaml_error(f"config file {str(path)!r}", e) from None
    except OSError as e:
        raise RelkdError(str(e) if e.strerror is None else f"config file {str(path)!r}: {e}") from e
    if not isinstance(loaded, DictConfig):
        raise RelkdError(f"config file {str(path)!r} must hold a mapping at the top")
    return loaded


def _leaf_type(cls: Any, dotted: str) -> Any:
    """The declared type of ``dotted`` in the dataclass ``cls`` (Optional unwrapped), a
    dataclass for a section, or None where the schema does not say (free-form dicts)."""
    import typing

    tp: Any = cls
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = args[0] if len(args) == 1 else tp
    return tp


def _is_interp(v: Any) -> bool:
    return isinstance(v, str) and "${" in v


def _check_types(tree: Any, cls: Any, prefix: str, path: str | None) -> None:
    """What YAML's implicit typing turns into something else: a name or path that YAML read as
    a boolean or a number (``name: yes`` would name the folder ``True``, ``1e3`` and
    ``1000.0`` would share one), a boolean given as a number (``sync_bn: -9``), a nested list
    where the schema has a flat one (``milestones: [[1]]``). One line naming the key."""
    import typing

    if not isinstance(tree, dict):
        return
    where = f" in config file {path!r}" if path else ""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        tp = _leaf_type(Config, dotted) if isinstance(key, str) else None
        if tp is None or value is None or _is_interp(value):
            continue
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            _check_types(value, tp, dotted + ".", path)
        elif tp is str and not isinstance(value, str):
            kind = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
            raise RelkdError(
                f"{dotted}={value!r}{where} is {kind} in YAML, not a string: quote it "
                f"({dotted.rsplit('.', 1)[-1]}: '...') so that it is read as written"
            )
        elif tp is bool and not isinstance(value, bool):
            raise RelkdError(f"{dotted}={value!r}{where} is not valid: must be true or false")
        elif (
            typing.get_origin(tp) is list
            and isinstance(value, list)
            and any(isinstance(v, (list, dict)) for v in value)
        ):
            raise RelkdError(
                f"{dotted}={value!r}{where} is not valid: must be a flat list of "
                f"{typing.get_args(tp)[0].__name__} values"
            )


def _parse_override(item: str) -> DictConfig:
    """One ``key=value`` override. The value of a string field (names, paths, choices) is
    taken as written, not through YAML's implicit types (``name=yes`` is the folder ``yes``,
    ``name=1e3`` is ``1e3``, a newline stays a newline); quote it in YAML (``name="'a'"``) or
    write ``null`` for YAML's reading. Other fields are YAML values, type-checked."""
    if "=" not in item:
        raise RelkdError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    # YAML 1.1 reads yes/no/on/off as booleans; a boolean key takes only true or false.
    if _leaf_type(Config, key) is bool and raw.strip().lower() not in ("true", "false", "null"):
        raise RelkdError(f"{key}={raw!r} is not valid: must be true or false")
    if (
        _leaf_type(Config, key) is str
        and raw.strip() not in ("null", "~", "")
        and (raw.strip()[:1] not in ("'", '"'))
    ):
        node: Any = raw
        for part in reversed(key.split(".")):
            node = {part: node}
        return OmegaConf.create(node)
    try:
        parsed = strict_dotlist([item])  # yes / on stay strings, as in a file
    except yaml.YAMLError as e:
        raise yaml_error(f"override {item!r}", e) from None
    _check_types(OmegaConf.to_container(parsed, resolve=False), Config, "", None)
    return parsed


def load_run_config(
    config: Any, overrides: Sequence[str] = (), student: Any = None, teacher: Any = None
) -> Config:
    """:func:`load_config` for a run; a model passed from Python that the config does not name
    is recorded by :func:`relkd.plugins.recorded_name` (its import path when that rebuilds it,
    else ``python-module:<module>.<QualName>``), so ``config.yaml`` says what the run used."""
    from relkd.plugins import recorded_name

    extra: list[str] = []
    if student is not None:
        try:
            named = load_config(config, overrides).student.name
        except RelkdError as e:
            # Missing name: OmegaConf's "missing mandatory value" or "student.name is required".
            if "student.name" not in str(e):
                raise
            named = None
        if named is None:
            extra.append(f"student.name={recorded_name(student)}")
    if teacher is not None:
        try:
            unnamed = load_config(config, [*overrides, *extra]).teacher is None
        except RelkdError:
            unnamed = False  # reported below, as the config's own error
        if unnamed:
            extra.append(f"teacher.name={recorded_name(teacher)}")
    return load_config(config, [*overrides, *extra])
