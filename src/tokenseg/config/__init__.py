"""Typed configs with the papers' defaults, YAML presets and ``key=value`` overrides.

A config is a tree of dataclasses (:mod:`.sections`). ``load_config(name_or_path, overrides)``
(:mod:`.load`) starts from the dataclass defaults, applies a preset, then the overrides; :mod:`.checks`
holds what a config must satisfy. Unknown keys are errors that name the key and suggest the closest one.
"""
from __future__ import annotations

from .sections import (CRF_PRESET_NAMES, Config, DataConfig, EvalConfig, INTERPOLATIONS, IRNConfig, METHOD_PRESETS,
                       MapsConfig, ModelConfig, PRESET_DIR, PseudoConfig, SegmentConfig, SyntheticConfig, TrainConfig)
from .load import (STAGE_SPLIT_KEYS, _merge, apply_overrides, available_presets, follow_dataset_splits, load_config,
                   parse_override, preset_files)
from .checks import RANGES, numeric_fields, range_problem, validate, validate_post, validate_ranges

__all__ = ["CRF_PRESET_NAMES", "Config", "DataConfig", "EvalConfig", "INTERPOLATIONS", "IRNConfig", "METHOD_PRESETS",
           "MapsConfig", "ModelConfig", "PRESET_DIR", "PseudoConfig", "SegmentConfig", "SyntheticConfig",
           "TrainConfig", "STAGE_SPLIT_KEYS", "_merge", "apply_overrides", "available_presets",
           "follow_dataset_splits", "load_config", "parse_override", "preset_files", "RANGES",
           "numeric_fields", "range_problem", "validate", "validate_post", "validate_ranges"]
