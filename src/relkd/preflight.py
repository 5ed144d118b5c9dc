"""Checks of a run config that need no data and no model weights, in the order a user fixes
them: method name and arguments, model names, whether the method has the teacher it needs, then
the checkpoint files. :func:`relkd.train` runs them before :func:`relkd.engine.fit`, so a method
typo is reported before a missing teacher checkpoint or a missing data folder.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

from torch import nn

from relkd.config import Config
from relkd.registry import RelkdError


def _check_method(name: str, args: dict) -> bool:
    """Method parts exist and their argument names / types are valid; returns whether any part
    needs a teacher."""
    from relkd.methods import METHODS
    from relkd.methods.base import _check_type

    parts = [p.strip() for p in str(name).split("+")]
    classes = {p: METHODS.get(p) for p in parts}  # unknown name: close matches, all choices
    per_part = {parts[0]: args} if len(parts) == 1 else {p: args.get(p) or {} for p in parts}
    if len(parts) > 1 and set(args) - set(parts):
        return any(c.requires_teacher for c in classes.values())  # build_method words this
    for part, a in per_part.items():
        init = classes[part].__init__
        params = {k for k in inspect.signature(init).parameters if k not in ("self", "ctx")}
        hints = typing.get_type_hints(init)
        for key, value in dict(a).items():
            if key not in params:
                raise RelkdError(
                    f"method {part!r} has no argument {key!r}. Valid arguments: "
                    f"{', '.join(sorted(params)) or 'none'}"
                )
            _check_type(part, key, value, hints.get(key, inspect.Parameter.empty))
    return any(c.requires_teacher for c in classes.values())


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

    from relkd.resources import SUITES, packaged

    want = Path(path).expanduser()
    if want.name not in ("student.pt", "student.safetensors", "student_best.pt"):
        return ""
    for name, file in packaged().items():
        if name.startswith(SUITES):
            continue
        try:
            raw = yaml.safe_load(file.read_text()) or {}
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
    needs_teacher = _check_method(cfg.method.name, dict(cfg.method.args or {}))
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
