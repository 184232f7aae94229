"""Map arithmetic shared by the one seed loop (:mod:`tokenseg.maps`) and the methods' own inference:
the per-class normalisations, the input size at a scale, upsampling and un-flipping views,
:class:`MapBatch` (the maps of one batch) and writing it as seed files."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import MapsConfig
from ..core.seeds import SeedMaps, save_seed, seed_path
from ..core.viz import overlay, save_png
from ..data import WSSSDataset
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_scales, normalise_images
from .base import MapRecipe


def minmax_per_class(maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(m - min)/(max - min + 1e-8) per image and class over H×W; absent classes set to 0."""
    return normalise_maps(maps, "minmax") * present[..., None, None]


def normalise_maps(maps: torch.Tensor, how: str) -> torch.Tensor:
    """Per-map normalisation over the last two dims: ``minmax`` (MCTformer), ``maxnorm`` (CTI:
    ReLU(x − min − 1e-5)/(max − min + 1e-5) on ReLU(x)), ``max`` (SIPE/POT: x/(max + 1e-5)), ``none``."""
    if how == "none":
        return maps
    flat = maps.flatten(-2)
    if how == "maxnorm":
        flat = F.relu(flat)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    if how == "minmax":
        out = (flat - lo) / (hi - lo + 1e-8)
    elif how == "maxnorm":
        out = F.relu(flat - lo - 1e-5) / (hi - lo + 1e-5)
    elif how == "max":
        out = flat / (hi + 1e-5)
    else:
        raise ValueError(f"unknown normalisation {how!r}")
    return out.view_as(maps)


def scaled_size(h: int, w: int, s: float, patch: int, rounding: str) -> tuple[int, int]:
    """Input size at scale ``s``. ``round``: nearest multiple of the patch (no pixel dropped); ``floor``:
    round(h·s) as the authors, leaving the patch convolution to drop the remainder; ``ceil``: the next
    multiple of the patch (CLIP-ES); ``none``: round(h·s) (CNNs)."""
    if rounding in ("floor", "none"):
        return max(int(round(h * s)), patch), max(int(round(w * s)), patch)
    if rounding == "ceil":
        return (max(math.ceil(round(h * s, 6) / patch) * patch, patch),
                max(math.ceil(round(w * s, 6) / patch) * patch, patch))
    return max(int(round(h * s / patch)) * patch, patch), max(int(round(w * s / patch)) * patch, patch)


@dataclass
class MapBatch:
    """Maps of a batch of same-size images, one (H, W) map per (image, present class) pair."""

    pairs: torch.Tensor  # (P, 2) long: image index in the batch, class index; sorted
    maps: dict[str, torch.Tensor]  # kind -> (P, H, W)
    background: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (B, H, W), channel methods

    def dense(self, kind: str, batch: int, num_classes: int) -> torch.Tensor:
        """(B, C, H, W) with zeros for absent classes."""
        m = self.maps[kind]
        out = m.new_zeros(batch, num_classes, *m.shape[-2:])
        out[self.pairs[:, 0], self.pairs[:, 1]] = m
        return out


def rounding_of(cfg: MapsConfig, recipe: MapRecipe) -> str:
    return recipe.size_rounding if cfg.size_rounding == "auto" else cfg.size_rounding


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def add_views(m: torch.Tensor, n: int, flip: bool) -> torch.Tensor:
    return m[:n] + m[n:].flip(-1) if flip else m


class ImageSet(Dataset):
    """(uint8 CHW image, multi-hot labels, index[, the recipe's per-image extras]) for the loader."""

    def __init__(self, ds: WSSSDataset, extras=None) -> None:
        self.ds, self.extras = ds, extras

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        arr = np.asarray(self.ds.load_image(i), dtype=np.uint8)
        item = (torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.from_numpy(self.ds.multi_hot(i)), i)
        return item if self.extras is None else (*item, torch.from_numpy(np.asarray(self.extras(i), np.float32)))


def image_bytes(size: tuple[int, int], pairs: int, cfg: MapsConfig, patch: int, prefix: int) -> int:
    """An estimate of one image's peak map memory: its accumulators and upsampled views, and the
    explicit-attention buffers (head mean, affinity, scratch) of its largest view."""
    H, W = size
    views = 2 if cfg.flip else 1
    maps = len(cfg.kinds) * (pairs + 1) * H * W * 4 * (1 + views)
    s = max(input_scales(cfg, size))
    n = prefix + math.ceil(H * s / patch) * math.ceil(W * s / patch)
    return maps + views * 3 * n * n * 4


def normalise(images_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return normalise_images(images_uint8, mean, std)


def save_map_batch(mb: MapBatch, raw: torch.Tensor, idx: list[int], ds: WSSSDataset, out_dir: Path, mc: MapsConfig):
    pairs = mb.pairs.cpu().numpy()
    for kind, m in mb.maps.items():
        m = m.cpu().numpy()
        bgk = mb.background[kind].cpu().numpy() if kind in mb.background else None
        for b, i in enumerate(idx):
            rows = np.flatnonzero(pairs[:, 0] == b)
            classes = pairs[rows, 1].astype(np.int64)
            maps = m[rows]
            if mc.overlays:  # written first: a seed file's existence means its image is done
                rgb = raw[b].permute(1, 2, 0).numpy()
                top = maps.max(0) if len(classes) else np.zeros(rgb.shape[:2], np.float32)
                save_png(out_dir / f"{kind}_overlays" / f"{ds.ids[i]}.png", overlay(rgb, top))
            seed = SeedMaps(classes, maps, {"kind": kind, "image_id": ds.ids[i]},
                            None if bgk is None else bgk[b])
            save_seed(seed_path(out_dir / kind, ds.ids[i]), seed, mc.save_dtype)
