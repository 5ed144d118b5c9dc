"""One generic name -> object registry used for models, methods and data sets.

Besides the names registered in the library, a registry answers import paths
(``mypkg.models:ResNetA``) and the names packages register under its entry-point group
(the functions below; :mod:`relkd.plugins` explains them to users)."""

from __future__ import annotations

import difflib
import importlib
import re
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RelkdError(ValueError):
    """A user error (bad name, bad value, missing data): the CLI prints it and exits with code 2."""


# ----------------------------------------------------------- import paths and entry points
#: Registry kind -> entry-point group.
GROUPS = {"model": "relkd.models", "method": "relkd.methods", "dataset": "relkd.datasets"}
#: Prefixes that name adapters, not modules (``torchvision:resnet18``, ``timm:resnet50``).
RESERVED = ("torchvision", "timm")
_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def is_import_path(name: object) -> bool:
    """Whether ``name`` is a ``module:attribute`` import path (not ``torchvision:`` / ``timm:``)."""
    return (
        isinstance(name, str)
        and bool(_PATH.match(name))
        and name.split(":", 1)[0].split(".")[0] not in RESERVED
    )


def import_object(path: str, kind: str = "component") -> Any:
    """The object an import path names; :class:`RelkdError` (one line naming ``path``) when the
    module or the attribute is missing or the module fails to import."""
    mod_name, attr = path.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        missing = e.name or mod_name
        if mod_name == missing or mod_name.startswith(missing + "."):
            raise RelkdError(
                f"{kind} {path!r}: module {missing!r} not found (is its package installed or its "
                "folder on PYTHONPATH?)"
            ) from None
        raise RelkdError(
            f"{kind} {path!r}: importing {mod_name!r} failed: it imports {missing!r}, which is "
            "not installed"
        ) from None
    except Exception as e:  # the user's module itself raised while importing
        first = str(e).splitlines()[0] if str(e) else ""
        raise RelkdError(
            f"{kind} {path!r}: importing {mod_name!r} failed: {type(e).__name__}: {first}"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RelkdError(f"{kind} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_entry_points(registry: Any) -> None:
    """Register the entry points of ``registry``'s group (see the module docstring)."""
    from importlib.metadata import entry_points

    group = GROUPS.get(registry.kind)
    if group is None:
        return
    for ep in entry_points(group=group):
        where = f"entry point {ep.name!r} = {ep.value!r} (group {group})"
        try:
            obj = ep.load()
            if isinstance(obj, types.ModuleType):
                continue  # importing the module registered its components
            if ep.name in registry and registry.get(ep.name) is obj:
                continue  # registered by a decorator while loading
            if registry.kind == "method" and (ep.name != ep.name.lower() or "+" in ep.name):
                raise ValueError("method names are lowercase without '+'")
            registry.add(ep.name, registry.check(obj, ep.value))
        except Exception as e:  # a broken plug-in must not break the built-in names
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"relkd: skipped {where}: {first}", stacklevel=2)


def own_hint(kind: str) -> str:
    """The end of every "unknown name" error: how to name a component of one's own."""
    return (
        f"or your own {kind} by its import path package.module:Name (a short name your module "
        "registers is known only once that module is imported, e.g. as an entry point)"
    )


class Registry(Generic[T]):
    """Maps lowercase-insensitive names to objects (classes or factory functions).

    ``get`` fails with a message naming the bad key, the closest matches and all valid choices.
    """

    def __init__(
        self,
        kind: str,
        check: Callable[[object, str], T] | None = None,
        other_forms: str = "",
    ) -> None:
        self.kind = kind
        # Names accepted besides the registered ones (said in the "unknown" error), e.g.
        # "torchvision:<name>, timm:<name>" for models.
        self.other_forms = other_forms
        self._items: dict[str, T] = {}
        # check(obj, path) -> the object to use, or RelkdError: "not a model / method / data set"
        self._check = check
        self._paths: dict[str, T] = {}  # import paths resolved so far (imported once)
        self._plugins_loaded = False

    def check(self, obj: object, path: str) -> T:
        return self._check(obj, path) if self._check is not None else obj  # type: ignore[return-value]

    def _ensure_plugins(self) -> None:
        """Register the entry points of this kind's group, once (:mod:`relkd.plugins`)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        load_entry_points(self)

    def resolve_path(self, path: str) -> T:
        """The object an import path names, imported and checked once."""
        if path not in self._paths:
            self._paths[path] = self.check(import_object(path, self.kind), path)
        return self._paths[path]

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise TypeError(f"cannot infer a {self.kind} name for {obj!r}")
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def remove(self, name: str) -> None:
        """Forget ``name`` (a throw-away registration in a test or a session); no-op if absent."""
        self._items.pop(name, None)

    def _lookup(self, name: str) -> str | None:
        self._ensure_plugins()
        if name in self._items:
            return name
        lowered = {k.lower(): k for k in self._items}
        return lowered.get(name.lower())

    def __contains__(self, name: object) -> bool:
        """Registered names only; an import path is "in" the registry once it resolves."""
        if is_import_path(name):
            try:
                self.resolve_path(name)  # type: ignore[arg-type]
            except RelkdError:
                return False
            return True
        return isinstance(name, str) and self._lookup(name) is not None

    def get(self, name: str) -> T:
        if is_import_path(name):
            return self.resolve_path(name)
        key = self._lookup(name)
        if key is None:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RelkdError(
                f"unknown {self.kind} {name!r}.{hint} Valid choices: {', '.join(self.names())}"
                f"{'; ' + self.other_forms if self.other_forms else ''}; {own_hint(self.kind)}"
            )
        return self._items[key]

    def canonical(self, name: str) -> str:
        self.get(name)
        if name in self._paths:
            return name
        key = self._lookup(name)
        assert key is not None
        return key

    def names(self) -> list[str]:
        """Registered names (built-in and entry points); import paths are not listed."""
        self._ensure_plugins()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_plugins()
        return len(self._items)
