"""Presets and overrides: ``load_config(name_or_path, overrides)`` starts from the dataclass defaults, applies
a preset (a YAML file shipped in ``tokenseg/configs`` or beside its method in ``tokenseg/methods/<name>/presets``,
or a user file, which may itself name a ``preset:`` to start from), then the overrides. Unknown keys are
errors that name the key and suggest the closest valid one."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..core.errors import TokensegError
from .checks import validate
from .sections import Config, METHOD_PRESETS, PRESET_DIR, _section_class



def preset_files() -> dict[str, Path]:
    """Every shipped preset by name: ``configs/*.yaml`` and ``methods/<name>/presets/*.yaml``."""
    files: dict[str, Path] = {}
    for path in [*PRESET_DIR.glob("*.yaml"), *sorted(PRESET_DIR.parent.glob(f"{METHOD_PRESETS}/*.yaml"))]:
        if path.stem in files:
            raise TokensegError(f"preset {path.stem!r} is shipped twice: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


def available_presets() -> list[str]:
    return sorted(preset_files())


def _merge(obj: Any, updates: dict, where: str) -> None:
    if not isinstance(updates, dict):
        raise TokensegError(f"config section {where or '<root>'!r} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj) if f.name != "sections"}
    for key, value in updates.items():
        full = f"{where}.{key}" if where else key
        if isinstance(obj, Config) and key not in names and _section_class(key) is not None:
            _merge(getattr(obj, key), value, key)  # a method's own section
            continue
        if key not in names:
            if isinstance(obj, Config):
                from ..core.registry import available_methods, get_method

                names = {**names, **{s: None for m in available_methods() if (s := get_method(m).section)}}
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise TokensegError(f"unknown config key {full!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full)
        else:
            setattr(obj, key, _coerce(value, current, full))


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Check a value against the default's type (ints widen to floats)."""
    if current is None or value is None or key == "model.pretrained":
        return value
    if isinstance(current, str) and isinstance(value, bool):  # e.g. decay_pos_embed: true
        return "true" if value else "false"
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise TokensegError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (int, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return type(current)(float(value)) if isinstance(current, float) else int(value)
        except ValueError:
            pass
    if isinstance(current, list) and isinstance(value, (int, float)):
        return [value]
    if type(current) is not type(value):
        raise TokensegError(
            f"config key {key!r} expects {type(current).__name__}, got {value!r} ({type(value).__name__})")
    return value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TokensegError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise TokensegError(f"{path}: a config file must be a mapping")
    return data


def _resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    # a file by that name wins over a preset; a folder does not (`tokenseg demo` writes runs/demo, and a
    # folder called "demo" in the working directory must not shadow the preset)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise TokensegError(f"{p}: config file not found" if not p.exists() else f"{p}: not a file")
        return p
    preset = preset_files().get(name_or_path)
    if preset is None:
        raise TokensegError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(available_presets())} (or a YAML path)")
    return preset


def _apply_file(cfg: Config, path: Path, depth: int = 0, user_keys: set | None = None) -> None:
    if depth > 8:
        raise TokensegError(f"{path}: 'preset:' chain too deep")
    data = _read_yaml(path)
    base = data.pop("preset", None)
    if base:
        _apply_file(cfg, _resolve_preset(str(base)), depth + 1, user_keys)
    try:
        _merge(cfg, data, "")
    except TokensegError as exc:
        raise TokensegError(f"{path}: {exc}") from None
    if user_keys is not None:
        if path.resolve() in {p.resolve() for p in preset_files().values()}:
            cfg.__dict__["_preset_splits"] = _split_snapshot(cfg)
        else:
            user_keys |= _flat_keys(data)


# the stage splits that follow the dataset's own splits when a user points a preset at another format
STAGE_SPLIT_KEYS = ("maps.split", "eval.split", "pseudo.split")


def _flat_keys(data: dict, prefix: str = "") -> set:
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out |= _flat_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


def _split_snapshot(cfg: Config) -> dict:
    return {"data.format": cfg.data.format, "data.train_split": cfg.data.train_split,
            "data.val_split": cfg.data.val_split, "maps.split": cfg.maps.split, "eval.split": cfg.eval.split,
            "pseudo.split": cfg.pseudo.split}


def follow_dataset_splits(cfg: Config, preset: dict | None, user_keys: set) -> None:
    """A preset's stage splits (``maps.split``, ``eval.split``, ``pseudo.split``) name its own dataset's
    splits (VOC's ``train``). When the user points the preset at another data.format, each stage split
    the user did not set follows the dataset's splits instead: the preset's validation split becomes
    ``data.val_split``, any other ``data.train_split``."""
    if not preset or cfg.data.format == preset["data.format"]:
        return
    for key in STAGE_SPLIT_KEYS:
        section, name = key.split(".")
        value = preset[key]
        if key in user_keys or not value:
            continue
        follow = cfg.data.val_split if value == preset["data.val_split"] else cfg.data.train_split
        setattr(getattr(cfg, section), name, follow)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise TokensegError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "")
    return cfg


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a config: dataclass defaults ← preset/YAML file ← ``key=value`` overrides."""
    cfg = Config()
    user_keys: set = set()
    if name_or_path:
        _apply_file(cfg, _resolve_preset(name_or_path), user_keys=user_keys)
    apply_overrides(cfg, overrides)
    user_keys |= {".".join(parse_override(o)[0]) for o in overrides}
    follow_dataset_splits(cfg, cfg.__dict__.pop("_preset_splits", None), user_keys)
    validate(cfg)
    return cfg


# The natural range of every numeric key (lists: of each element), checked by :func:`validate_ranges` before any
# work. ">0", ">=0", ">=1", ... bounds; "[0,1]", "(0,1]", "[0,1)" intervals; "any" any finite number. A method's
# own section declares its ranges as ``RANGES`` on its config class. tests/test_faults.py fails for a numeric
# key that has none.
