"""The methods: each module (or package) of this package is one method, registered when imported.

``model.method`` names a method; :mod:`tokenseg.core.registry` keeps them and imports this package on
first use, so a new method is one module or package here (or in your own package, declared in the
``tokenseg.methods`` entry-point group) plus a preset YAML — nothing else changes. A package holds the
method end to end: ``model.py``, ``method.py`` (config section, losses, views, map recipe), ``convert.py``
(the authors' checkpoints) and ``presets/``. See README "Adding a method".
"""
from __future__ import annotations

import importlib
import pkgutil

from ..core.registry import available_methods, get_method, register, section_config
from .base import (BACKGROUND, IMAGENET, Converter, MapRecipe, Method, StepContext, default_param_groups,
                   default_views, image_only)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MapRecipe", "StepContext", "Converter", "BACKGROUND", "IMAGENET", "register", "get_method",
           "available_methods", "section_config", "image_only", "default_views", "default_param_groups"]
