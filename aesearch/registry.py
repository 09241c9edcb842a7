"""Named parts: one registry per kind of part (architectures, corruptions, losses, ...).

A registry maps a name used in configs to the code that builds or computes the part, so the
config schema and the search spaces refer to parts by name and adding a part is one decorator.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from aesearch.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> part mapping whose lookups fail with the list of valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(part: T) -> T:
            if name in self._parts:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._parts[name] = part
            return part

        return add

    def add(self, name: str, part: T) -> None:
        self.register(name)(part)

    def __getitem__(self, name: str) -> T:
        try:
            return self._parts[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        return f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def names(self) -> list[str]:
        return sorted(self._parts)
