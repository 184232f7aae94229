"""Progress bars that suit both a terminal and a log file.

On a terminal this is tqdm. When stderr is not a terminal (a log file, CI, ``nohup``), tqdm's ``\\r``
updates would write one line per update into the log (43 KB for 220 steps); instead a plain line with
the count, rate and ETA is printed every ``TOKENSEG_PROGRESS_SECONDS`` seconds (default 30) or every
10 % of the total, whichever comes first, and once at the end.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

from tqdm import tqdm


def _format_seconds(s: float) -> str:
    s = int(round(max(s, 0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class LineProgress:
    """A tqdm-like progress reporter that prints whole lines, rarely (for logs)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, file=None,
                 seconds: float | None = None, **_: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.disable = disable
        self.file = file or sys.stderr
        self.seconds = float(os.environ.get("TOKENSEG_PROGRESS_SECONDS", "30")) if seconds is None else seconds
        self._start_n = initial
        self._t0 = self._last = time.monotonic()
        self._last_frac = 0.0
        self._postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, msg: str) -> None:
        if not self.disable:
            print(msg, file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        frac = self.n / self.total if self.total else 0.0
        if now - self._last >= self.seconds or (self.total and int(10 * frac + 1e-9) > int(10 * self._last_frac + 1e-9)):
            self._emit(now)

    def _emit(self, now: float) -> None:
        self._last, self._last_frac = now, (self.n / self.total if self.total else 0.0)
        self._emitted_n = self.n
        done = self.n - self._start_n
        elapsed = now - self._t0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_format_seconds((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_format_seconds(elapsed)}")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=self.file, flush=True)

    def close(self) -> None:
        """A last line, unless the last update printed exactly this state already."""
        if self.disable or getattr(self, "_closed", False):
            return
        self._closed = True
        if (self.n > self._start_n or self.total == 0) and self.n != getattr(self, "_emitted_n", None):
            self._emit(time.monotonic())


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """tqdm on a terminal, :class:`LineProgress` otherwise (same call signature as tqdm)."""
    stream = kwargs.get("file") or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if interactive:
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


__all__ = ["progress_bar", "LineProgress"]
