"""Distillation methods, one file each, registered by a lowercase key."""

import importlib
import pkgutil

from relkd.methods.base import (
    METHODS,
    Composite,
    Method,
    MethodContext,
    list_methods,
    register_method,
)
from relkd.methods.spec import MethodSpec, build_method

# Import every module in this package so each method registers itself: a new method file needs
# no edit anywhere else.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "spec"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "METHODS",
    "Composite",
    "Method",
    "MethodContext",
    "MethodSpec",
    "build_method",
    "list_methods",
    "register_method",
]
