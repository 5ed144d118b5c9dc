"""One generic name -> object registry used for models, methods and data sets.

Besides the names registered in the library, a registry answers import paths
(``mypkg.models:ResNetA``) and the names packages register under its entry-point group
(:mod:`relkd.plugins`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RelkdError(ValueError):
    """A user error (bad name, bad value, missing data): the CLI prints it and exits with code 2."""


class Registry(Generic[T]):
    """Maps lowercase-insensitive names to objects (classes or factory functions).

    ``get`` fails with a message naming the bad key, the closest matches and all valid choices.
    """

    def __init__(self, kind: str, check: Callable[[object, str], T] | None = None) -> None:
        self.kind = kind
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
        from relkd.plugins import load_entry_points

        load_entry_points(self)

    def resolve_path(self, path: str) -> T:
        """The object an import path names, imported and checked once."""
        if path not in self._paths:
            from relkd.plugins import import_object

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

    def _lookup(self, name: str) -> str | None:
        self._ensure_plugins()
        if name in self._items:
            return name
        lowered = {k.lower(): k for k in self._items}
        return lowered.get(name.lower())

    def __contains__(self, name: object) -> bool:
        """Registered names only; an import path is "in" the registry once it resolves."""
        from relkd.plugins import is_import_path

        if is_import_path(name):
            try:
                self.resolve_path(name)  # type: ignore[arg-type]
            except RelkdError:
                return False
            return True
        return isinstance(name, str) and self._lookup(name) is not None

    def get(self, name: str) -> T:
        from relkd.plugins import is_import_path

        if is_import_path(name):
            return self.resolve_path(name)
        key = self._lookup(name)
        if key is None:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise RelkdError(
                f"unknown {self.kind} {name!r}.{hint} Valid choices: {', '.join(self.names())}"
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
