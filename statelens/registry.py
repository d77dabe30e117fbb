"""One small registry for everything statelens looks up by name (backends, analyses, tasks)."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from statelens.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; ``register`` is the only way in, ``get`` the only way out."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadInput(f"unknown {self.kind} {name!r} (choices: {', '.join(sorted(self._items))}){hint}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self):
        """The registered objects, in the order they were registered."""
        return iter(list(self._items.values()))
