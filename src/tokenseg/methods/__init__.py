"""The method registry: ``model.method`` names a :class:`~tokenseg.methods.base.Method`.

Every module of this package registers its methods when imported (``register(Method(...))``); the
registry imports them all on first use, and also any installed package that declares an entry point in
the ``tokenseg.methods`` group (a module to import). So a new method is one module here (or in your own
package) plus a preset YAML — nothing else changes. See README "Adding a method".
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..io import TokensegError
from .base import BACKGROUND, MapRecipe, Method, StepContext, default_param_groups, default_views, image_only

_REGISTRY: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a module calls this at import time); returns it."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="tokenseg.methods"):
            importlib.import_module(ep.value.split(":")[0])
    except Exception as exc:  # a broken third-party plug-in must not hide the built-in methods
        import warnings

        warnings.warn(f"tokenseg: could not load a method plug-in ({exc})")


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
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


__all__ = ["Method", "MapRecipe", "StepContext", "BACKGROUND", "register", "get_method", "available_methods",
           "section_config", "image_only", "default_views", "default_param_groups"]
