"""Stages are registered by name; configs refer to them by that name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from curate.stage import Stage

_REGISTRY: dict[str, type["Stage"]] = {}

#: Modules that define the built-in stages (imported lazily, on first lookup).
BUILTIN_MODULES = (
    "curate.stages",
    "filters",
)
_loaded = False


def register(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: ``@register`` on a Stage subclass with a ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage name {cls.name!r} already registered by {other.__module__}.{other.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)


def get(name: str) -> type["Stage"]:
    _load_builtins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown stage {name!r} (known: {known})")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def create(params: dict) -> "Stage":
    cls = get(params["stage"])
    return cls(params)
