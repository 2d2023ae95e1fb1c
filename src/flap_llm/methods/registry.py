"""The pruning methods by name. A method is one module under methods/ and one `register` line in
methods/__init__.py (or a user's own, registered from their code before building a PruneConfig)."""

from __future__ import annotations

from .base import Method
from ..errors import FlapError

_METHODS: dict[str, Method] = {}
_LOADED: list[bool] = []
DEFAULT = "flap"  # the paper's method


def register(method: Method) -> Method:
    """Make `method` a choice of PruneConfig(method=...) and of --method (a name already taken is refused)."""
    _builtins()
    if not isinstance(method, Method):
        raise FlapError(f"register takes a Method instance, got {type(method).__name__}")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise FlapError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    _METHODS.pop(name, None)


def _builtins() -> None:
    """The shipped methods, registered on first use (they import the library's math, which imports the config)."""
    if _LOADED:
        return
    from .builtins import BUILTINS
    _LOADED.append(True)
    for method in BUILTINS:
        _METHODS.setdefault(method.name, method)


def names() -> tuple[str, ...]:
    _builtins()
    return tuple(_METHODS)


def get(name: str) -> Method:
    _builtins()
    if name not in _METHODS:
        raise FlapError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def all_methods() -> list[Method]:
    _builtins()
    return list(_METHODS.values())
