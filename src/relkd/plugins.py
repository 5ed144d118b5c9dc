"""Models, methods and data sets of your own: by import path, or registered by a package.

Everywhere relkd accepts a model, method or data set name (configs, suites, ``relkd eval``,
``relkd probe``, ``relkd report``), an **import path** ``package.module:Attribute`` names an
object of your own, as torchdistill's and Lightning's configs do::

    student: {name: mypkg.models:ResNetA, kwargs: {depth: 20}}
    method: {name: mypkg.methods:MyKD}          # a relkd.Method subclass; "mypkg.methods:MyKD+kd"
    data: {name: mypkg.data:build_flowers}      # a builder (root, BuildOptions) -> (train, test, DataInfo)

The module is imported once, the first time the name is looked up (before any other check), and
a failure is one line naming the path: module not found, attribute not found, or not a model /
method / data set. A model may be an ``nn.Module`` subclass or a function returning one; it gets
``num_classes`` when its signature takes it, as a parameter of that name or through ``**kwargs``
(else its classifier width is checked against the data set), and ``in_chans`` (the data's
channels) by the same rule.

A package can also register names under the **entry-point groups** :data:`GROUPS`
(``relkd.models``, ``relkd.methods``, ``relkd.datasets``), e.g. in its ``pyproject.toml``::

    [project.entry-points."relkd.methods"]
    mykd = "mypkg.methods:MyKD"

Entry points are discovered the first time a registry is consulted (every command does this at
start-up); the name (``mykd``) then works like a built-in one, and ``relkd list methods`` shows
it. An entry point may also name a module whose import registers its components (with
:func:`relkd.register_method` / ``register_model``). A plug-in that fails to load is reported in
one warning and skipped; it never breaks the built-in names.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from relkd.registry import (  # noqa: F401  (the import-path core, public here too)
    GROUPS,
    RESERVED,
    RelkdError,
    import_object,
    is_import_path,
    load_entry_points,
)

_WHAT = {
    "model": "a model (an nn.Module subclass or a function returning an nn.Module)",
    "method": "a method (a relkd.Method subclass)",
    "dataset": "a data set (a builder function (root, BuildOptions) -> (train, test, DataInfo))",
}


def import_path_of(obj: Any) -> str | None:
    """``"module:QualName"`` of a class or function when importing that path gives ``obj``
    back (so a config holding it reproduces the object), else None (defined in ``__main__``, in
    a function, or not reachable under its name)."""
    target = obj if isinstance(obj, (type, types.FunctionType)) else type(obj)
    mod, qual = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in qual:
        return None
    path = f"{mod}:{qual}"
    if not is_import_path(path):
        return None
    try:
        return path if import_object(path) is target else None
    except RelkdError:
        return None


def not_a(kind: str, path: str, obj: Any) -> RelkdError:
    got = (
        f"class {obj.__name__}" if isinstance(obj, type) else f"value of type {type(obj).__name__}"
    )
    return RelkdError(f"{kind} {path!r} is not {_WHAT.get(kind, 'a ' + kind)}; it is a {got}")


def takes_argument(fn: Any, name: str) -> bool:
    """Whether calling ``fn`` accepts the keyword ``name``: a parameter of that name or a
    ``**kwargs`` catch-all. False when the signature cannot be read (nothing is guessed)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_factory(obj: Any, path: str) -> Any:
    """A registry factory ``f(num_classes=, **kwargs) -> nn.Module`` for a model class or
    function named by ``path``; its signature is the object's, so ``num_classes`` and
    ``in_chans`` are passed only where :func:`takes_argument` says it is taken (a parameter of
    that name or ``**kwargs``)."""
    from torch import nn

    if (isinstance(obj, type) and not issubclass(obj, nn.Module)) or not callable(obj):
        raise not_a("model", path, obj)
    if isinstance(obj, nn.Module):  # an instance, not something that builds one
        raise not_a("model", path, obj)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = inspect.Signature()  # unreadable: neither num_classes nor in_chans is passed
    takes_classes = takes_argument(obj, "num_classes")

    def factory(num_classes: int, **kwargs: Any) -> nn.Module:
        if takes_classes:
            kwargs.setdefault("num_classes", num_classes)
        model = obj(**kwargs)
        if not isinstance(model, nn.Module):
            raise RelkdError(
                f"model {path!r} is not a model: calling it returned a {type(model).__name__}, "
                "not an nn.Module"
            )
        return model

    factory.__signature__ = sig  # type: ignore[attr-defined]
    factory.__name__ = getattr(obj, "__name__", "model")
    factory.import_path = path  # type: ignore[attr-defined]
    return factory


def check_dataset(obj: Any, path: str) -> Any:
    if not callable(obj) or isinstance(obj, type):
        raise not_a("dataset", path, obj)
    return obj


#: The name a run records for a model passed from Python that relkd cannot import (defined in
#: ``__main__`` or inside a function, or not rebuilt by its class alone): ``python-module:`` +
#: ``module.QualName``. It is neither a registered name nor an import path.
PYTHON_MODULE = "python-module:"


def recorded_name(model: Any) -> str:
    """What a run's ``config.yaml`` records for a model passed from Python: its import path when
    importing it and calling it (with ``num_classes`` = the width of its last ``nn.Linear``)
    rebuilds a module of the same parameter names and shapes, so the run folder reproduces the
    run; else ``python-module:<module>.<QualName>``, which ``relkd eval`` / ``--resume`` answer
    with one line: the module must be passed again from Python."""
    from torch import nn

    cls = type(model)
    path = import_path_of(cls)
    if path is not None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        try:
            factory = model_factory(cls, path)
            kw = {"num_classes": linears[-1].out_features} if linears else {}
            rebuilt = factory(**kw) if kw else cls()
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            if {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == want:
                return path
        except Exception:  # needs other constructor arguments: not rebuilt from the path alone
            pass
    return f"{PYTHON_MODULE}{cls.__module__}.{cls.__qualname__}"


def refuse_python_module(name: str, section: str) -> None:
    """One line for a recorded ``python-module:`` name: relkd cannot rebuild that model."""
    if isinstance(name, str) and name.startswith(PYTHON_MODULE):
        cls = name[len(PYTHON_MODULE) :]
        # relkd.train's keywords are student= / teacher=; a bare "model" is the student.
        keyword = "teacher" if section == "teacher" else "student"
        raise RelkdError(
            f"{section} {cls} was an nn.Module passed from Python that relkd cannot import or "
            f"rebuild: pass it again from Python (relkd.train(config, {keyword}=module, "
            "resume=True); to evaluate, load student.pt into it with relkd.load_checkpoint)"
        )
