"""The methods: each module (or package) of this package is one method, registered when imported.

``model.method`` names a method; :mod:`tokenseg.core.registry` keeps them and imports this package on
first use, so a new method is one module here (or in your own package, declared in the
``tokenseg.methods`` entry-point group) plus a preset YAML — nothing else changes. See README
"Adding a method".
"""
from __future__ import annotations

import importlib
import pkgutil

from ..core.registry import available_methods, get_method, register, section_config
from .base import BACKGROUND, MapRecipe, Method, StepContext, default_param_groups, default_views, image_only

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MapRecipe", "StepContext", "BACKGROUND", "register", "get_method", "available_methods",
           "section_config", "image_only", "default_views", "default_param_groups"]
