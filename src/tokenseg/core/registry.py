"""The method registry: ``model.method`` names a method (a :class:`tokenseg.methods.base.Method`).

Each method package registers its method when imported (``register(Method(...))``). The registry loads
the methods on first use the way it loads plug-ins: by importing the package :mod:`tokenseg.methods`
(which imports every method package in it) and every module an installed package declares in the
``tokenseg.methods`` entry-point group. This is the one place where a lower layer loads upper code,
by name, so that ``config`` can check a method's keys without importing the methods.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any

from .errors import TokensegError

BUILTIN_PACKAGE = "tokenseg.methods"
ENTRY_POINT_GROUP = "tokenseg.methods"

_REGISTRY: dict[str, Any] = {}
_discovered = False


def register(method: Any) -> Any:
    """Add ``method`` (it has a ``name``) to the registry; a method package calls this when imported."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module(BUILTIN_PACKAGE)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value.split(":")[0])
    except Exception as exc:  # a broken third-party plug-in must not hide the built-in methods
        import warnings

        warnings.warn(f"tokenseg: could not load a method plug-in ({exc})")


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> Any:
    _discover()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TokensegError(f"unknown method {name!r}{hint}; methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def section_config(section: str) -> type | None:
    """The dataclass of the config section ``section`` (``cti``, ``otpl``, ...), or None."""
    _discover()
    for m in _REGISTRY.values():
        if m.section == section and m.section_config is not None:
            return m.section_config
    return None


__all__ = ["register", "get_method", "available_methods", "section_config"]
