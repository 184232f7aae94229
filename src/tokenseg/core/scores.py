"""Seed maps -> per-pixel class scores -> labels: the steps every mask recipe shares (threshold, CRF,
AffinityNet, IRN walks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .masks import IGNORE_INDEX
from .seeds import SeedMaps
from .errors import TokensegError


def find_seed_file(folder: str | Path, image_id: str) -> Path | None:
    """``<folder>/<id>.npz`` (ours) or ``<id>.npy`` (the authors' dict format), or None."""
    for ext in (".npz", ".npy"):
        p = Path(folder) / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def require_seed_file(folder: str | Path, image_id: str) -> Path:
    """:func:`find_seed_file`, or an error that names the file looked for."""
    found = find_seed_file(folder, image_id)
    if found is None:
        raise TokensegError(f"{Path(folder) / (image_id + '.npz')}: seed file not found (nor .npy): "
                            f"no seed file for image {image_id!r}")
    return found


def seed_scores(seed: SeedMaps, size: tuple[int, int], background: str = "constant", threshold: float = 0.39,
                alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(1 + n, H, W) float32 scores [background, maps...] and the (1 + n,) mask label of each channel
    (0 for background, class + 1). Maps of another size are resized bilinearly to ``size``. The background
    is a constant, ``(1 − max)^alpha`` (power) or the seed's own channel (channel: CTI, POT)."""
    H, W = size
    maps = np.asarray(seed.maps, dtype=np.float32)
    classes = np.asarray(seed.classes, dtype=np.int64)
    if len(classes) == 0:
        return np.ones((1, H, W), np.float32), np.zeros(1, np.int64)
    if maps.shape[1:] != (H, W):
        maps = F.interpolate(torch.from_numpy(maps)[None], size=(H, W), mode="bilinear",
                             align_corners=False)[0].numpy()
    maps = np.clip(maps, 0.0, None)
    if background == "power":
        bg = np.power(np.clip(1.0 - maps.max(0), 0.0, 1.0), alpha)
    elif background == "constant":
        bg = np.full((H, W), threshold, np.float32)
    elif background == "channel":
        if seed.background is None:
            raise TokensegError("pseudo.background=channel needs seeds with a background channel (CTI, POT); "
                                "these have none: use constant or power")
        bg = np.asarray(seed.background, np.float32)
        if bg.shape != (H, W):
            bg = F.interpolate(torch.from_numpy(bg)[None, None], size=(H, W), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
    else:
        raise TokensegError(f"unknown background model {background!r}; use constant, power or channel")
    scores = np.concatenate([bg[None].astype(np.float32), maps], 0)
    return scores, np.concatenate([[0], classes + 1])


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    s = np.clip(scores, 0.0, None)
    return (s / np.maximum(s.sum(0, keepdims=True), 1e-8)).astype(np.float32)


def label_from_probs(probs: np.ndarray, labels: np.ndarray, confidence: float = 0.0) -> np.ndarray:
    """argmax over channels -> (H, W) uint8 mask labels; ``probs.max < confidence`` -> 255.
    Ties go to the first channel (background), as ``argmax([t, maps])`` in the papers."""
    idx = probs.argmax(0)
    mask = np.asarray(labels, np.int64)[idx].astype(np.uint8)
    if confidence > 0:
        mask[probs.max(0) < confidence] = IGNORE_INDEX
    return mask
