"""One generic name -> object registry used for models, methods and data sets."""

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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

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
        if name in self._items:
            return name
        lowered = {k.lower(): k for k in self._items}
        return lowered.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def get(self, name: str) -> T:
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
        key = self._lookup(name)
        assert key is not None
        return key

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
