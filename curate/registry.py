"""Stages are registered by name; configs refer to them by that name."""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # pragma: no cover
    from curate.stage import Stage

_REGISTRY: dict[str, type["Stage"]] = {}

#: Modules that define the built-in stages (imported lazily, on first lookup).
BUILTIN_MODULES = (
    "curate.stages",
    "curate.filters",
)
_loaded = False


def _tag_params(cls: type["Stage"]) -> None:
    """Give ``cls.Params`` the field ``stage: Literal[cls.name]`` (the tag of the config's discriminated
    union) when its author did not declare it: a subclass, importable from the stage's module."""
    if get_args(cls.Params.model_fields["stage"].annotation) == (cls.name,):
        return
    from pydantic import create_model

    name = f"{cls.__name__}Params_{cls.name}"
    tagged = create_model(name, __base__=cls.Params, __module__=cls.__module__,
                          stage=(Literal[cls.name], cls.name))  # type: ignore[valid-type]
    setattr(sys.modules[cls.__module__], name, tagged)  # pickled by reference, like a declared class
    cls.Params = tagged


def register(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: ``@register`` on a Stage subclass with a ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _tag_params(cls)
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


def create(params: Any) -> "Stage":
    """A stage from its validated params (or a dict of them)."""
    cls = get(params["stage"] if isinstance(params, dict) else params.stage)
    return cls(params)


_adapter: tuple[tuple[str, ...], Any] | None = None


def params_adapter() -> Any:
    """A pydantic ``TypeAdapter`` for a list of stage params: a union of every registered stage's
    ``Params`` discriminated by ``stage:``, rebuilt when a stage is registered."""
    global _adapter
    _load_builtins()
    key = tuple(sorted(_REGISTRY))
    if _adapter is None or _adapter[0] != key:
        from typing import Annotated, Union

        from pydantic import Field, TypeAdapter

        classes = tuple(_REGISTRY[n].Params for n in key)
        item = Annotated[Union[classes], Field(discriminator="stage")] if len(classes) > 1 else classes[0]
        _adapter = (key, TypeAdapter(list[item]))  # type: ignore[valid-type]
    return _adapter[1]
