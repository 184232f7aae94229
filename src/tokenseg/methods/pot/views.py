"""POT's training views: SIPE's augmentation or the code's 512×512 resize, with the CLIP-ES maps co-augmented."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .model import grid_size
from .config import augment_of, flip_of


# ----------------------------------------------------------------------------------------- views
class POTView:
    """One training view of a sample with its CLIP-ES maps co-augmented.

    ``sipe`` (SIPE / the code's COCO): long side → randint(resize_long) (PIL bicubic), normalise, flip
    (random bit), random crop ``crop`` (the code's box rule; padding 0 after normalisation); the maps get
    the same resize (bilinear), flip and crop, then go to the feature grid. ``resize`` (the code's VOC,
    §16.20): the image to ``resize``², the maps straight from image size to the grid (bilinear, as the
    code), optional flip. Outputs: the image tensor and ``valid`` (g, g) (inside the crop) and, with
    seeds, ``clip`` (C, g, g) dense (0 for classes not in the seed file). In paper mode the maps are
    downsampled with antialiasing [I: a 16x bilinear step samples 1 pixel in 256]; code mode as the code.
    Randomness: Python's ``random`` (seeded per sample by the engine), in SIPE's order."""

    def __init__(self, pc) -> None:
        self.augment, self.flip, self.code = augment_of(pc), flip_of(pc), pc.mode == "code"
        self.lo, self.hi = (int(v) for v in pc.resize_long)
        self.crop, self.resize, self.stride = int(pc.crop), int(pc.resize), int(pc.output_stride)
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.std = np.asarray(IMAGENET_STD, np.float32)

    def _norm(self, arr: np.ndarray) -> np.ndarray:
        return (arr.astype(np.float32) / 255.0 - self.mean) / self.std

    def _grid(self, maps: torch.Tensor, g: int) -> torch.Tensor:
        return F.interpolate(maps[None], (g, g), mode="bilinear", align_corners=False,
                             antialias=not self.code and maps.shape[-1] > g)[0]

    def __call__(self, image, extras: dict) -> tuple[torch.Tensor, dict]:
        from PIL import Image

        image = image.convert("RGB")
        W0, H0 = image.size
        maps = None
        if "clip_maps" in extras:
            maps = torch.from_numpy(np.asarray(extras["clip_maps"], np.float32))
            if tuple(maps.shape[-2:]) != (H0, W0) and len(maps):
                maps = F.interpolate(maps[None], (H0, W0), mode="bilinear", align_corners=False)[0]
        if self.augment == "resize":
            S = self.resize
            img = self._norm(np.asarray(image.resize((S, S), Image.BICUBIC)))
            flip = self.flip and bool(random.getrandbits(1))
            g = grid_size(S, self.stride)
            valid = torch.ones(g, g)
            if maps is not None:
                maps = self._grid(maps, g) if len(maps) else maps.new_zeros(0, g, g)
            if flip:
                img = img[:, ::-1]
                maps = maps.flip(-1) if maps is not None else None
        else:
            target = random.randint(self.lo, self.hi)
            scale = target / H0 if W0 < H0 else target / W0
            h1, w1 = int(np.round(H0 * scale)), int(np.round(W0 * scale))
            arr = np.asarray(image if (h1, w1) == (H0, W0) else image.resize((w1, h1), Image.BICUBIC))
            img = self._norm(arr)
            flip = self.flip and bool(random.getrandbits(1))
            if flip:
                img = img[:, ::-1]
            S = self.crop
            box = crop_box((h1, w1), S)
            out = np.zeros((S, S, 3), np.float32)
            out[box[0]:box[1], box[2]:box[3]] = img[box[4]:box[5], box[6]:box[7]]
            img = out
            mask = torch.zeros(S, S)
            mask[box[0]:box[1], box[2]:box[3]] = 1.0
            g = grid_size(S, self.stride)
            valid = F.interpolate(mask[None, None], (g, g), mode="nearest")[0, 0]
            if maps is not None:
                if len(maps):
                    m = F.interpolate(maps[None], (h1, w1), mode="bilinear", align_corners=False)[0]
                    m = m.flip(-1) if flip else m
                    c = m.new_zeros(len(m), S, S)
                    c[:, box[0]:box[1], box[2]:box[3]] = m[:, box[4]:box[5], box[6]:box[7]]
                    maps = self._grid(c, g)
                else:
                    maps = maps.new_zeros(0, g, g)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        out_extras = {"valid": valid.numpy().astype(np.float32)}
        if maps is not None:
            dense = torch.zeros(int(extras["clip_num_classes"]), g, g)
            classes = torch.from_numpy(np.asarray(extras["clip_classes"], np.int64))
            if len(classes):
                dense[classes] = maps
            out_extras["clip"] = dense.numpy()
        return x, out_extras


def crop_box(size: tuple[int, int], crop: int) -> tuple[int, ...]:
    """SIPE/IRN's random crop box: (container top, bottom, left, right, image top, bottom, left, right);
    a side smaller than the crop is placed at a random offset in the container (drawn width first)."""
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    if w_space > 0:
        cont_left, img_left = 0, random.randrange(w_space + 1)
    else:
        cont_left, img_left = random.randrange(-w_space + 1), 0
    if h_space > 0:
        cont_top, img_top = 0, random.randrange(h_space + 1)
    else:
        cont_top, img_top = random.randrange(-h_space + 1), 0
    return (cont_top, cont_top + ch, cont_left, cont_left + cw, img_top, img_top + ch, img_left, img_left + cw)


def views(cfg) -> dict:
    return {"image": POTView(cfg.pot)}
