"""Real photos (scikit-image's sample images) with CAM-like soft seeds: the DenseCRF comparisons of
``tests/test_post_crf.py`` and ``benchmarks/bench_crf.py`` run on the same cases.

A seed here is what a CAM looks like to the CRF: each foreground class a smooth blob field (a random
coarse grid, one cell per 24 px, bilinearly upsampled — the blur of a stride-16 CAM), squared and
max-normalised, against a constant background score of 0.3; the probabilities are their normalised
sum. The blobs do not follow the photo's edges, so the CRF has real work to do."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image (no download)
SIZES = ((64, 64), (96, 96), (500, 375))  # (W, H): the exact cut-off (4096 px), the demo's images, VOC


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: the sample photo centre-cropped to the aspect of ``size`` (W, H), resized bicubically."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())[..., :3]
    H, W = img.shape[:2]
    tw, th = size
    if W * th > H * tw:  # too wide
        cw = H * tw // th
        img = img[:, (W - cw) // 2:(W - cw) // 2 + cw]
    else:
        ch = W * th // tw
        img = img[(H - ch) // 2:(H - ch) // 2 + ch]
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(size, Image.BICUBIC), dtype=np.uint8)


def cam_probs(height: int, width: int, n_labels: int = 3, seed: int = 0, background: float = 0.3) -> np.ndarray:
    """(n_labels, H, W) float32 CAM-like class probabilities (module docstring); label 0 = background."""
    g = torch.Generator().manual_seed(seed)
    grid = (max(height // 24, 2), max(width // 24, 2))
    fg = F.interpolate(torch.rand(1, n_labels - 1, *grid, generator=g), size=(height, width), mode="bilinear",
                       align_corners=False)[0] ** 2
    fg = fg / fg.amax((1, 2), keepdim=True)
    scores = torch.cat([torch.full((1, height, width), background), fg])
    return (scores / scores.sum(0, keepdim=True)).numpy().astype(np.float32)


def case(name: str, size: tuple[int, int], preset: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The image and the CRF input of one comparison: soft probabilities, or for the ``irn`` preset
    (IRN's label CRF) the unary of their argmax (gt_prob 0.7)."""
    from tokenseg.core.crf import label_probs

    image = photo(name, size)
    probs = cam_probs(size[1], size[0], seed=seed + PHOTOS.index(name))
    if preset == "irn":
        probs = label_probs(probs.argmax(0), probs.shape[0], 0.7)
    return image, probs
