"""Shared reader helpers: per-image problem lists (error or skip) and a cached image scan."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from ..core.errors import TokensegError
from ..core.files import write_json_atomic

SCAN_VERSION = 2  # 2: "alpha" (transparency) in the per-image info
EXIF_ORIENTATION = 0x0112


def exif_orientation(img) -> int:
    """The EXIF orientation tag (1–8) of an open PIL image; 1 when it has none or it cannot be read."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:
        return 1
MAX_LISTED = 20  # problems shown in one error message ("... and N more" after that)
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_COLLECTING = contextvars.ContextVar("tokenseg_data_collecting", default=False)


@contextlib.contextmanager
def collecting():
    """Inside this block readers skip bad images silently and leave image decoding to the caller
    (``check_dataset`` reads the problems from ``meta["skipped"]`` and scans the images itself)."""
    token = _COLLECTING.set(True)
    try:
        yield
    finally:
        _COLLECTING.reset(token)


class UnusableSplit(TokensegError):
    """A split with no usable image. Carries the per-image problems that led there, so that
    ``tokenseg data check`` can still count labels without images (and say where it looked)."""

    def __init__(self, message: str, problems: Sequence[dict] = (), image_dir: str | Path | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems)
        self.image_dir = str(image_dir) if image_dir is not None else ""


class Problems:
    """Per-image problems found while reading a dataset: raised together, or skipped (skip_bad)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[dict] = []
        self._ids: set[str] = set()

    def add(self, image_id: str, file: str | Path | None, problem: str, kind: str = "error") -> None:
        self.items.append({"id": image_id, "file": str(file) if file is not None else "",
                           "problem": problem, "kind": kind})
        self._ids.add(image_id)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def describe(item: dict) -> str:
        return f"{item['file']}: {item['problem']}" if item["file"] else f"image {item['id']!r}: {item['problem']}"

    def resolve(self, skip_bad: bool, quiet: bool = False) -> set[str]:
        """Raise a TokensegError listing the problems, or (skip_bad) warn and return the ids to drop."""
        if not self.items:
            return set()
        shown = [self.describe(p) for p in self.items[:MAX_LISTED]]
        more = f"\n  ... and {len(self.items) - MAX_LISTED} more" if len(self.items) > MAX_LISTED else ""
        if not skip_bad:
            raise TokensegError(
                f"{self.name}: {len(self._ids)} image(s) cannot be used:\n  " + "\n  ".join(shown) + more
                + "\nfix them, or skip them with data.skip_bad=true (CLI: --skip-bad); "
                  "`tokenseg data check CONFIG` lists every problem")
        if not (quiet or _COLLECTING.get()):
            print(f"tokenseg: warning: {self.name}: skipping {len(self._ids)} image(s) (data.skip_bad):\n  "
                  + "\n  ".join(shown) + more, file=sys.stderr)
        return set(self._ids)


def has_alpha(img: Image.Image) -> bool:
    """An alpha channel, a palette with transparent entries or a transparent colour key (tRNS)."""
    return img.mode in ALPHA_MODES or "transparency" in img.info


def scan_image(path: str | Path, decode: bool = True) -> dict:
    """Open an image (and, with ``decode``, decode every pixel, which finds truncated files).
    Returns ``{"width", "height", "mode", "orientation", "alpha", "error"}`` with the size after EXIF
    rotation; ``alpha`` is "" (none), "transparent" (some pixel is not opaque: it will be composited
    on :data:`tokenseg.data.base.TRANSPARENT_FILL`), "opaque" (an alpha channel, all 255) or
    "unknown" (an alpha channel, pixels not decoded)."""
    info = {"width": 0, "height": 0, "mode": "", "orientation": 1, "alpha": "", "error": ""}
    try:
        with Image.open(path) as img:
            info["mode"] = img.mode
            w, h = img.size
            orient = exif_orientation(img)
            info["orientation"] = orient
            if orient in (5, 6, 7, 8):
                w, h = h, w
            info["width"], info["height"] = w, h
            alpha = has_alpha(img)
            info["alpha"] = "unknown" if alpha else ""
            if decode:
                img.load()
                if alpha:
                    a = img if img.mode in ("RGBA", "LA", "RGBa", "La") else img.convert("RGBA")
                    info["alpha"] = "transparent" if a.getchannel("A").getextrema()[0] < 255 else "opaque"
    except FileNotFoundError:
        info["error"] = "image file not found"
    except Exception as exc:  # PIL raises many types for broken files
        info["error"] = f"cannot read image ({type(exc).__name__}: {exc})"
    return info


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def scan_cache_file(cache_dir: str | Path, root: str | Path) -> Path:
    key = hashlib.sha1(os.fsencode(Path(root).resolve())).hexdigest()[:16]  # any file name bytes
    return Path(cache_dir) / "scan" / f"{key}.json"


def scan_images(paths: Sequence[str | Path], decode: bool = True, workers: int = 2,
                cache_file: str | Path | None = None, progress: bool = False) -> list[dict]:
    """:func:`scan_image` over many files with a thread pool; decoded results are cached in
    ``cache_file`` keyed by path, size and mtime, so a second scan only stats the files."""
    paths = [str(p) for p in paths]
    cache: dict = {}
    if cache_file is not None and decode and Path(cache_file).is_file():
        try:
            data = json.loads(Path(cache_file).read_text(encoding="utf-8"))
            if data.get("version") == SCAN_VERSION:
                cache = data.get("files", {})
        except (OSError, ValueError):
            cache = {}
    stamps = [_stamp(p) for p in paths]
    results: list[dict | None] = [None] * len(paths)
    todo = []
    for i, (p, st) in enumerate(zip(paths, stamps)):
        if st is None:
            results[i] = {"width": 0, "height": 0, "mode": "", "orientation": 1, "error": "image file not found"}
            continue
        hit = cache.get(os.path.abspath(p))
        if hit is not None and hit.get("stamp") == st:
            results[i] = hit["info"]
        else:
            todo.append(i)
    if todo:
        bar = None
        if progress and len(todo) > 200:
            from ..core.progress import progress_bar
            bar = progress_bar(total=len(todo), desc="scanning images", unit="img", file=sys.stderr)
        def one(i: int) -> tuple[int, dict]:
            return i, scan_image(paths[i], decode)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, info in pool.map(one, todo, chunksize=16):
                results[i] = info
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if cache_file is not None and decode:
            for i in todo:
                cache[os.path.abspath(paths[i])] = {"stamp": stamps[i], "info": results[i]}
            try:
                write_json_atomic(cache_file, {"version": SCAN_VERSION, "files": cache})
            except OSError:
                pass  # a cache is an optimisation
    return results  # type: ignore[return-value]


def drop_bad_images(ids: Iterable[str], image_paths: Sequence[Path], problems: Problems,
                    workers: int = 2, cache_file: Path | None = None) -> None:
    """Decode every image (cached) and add the unreadable ones to ``problems``."""
    if _COLLECTING.get():
        return
    ids = list(ids)
    infos = scan_images(image_paths, decode=True, workers=workers, cache_file=cache_file, progress=True)
    for image_id, path, info in zip(ids, image_paths, infos):
        if info["error"] and image_id not in problems:
            problems.add(image_id, path, info["error"], kind="unreadable_image")
