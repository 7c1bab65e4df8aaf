"""One registry-by-name mechanism (detectron2's ``Registry`` shape) for models, ingesters,
losses and studies.

``lazy`` maps a name to the module that registers it, so a lookup imports only the family
it needs (torch, ultralytics and detectron2 are heavy). A second owner of a name is refused:
two packages silently replacing each other's entry is the bug a registry exists to prevent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from microseg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered by name; ``get`` imports a ``lazy`` module on first use."""

    def __init__(self, kind: str, lazy: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the object available as ``get(name)``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            owner = (
                getattr(existing, "__module__", "?") + "." + getattr(existing, "__qualname__", "")
            )
            raise ConfigError(f"{self.kind} name {name!r} is already registered by {owner}")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a throw-away entry clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
