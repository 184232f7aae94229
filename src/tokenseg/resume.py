"""Resuming into an output folder only when the folder was made with the same settings.

A stage that skips finished files (maps, pseudo masks, segmentation predictions) records the settings
that shape its output in a JSON file next to them. Re-running with other settings into the same folder
would otherwise mix outputs of two recipes under metadata that describes only one; it stops instead,
naming the settings that differ (``--overwrite`` redoes the folder, or choose another ``--out``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .io import TokensegError, write_json_atomic


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_settings(folder: str | Path, settings: dict, overwrite: bool = False, name: str = "settings.json",
                   what: str = "outputs", clear: tuple[str, ...] = (), info: dict | None = None) -> None:
    """Stop if ``folder`` holds outputs made with other ``settings``; then record ``settings`` (and ``info``,
    which may differ between runs, e.g. the world size) in ``folder/name``.

    ``overwrite`` removes the sub-folders / files named in ``clear`` (the previous outputs) first."""
    folder = Path(folder)
    path = folder / name
    settings = _normal(settings)
    if overwrite:
        for item in clear:
            p = folder / item
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        old = old.get("settings") if isinstance(old, dict) else None  # files of older versions: unknown
        if isinstance(old, dict) and old != settings:
            keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            diffs = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys[:6])
            raise TokensegError(
                f"{folder}: holds {what} made with other settings ({diffs}). Resuming would mix them: pass "
                f"--overwrite to redo them, or write to another folder (--out)")
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"settings": settings, **_normal(info or {})})


__all__ = ["check_settings"]
