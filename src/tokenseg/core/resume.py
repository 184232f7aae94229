"""Resuming into an output folder only when the folder was made with the same settings.

A stage that skips finished files (maps, pseudo masks, segmentation predictions) records the settings
that shape its output in a JSON file next to them. Re-running with other settings into the same folder
would otherwise mix outputs of two recipes under metadata that describes only one; it stops instead,
naming the settings that differ (``--overwrite`` redoes the folder, or choose another ``--out``).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import TokensegError
from .files import write_json_atomic


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_settings(folder: str | Path, settings: dict, overwrite: bool = False, name: str = "settings.json",
                   what: str = "outputs", clear: tuple[str, ...] = (), info: dict | None = None,
                   out_option: str = "--out") -> None:
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
            raise differing_settings_error(folder, what, [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys],
                                           out_option)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"settings": settings, **_normal(info or {})})


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists and scalars are leaves)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: dict, new: dict, keys: Iterable[str], ignore: Iterable[str] = ()) -> list[str]:
    """``"section.key: old -> new"`` for every key under the prefixes ``keys`` whose value differs between
    two configs (``Config.to_dict()`` form). Keys missing on one side (older versions) are not compared;
    keys under ``ignore`` cannot change the output (device, progress, logging) and are allowed to differ."""
    a, b = flatten(_normal(old)), flatten(_normal(new))
    prefixes = tuple(k + "." if not k.endswith(".") else k for k in keys)
    skip = tuple(ignore)

    def chosen(k: str) -> bool:
        return (k.startswith(prefixes) or k in keys) and not any(k == i or k.startswith(i + ".") for i in skip)

    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if chosen(k) and a[k] != b[k]]


def differing_settings_error(where: str | Path, what: str, diffs: list[str], out_option: str) -> TokensegError:
    """The one message for a re-run whose settings differ from those of the outputs already there."""
    shown = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 6 else "")
    return TokensegError(f"{where}: holds {what} made with other settings ({shown}); continuing would mix "
                         f"them: pass --overwrite to start over, or choose another {out_option}")


class Interrupt:
    """SIGINT / SIGTERM turned into a request a training loop honours at its next step boundary (it saves a
    checkpoint there, then raises ``KeyboardInterrupt``): a Ctrl-C inside the first epoch leaves a
    resumable state. A second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextlib.contextmanager
def interrupt_at_step_boundary() -> Iterator[Interrupt]:
    """Install :class:`Interrupt` for SIGINT and SIGTERM while a training loop runs (main thread only;
    elsewhere the request never comes and signals act as before)."""
    stop = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, stop._handle)
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


__all__ = ["check_settings", "config_differences", "differing_settings_error", "interrupt_at_step_boundary"]
