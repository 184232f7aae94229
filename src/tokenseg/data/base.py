"""The dataset interface every reader (synthetic/VOC, COCO, folder + CSV) implements.

A dataset is a *spec*: image ids, image paths, image-level labels, optional masks and class names.
Readers never write into the dataset folder; anything derived (converted masks, caches) goes to a
cache folder the caller names.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import TokensegError
from ..core.masks import read_mask
from ..core.files import relative_name_problem

# constants every reader (and the label tools) share
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
# MS COCO's 80 classes in the standard (category id) order
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")

# [I] Transparent pixels are composited on the ImageNet mean colour (0.485, 0.456, 0.406) x 255: after
# the network's normalisation that is an all-zero input, the colour that says least about any class.
# Black (PIL's default when dropping alpha) was then predicted as a class; white is a strong bright
# colour (sky, snow, paper) that a model trained on photos reads as evidence too.
TRANSPARENT_FILL = (124, 116, 104)


class Sample(NamedTuple):
    """One image of a :class:`WSSSDataset` (``image, labels, image_id = ds[i]``)."""

    image: Image.Image
    labels: np.ndarray
    image_id: str


@dataclass
class WSSSDataset:
    """Image ids with their files and image-level labels.

    ``labels[i]`` lists the 0-based *foreground* class indices present in image ``i`` (background is
    never listed; in masks, class ``c`` is stored as ``c + 1`` and 0 is background, 255 ignore).
    """

    name: str
    class_names: list[str]
    ids: list[str]
    image_paths: list[Path]
    labels: list[list[int]]
    mask_paths: list[Path | None] | None = None
    label_source: str = "unknown"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.image_paths) != n or len(self.labels) != n:
            raise ValueError("ids, image_paths and labels must have the same length")
        if self.mask_paths is not None and len(self.mask_paths) != n:
            raise ValueError("mask_paths must have one entry per id")
        for image_id in self.ids:  # a reader's own check names the labels file; this one guards the rest
            problem = relative_name_problem(image_id)
            if problem:
                raise TokensegError(f"{self.name}: image id {image_id!r} {problem}: image ids are relative "
                                    f"paths (outputs are named after them)")
        C = self.num_classes
        for i, lab in enumerate(self.labels):
            for c in lab:
                if not 0 <= c < C:
                    raise TokensegError(
                        f"image {self.ids[i]!r}: label index {c} is outside 0..{C - 1} ({self.name})")
        self._index = {k: i for i, k in enumerate(self.ids)}

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C."""
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        return self.mask_paths is not None and all(p is not None for p in self.mask_paths)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> "Sample":
        """``ds[i]``: the image (PIL, RGB, as stored: no resizing, no normalisation), its multi-hot
        labels (C,) float32 and its id."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: index {i} out of range for {len(self)} images")
        i %= len(self)
        return Sample(self.load_image(i), self.multi_hot(i), self.ids[i])

    def index_of(self, image_id: str) -> int:
        return self._index[image_id]

    def multi_hot(self, i: int) -> np.ndarray:
        y = np.zeros(self.num_classes, dtype=np.float32)
        y[self.labels[i]] = 1.0
        return y

    def load_image(self, i: int) -> Image.Image:
        return load_rgb(self.image_paths[i])

    def load_mask(self, i: int) -> np.ndarray:
        if self.mask_paths is None or self.mask_paths[i] is None:
            raise TokensegError(f"image {self.ids[i]!r} has no ground-truth mask ({self.name})")
        mask = read_mask(self.mask_paths[i])
        bad = (mask != 255) & (mask > self.num_classes)
        if bad.any():
            raise TokensegError(
                f"{self.mask_paths[i]}: mask value {int(mask[bad].max())} exceeds the class count "
                f"{self.num_classes} (+ background 0, ignore 255)")
        return mask

    def subset(self, ids: Sequence[str]) -> "WSSSDataset":
        idx = [self._index[k] for k in ids]
        return WSSSDataset(
            name=self.name, class_names=list(self.class_names), ids=[self.ids[i] for i in idx],
            image_paths=[self.image_paths[i] for i in idx], labels=[self.labels[i] for i in idx],
            mask_paths=None if self.mask_paths is None else [self.mask_paths[i] for i in idx],
            label_source=self.label_source, meta=dict(self.meta))


def image_hw(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header, after EXIF rotation (as :func:`load_rgb` shows it), without
    decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block: the pixels are still readable
                orientation = 1
    except FileNotFoundError as exc:
        raise TokensegError(f"{path}: image file not found") from exc
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_rgb(path: str | Path, fill: tuple[int, int, int] = TRANSPARENT_FILL) -> Image.Image:
    """Open any image as 8-bit RGB: EXIF rotation applied; grayscale, CMYK, 16-bit converted; transparent
    pixels (RGBA, LA, palette or colour-key transparency) composited on ``fill`` (see
    :data:`TRANSPARENT_FILL`)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if arr.max(initial=0) > 255 else 255.0
                img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                img = img.convert("RGBA")
                bg = Image.new("RGB", img.size, tuple(int(v) for v in fill))
                bg.paste(img, mask=img.getchannel("A"))
                img = bg
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise TokensegError(f"{path}: image file not found") from exc
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def size_batches(ds: WSSSDataset, indices: list[int], batch_size: int, budget_bytes: int = 0,
                 cost=None) -> list[list[int]]:
    """Group images of equal size into batches (VOC has few distinct sizes) of at most ``batch_size``
    images and, when ``budget_bytes`` is set, at most that much estimated memory (``cost(i, size)``)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    sizes = {}
    for i in indices:
        sizes[i] = image_hw(ds.image_paths[i])
        groups[sizes[i]].append(i)
    batches = []
    for _, idx in sorted(groups.items()):
        current, used = [], 0
        for i in idx:
            c = cost(i, sizes[i]) if (budget_bytes and cost) else 0
            if current and (len(current) >= batch_size or (budget_bytes and used + c > budget_bytes)):
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += c
        if current:
            batches.append(current)
    return batches
