"""CLIP-ES's own seed files (``.npy`` dicts of ``keys`` + ``attn_highres``), written and read."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from ...core.seeds import SeedMaps, _load_npy_dict
from ...core.errors import TokensegError
from ...core.files import write_bytes_atomic



# --------------------------------------------------------------------------------------------
# The authors' .npy layout
# --------------------------------------------------------------------------------------------

def save_clip_es_npy(path: str | os.PathLike, keys, attn_highres, **extra) -> None:
    """Write one image's seeds as their ``np.save(dict)`` file: ``keys`` (int64 class indices) and
    ``attn_highres`` (float16 (n, H, W)), plus any ``extra`` arrays (e.g. ``highres``), atomically.
    Their ``eval_cam.py`` / ``eval_cam_with_crf.py`` read it."""
    d = {"keys": np.asarray(_np(keys), dtype=np.int64),
         "attn_highres": np.asarray(_np(attn_highres), dtype=np.float16)}
    d.update({k: np.asarray(_np(v)) for k, v in extra.items()})
    buf = io.BytesIO()
    np.save(buf, d, allow_pickle=True)
    write_bytes_atomic(path, buf.getvalue())


def load_clip_es_npy(path: str | os.PathLike, allow_pickle: bool = False, key: str = "attn_highres") -> SeedMaps:
    """Read their ``.npy`` dict (``keys`` + ``attn_highres``) as :class:`~tokenseg.core.seeds.SeedMaps`. Only
    numpy arrays are unpickled unless ``allow_pickle`` (trusted files only)."""
    path = Path(path)
    try:
        d = _load_npy_dict(path, allow_pickle)
        keys = np.asarray(d["keys"], dtype=np.int64).reshape(-1)
        maps = np.asarray(d[key], dtype=np.float32)
    except KeyError as exc:
        raise TokensegError(f"{path}: not a CLIP-ES seed file (no {exc} entry)") from exc
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read CLIP-ES seed file ({exc})") from exc
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise TokensegError(f"{path}: {key} has shape {maps.shape} for {keys.shape[0]} keys")
    return SeedMaps(keys, maps, {"format": "clip-es-npy"})


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
