"""Checks of a run config that need no data and no model weights, in the order a user fixes
them: method name and arguments, model names, whether the method has the teacher it needs, the
checkpoint files, then the engine's own options (``train.compile_mode``, ``train.log_every``).
:func:`relkd.engine.fit` (and so :func:`relkd.train`) runs them once, right after loading the
config and before the run folder or any data, so a method typo is reported before a missing
teacher checkpoint or a missing data folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from relkd import distributed as D
from relkd.config import CHOICES, Config
from relkd.registry import RelkdError


def _check_method(name: str, args: dict, epochs: int) -> bool:
    """Method parts exist and their arguments are valid (:class:`MethodSpec`); a method schedule
    longer than the run is said once (a warning on the main process). Returns whether any part
    needs a teacher."""
    from relkd.methods.spec import MethodScheduleWarning, MethodSpec

    spec = MethodSpec.parse(name, args)
    spec.check()
    if D.is_main():
        for note in spec.schedule_notes(epochs):
            warnings.warn(note, MethodScheduleWarning, stacklevel=2)
    return spec.requires_teacher


def _check_data_and_device(cfg: Config) -> None:
    """The data set name and the device's spelling (whether that device exists here is the
    engine's check: ``--print-config`` on a login node may check a config for a GPU node)."""
    import torch

    from relkd.data import DATASETS

    try:
        DATASETS.get(cfg.data.name)
    except RelkdError as e:
        raise RelkdError(f"data.name: {e}") from None
    if cfg.train.device != "auto":
        try:
            torch.device(cfg.train.device)
        except (RuntimeError, ValueError):
            raise RelkdError(
                f"train.device={cfg.train.device!r} is not a device (auto, cpu, cuda, cuda:N, mps)"
            ) from None


def _check_model_name(section: str, name: str) -> None:
    from relkd.models.registry import MODELS
    from relkd.plugins import is_import_path, refuse_python_module

    refuse_python_module(name, section)  # a module passed from Python, recorded by its class

    # torchvision: / timm: names are checked where they are built; import paths are imported
    # here, once, before any other check
    if ":" not in name or is_import_path(name):
        try:
            MODELS.get(name)
        except RelkdError as e:
            raise RelkdError(f"{section}.name: {e}") from None


def _check_data_name(name: str) -> None:
    """A data set named by import path is imported (and checked to be a builder) here; registered
    names are checked where the data is built, as before."""
    from relkd.plugins import is_import_path

    if is_import_path(name):
        from relkd.data import DATASETS

        try:
            DATASETS.get(name)
        except RelkdError as e:
            raise RelkdError(f"data.name: {e}") from None


def _check_file(key: str, path: str | None) -> None:
    if path and not Path(path).expanduser().is_file():
        hint = _producer_hint(path) if key == "teacher.checkpoint" else ""
        raise RelkdError(f"{key}={path!r} does not exist (no such file){hint}")


def _producer_hint(path: str) -> str:
    """``"; train it first: relkd train NAME"`` when a packaged config writes ``path`` (the
    packaged students point at the run folder of a packaged teacher config), else ``""``."""
    import yaml

    from relkd._yaml import strict_load
    from relkd.resources import SUITES, packaged

    want = Path(path).expanduser()
    if want.name not in ("student.pt", "student.safetensors", "student_best.pt"):
        return ""
    for name, file in packaged().items():
        if name.startswith(SUITES):
            continue
        try:
            raw = strict_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        out, run = raw.get("output_dir"), raw.get("name")
        if not isinstance(out, str) or not isinstance(run, str):
            continue
        seed = (raw.get("train") or {}).get("seed", 0)
        run = run.replace("${train.seed}", str(seed))
        if Path(out) / run == want.parent:
            return f"; train that teacher first: relkd train {name}"
    return ""


def check_config(
    cfg: Config, *, teacher: nn.Module | None = None, student: nn.Module | None = None
) -> None:
    """Raise :class:`RelkdError` for the first problem found, most basic first.

    ``teacher`` / ``student``: the user's own modules (their config names are then not checked).
    """
    needs_teacher = _check_method(cfg.method.name, dict(cfg.method.args or {}), cfg.train.epochs)
    _check_data_and_device(cfg)
    if student is None:
        _check_model_name("student", cfg.student.name)
    if teacher is None and cfg.teacher is not None:
        _check_model_name("teacher", cfg.teacher.name)
    _check_data_name(cfg.data.name)
    if needs_teacher and teacher is None and cfg.teacher is None:
        raise RelkdError(
            f"method {cfg.method.name!r} needs a teacher: set teacher.name and teacher.checkpoint"
        )
    if student is None:
        _check_file("student.checkpoint", cfg.student.checkpoint)
    if teacher is None and cfg.teacher is not None:
        _check_file("teacher.checkpoint", cfg.teacher.checkpoint)
        # Other weight sources (pretrained weights) are judged by the engine.
        other = any(getattr(cfg.teacher, k, None) for k in ("weights", "pretrained"))
        if not cfg.teacher.checkpoint and not other and needs_teacher:
            raise RelkdError(
                f"teacher {cfg.teacher.name!r} has no checkpoint: set teacher.checkpoint=PATH "
                "(a trained teacher; an untrained one teaches nothing)"
            )
    _check_engine_options(cfg)


def _check_engine_options(cfg: Config) -> None:
    """The engine's own options that the config schema does not pin down."""
    modes = CHOICES["train.compile_mode"]
    if cfg.train.compile_mode not in modes:
        raise RelkdError(
            f"train.compile_mode={cfg.train.compile_mode!r} is unknown; valid: {', '.join(modes)}"
        )
    if not isinstance(cfg.train.log_every, int) or cfg.train.log_every < 1:
        raise RelkdError(f"train.log_every={cfg.train.log_every!r} must be a positive integer")
