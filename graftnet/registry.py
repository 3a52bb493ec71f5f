"""String-keyed registries: extension points that specs can name without importing code."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from graftnet.errors import GraftError

__all__ = ["Registry", "closest"]

T = TypeVar("T")


def closest(name: str, choices: list[str] | tuple[str, ...], n: int = 5) -> list[str]:
    """The ``n`` choices most similar to ``name``, best first (for "did you mean" hints)."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.3)


class Registry(Generic[T]):
    """A mapping from string keys to objects, filled by ``register``.

    Examples:
        >>> adapters = Registry("adapter")
        >>> @adapters.register("identity")
        ... def make_identity(): ...
        >>> _ = adapters.add("none", None)
        >>> adapters.get("identity") is make_identity
        True
    """

    def __init__(self, kind: str, error: type[GraftError] = GraftError) -> None:
        self.kind = kind
        self._error = error
        self._items: dict[str, T] = {}

    def add(self, key: str, obj: T, *, overwrite: bool = False) -> T:
        """Register ``obj`` under ``key``; a key is registered once unless ``overwrite``."""
        if key in self._items and not overwrite:
            raise self._error(f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it")
        self._items[key] = obj
        return obj

    def register(self, key: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """A decorator form of :meth:`add`."""

        def decorate(obj: T) -> T:
            return self.add(key, obj, overwrite=overwrite)

        return decorate

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            hint = closest(key, self.keys())
            near = f" Did you mean {', '.join(map(repr, hint))}?" if hint else ""
            raise self._error(
                f"unknown {self.kind} {key!r}.{near} Valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None

    def keys(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
