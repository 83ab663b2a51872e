"""Name -> constructor registries for the choices a config may make (models, data sets, methods)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any


class UnknownNameError(KeyError):
    """A name that no entry of a registry carries; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry:
    """Maps the names a YAML may choose to constructors; refuses duplicates."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorate(entry: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return decorate

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise UnknownNameError(unknown_name_message(self.kind, name, self.names()))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def closest(name: object, valid: list[str]) -> str | None:
    """The valid name a typo most likely meant: a close spelling, or one it abbreviates."""
    close = difflib.get_close_matches(str(name), valid, n=1)
    if close:
        return close[0]
    prefixed = [candidate for candidate in valid if candidate.startswith(str(name))]
    return prefixed[0] if len(prefixed) == 1 else None


def unknown_name_message(kind: str, name: object, valid: list[str]) -> str:
    """`unknown model 'resnet81'; did you mean 'resnet18'? valid: ...`"""
    close = closest(name, valid)
    hint = f"; did you mean '{close}'?" if close else ";"
    return f"unknown {kind} '{name}'{hint} valid: {', '.join(valid)}"
