"""Images with their label masks, randomly scaled, flipped and cropped: the training samples of every
network trained on masks (DeepLab, AffinityNet, IRN)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import TokensegError
from ..core.masks import IGNORE_INDEX, read_mask
from .transforms import normalise_array as normalise_image


class CropDataset(Dataset):
    """Images with label masks, augmented as DeepLab: random scale, flip, pad, random crop.

    Randomness comes from ``(seed, epoch, index)`` so a sample is the same however it is loaded."""

    def __init__(self, dataset, indices: list[int], mask_dir: str | Path, crop: int,
                 scale_range=(0.7, 1.3), flip: bool = True, seed: int = 0, extent: bool = False) -> None:
        self.ds = dataset
        self.extent = extent  # also return the (h, w) of the crop that is image, not padding
        self.indices = list(indices)
        self.mask_dir = Path(mask_dir)
        self.crop = int(crop)
        self.scale_range = tuple(float(s) for s in scale_range)
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def load_pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image = self.ds.load_image(i)
        path = self.mask_dir / f"{self.ds.ids[i]}.png"
        mask = read_mask(path)
        if mask.shape != (image.height, image.width):
            raise TokensegError(f"{path}: mask size {mask.shape} differs from image size "
                                f"{(image.height, image.width)} of {self.ds.ids[i]!r}")
        bad = (mask != IGNORE_INDEX) & (mask > self.ds.num_classes)
        if bad.any():
            raise TokensegError(f"{path}: label {int(mask[bad].max())} exceeds the {self.ds.num_classes} classes "
                                f"(+ background 0, ignore 255) of the dataset")
        return image, mask

    def __getitem__(self, k: int):
        i = self.indices[k]
        image, mask = self.load_pair(i)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        lo, hi = self.scale_range
        s = rng.uniform(lo, hi) if hi > lo else lo
        if s != 1.0:
            size = (max(1, int(round(image.width * s))), max(1, int(round(image.height * s))))
            image = image.resize(size, Image.BILINEAR)
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        img = np.asarray(image, dtype=np.uint8)
        if self.flip and rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        x = normalise_image(img)
        c = self.crop
        H, W = mask.shape
        content = torch.tensor([min(H, c), min(W, c)])
        ph, pw = max(c - H, 0), max(c - W, 0)
        if ph or pw:  # pad: image with 0 (= the mean colour after normalisation), mask with ignore
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
            H, W = mask.shape
        y0 = int(rng.integers(0, H - c + 1))
        x0 = int(rng.integers(0, W - c + 1))
        x = x[:, y0:y0 + c, x0:x0 + c]
        mask = mask[y0:y0 + c, x0:x0 + c]
        x, mask = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return (x, mask, content) if self.extent else (x, mask)
