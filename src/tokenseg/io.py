"""File formats and atomic writes.

Every file tokenseg writes goes through :func:`atomic_write` (temp file in the same folder, then
``os.replace``) so that a killed job never leaves a half-written output behind, and a resumed job can
trust that any file that exists is complete.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


class TokensegError(Exception):
    """An error caused by the user's input (file, config, checkpoint); the message says what to fix."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# VOC palette PNGs
# --------------------------------------------------------------------------------------------

def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class index), as an (n, 3) uint8 array."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def save_palette_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an (H, W) integer mask as a VOC palette PNG (255 = ignore, drawn in VOC's cream colour)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"{path}: a mask must be 2-D with values in 0..255")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    pal = voc_palette()
    pal[255] = (224, 224, 192)
    img.putpalette(pal.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label mask: palette PNG indices, or a plain 8-bit single-channel PNG, as (H, W) uint8."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                arr = np.asarray(img)
            elif img.mode in ("I", "I;16", "I;16B"):
                arr = np.asarray(img).astype(np.int64)
                if arr.max(initial=0) > 255:
                    raise TokensegError(f"{path}: mask values exceed 255 (max {arr.max()})")
            else:
                raise TokensegError(
                    f"{path}: a mask must be a palette ('P') or single-channel image, got mode {img.mode!r}")
    except TokensegError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise TokensegError(f"{path}: cannot read mask ({exc})") from exc
    return arr.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Seed (map) files
# --------------------------------------------------------------------------------------------

@dataclass
class SeedMaps:
    """Per-image localisation maps: one map per present foreground class.

    ``classes`` holds 0-based foreground class indices (class ``c`` is label ``c + 1`` in a mask,
    0 being background); ``maps`` is (len(classes), H, W), normalised to [0, 1] (min–max or max-norm,
    as the method says). ``background`` is an explicit (H, W) background score for methods that make
    one (CTI, POT); None for methods whose background is a constant or ``(1 - max)^alpha``.
    """

    classes: np.ndarray
    maps: np.ndarray
    meta: dict = field(default_factory=dict)
    background: np.ndarray | None = None

    def dense(self, num_classes: int) -> np.ndarray:
        """(num_classes, H, W) float32 with zeros for absent classes."""
        out = np.zeros((num_classes,) + self.maps.shape[1:], dtype=np.float32)
        if len(self.classes):
            out[self.classes] = self.maps.astype(np.float32)
        return out


SEED_DTYPES = {"float16": np.float16, "float32": np.float32}


def save_seed(path: str | os.PathLike, seed: SeedMaps, dtype: str = "float16") -> None:
    """Write one image's maps as ``.npz`` (class ids int16, maps ``dtype``, optional background, meta
    JSON), atomically. float16 halves the disk; it moves a seed mIoU curve by ~0.02 points."""
    if dtype not in SEED_DTYPES:
        raise TokensegError(f"seed dtype must be one of {sorted(SEED_DTYPES)}, got {dtype!r}")
    arrays = dict(classes=np.asarray(seed.classes, dtype=np.int16),
                  maps=np.asarray(seed.maps, dtype=SEED_DTYPES[dtype]),
                  meta=np.array(json.dumps(seed.meta)))
    if seed.background is not None:
        arrays["background"] = np.asarray(seed.background, dtype=SEED_DTYPES[dtype])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


_NPY_DICT_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                     for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _SeedUnpickler(pickle.Unpickler):
    """Unpickles only what ``np.save(dict_of_arrays)`` writes: numpy arrays, dtypes and scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NPY_DICT_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a seed file")


def _load_npy_dict(path: Path, allow_pickle: bool) -> dict:
    """The authors' seed file: a pickled 0-d object array holding a dict. Without ``allow_pickle``
    a restricted unpickler refuses anything but numpy arrays/scalars (no code can run)."""
    if allow_pickle:
        return np.load(path, allow_pickle=True).item()
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        if not dtype.hasobject:
            raise ValueError("a plain array, not the authors' {class_index: map} dict")
        try:
            obj = _SeedUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{exc}; if you trust the file, load it with allow_pickle=True "
                             f"(--allow-pickle): unpickling can run code") from exc
    d = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(d, dict):
        raise ValueError(f"expected a {{class_index: map}} dict, found {type(d).__name__}")
    return d


def load_seed(path: str | os.PathLike, allow_pickle: bool = False) -> SeedMaps:
    """Read a seed file: our ``.npz`` or the authors' ``.npy`` dict ({class_index: H×W float}).

    The ``.npy`` dict is a pickle: by default only numpy arrays and scalars are unpickled from it;
    ``allow_pickle=True`` unpickles anything (trusted files only)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            d = _load_npy_dict(path, allow_pickle)
            keys = sorted(int(k) for k in d)
            if not keys:
                return SeedMaps(np.zeros(0, np.int64), np.zeros((0, 1, 1), np.float32), {})
            maps = np.stack([np.asarray(d[k], dtype=np.float32) for k in keys])
            return SeedMaps(np.asarray(keys, np.int64), maps, {"format": "authors-npy"})
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
            bg = z["background"] if "background" in z else None
            return SeedMaps(z["classes"].astype(np.int64), z["maps"], meta, bg)
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read seed file ({exc})") from exc


def seed_path(folder: str | os.PathLike, image_id: str) -> Path:
    return Path(folder) / f"{image_id}.npz"
