"""Seed files: one ``.npz`` per image with the maps of its present classes (:class:`SeedMaps`)."""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TokensegError
from .files import safe_output_path, write_bytes_atomic


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


def save_seed(path: str | os.PathLike, seed: SeedMaps, dtype: str = "float32") -> None:
    """Write one image's maps as ``.npz`` (class ids int16, maps ``dtype``, optional background, meta
    JSON), atomically. float32 keeps the maps as computed; float16 halves the disk and moves a seed mIoU
    curve by ~0.02 points."""
    if dtype not in SEED_DTYPES:
        raise TokensegError(f"seed dtype must be one of {sorted(SEED_DTYPES)}, got {dtype!r}")
    arrays = dict(classes=np.asarray(seed.classes, dtype=np.int16),
                  maps=np.asarray(seed.maps, dtype=SEED_DTYPES[dtype]),
                  meta=np.array(json.dumps(seed.meta)))
    if seed.background is not None:
        arrays["background"] = np.asarray(seed.background, dtype=SEED_DTYPES[dtype])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue(), "seed maps")


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
    """Read a seed file: our ``.npz``, the MCTformer authors' ``.npy`` dict ({class_index: H×W float}) or
    CLIP-ES's ``.npy`` dict ({"keys": class indices, "attn_highres": maps}).

    The ``.npy`` dict is a pickle: by default only numpy arrays and scalars are unpickled from it;
    ``allow_pickle=True`` unpickles anything (trusted files only)."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            d = _load_npy_dict(path, allow_pickle)
            if "keys" in d and "attn_highres" in d:  # CLIP-ES's layout: {keys, attn_highres[, highres]}
                keys = np.asarray(d["keys"], np.int64).reshape(-1)
                maps = np.asarray(d["attn_highres"], np.float32)
                return SeedMaps(keys, maps.reshape((len(keys),) + maps.shape[-2:]), {"format": "clip-es-npy"})
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


def npy_seed_path(folder: str | os.PathLike, image_id: str) -> Path:
    """Where the authors' ``.npy`` seed dict of ``image_id`` goes (``--export-npy``)."""
    return safe_output_path(folder, f"{image_id}.npy")


def seed_path(folder: str | os.PathLike, image_id: str) -> Path:
    """``<folder>/<image_id>.npz``, confined to ``folder`` (see :func:`safe_output_path`)."""
    return safe_output_path(folder, f"{image_id}.npz")


def seed_folders(root: Path) -> dict[str, Path]:
    """``{kind: folder}`` under a seeds root (``<output_dir>/seeds/<split>``, one sub-folder per kind),
    or ``{name: root}`` when ``root`` itself holds one kind's seed files (at any depth: ids may have
    sub-folders)."""
    def has_seeds(p: Path) -> bool:
        return next(p.rglob("*.np[yz]"), None) is not None

    if not root.is_dir():
        return {}
    subs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.endswith("_overlays")}
    meta = root / "maps_meta.json"
    if meta.is_file():  # the kinds the maps were made for (not an export folder next to them)
        import json

        kinds = json.loads(meta.read_text(encoding="utf-8")).get("maps", {}).get("kinds")
        if kinds:
            subs = {k: p for k, p in subs.items() if k in kinds}
    if meta.is_file() or not any(root.glob("*.np[yz]")):
        kinds = {k: p for k, p in subs.items() if has_seeds(p)}
        if kinds:
            return kinds
    return {root.name: root} if has_seeds(root) else {}
