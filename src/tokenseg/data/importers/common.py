"""What every importer returns (:class:`Source` of :class:`Item` with :class:`Shape`) and the helpers they share."""
from __future__ import annotations

import os
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from ...core.errors import TokensegError
from ..base import IMAGE_EXTENSIONS
from ..scan import exif_orientation
from ..labels import read_class_names



IMPORT_FORMATS = ("yolo", "coco", "labelme")
# [I] hard links by default: no extra disk, and unlike symlinks the copy survives the source folder
# being moved or deleted, and nothing that opens DST/images can reach back into the source folder by
# following a link. Falls back to a copy across file systems. tokenseg never writes into images.
LINK_MODES = ("hard", "copy", "symlink")
MARKER = ".tokenseg_import.json"
MARKER_VERSION = 1
IGNORE_NAMES = ("__ignore__", "_ignore_")
SPLIT_NAME = re.compile(r"^(train|val|valid|validation|test|dev)[\w-]*$", re.IGNORECASE)
IGNORE_VALUE = 255
# EXIF orientation -> the PIL transpose that shows the image upright (ImageOps.exif_transpose's table)
_EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                   6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


@dataclass
class Shape:
    """One object: ``value`` 1..C (class + 1), 0 (a background hole) or 255 (ignore); ``seg`` polygons
    ``[[x1, y1, ...], ...]`` (pixels, or [0, 1] with ``normalised``), a COCO RLE, an (h, w) bool array,
    or None for an object without area (a box, a point: image label only)."""

    value: int
    seg: Any
    area: float = 0.0
    crowd: bool = False


@dataclass
class Item:
    id: str  # output id: relative path without extension
    image: Path | None  # the source image (None: embedded bytes)
    ext: str
    split: str = ""
    size: tuple[int, int] | None = None  # (width, height) the annotation was made on; None: the image's
    shapes: list[Shape] = field(default_factory=list)
    classes: set[int] = field(default_factory=set)  # image-level labels, 0-based
    where: str = ""  # the annotation file, for messages
    normalised: bool = False  # YOLO: polygon coordinates are fractions of the image size
    image_bytes: bytes | None = None  # LabelMe imageData

    @property
    def has_mask(self) -> bool:
        return all(s.seg is not None for s in self.shapes)


@dataclass
class Source:
    format: str
    classes: list[str]
    items: list[Item]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    image_dirs: list[Path] = field(default_factory=list)
    segmentation: bool = True  # False: no object of the source has an area (boxes only): no masks


def _split_of(rel: str) -> str:
    first = rel.split("/", 1)[0]
    return first if "/" in rel and SPLIT_NAME.match(first) else ""


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return out


def _class_file(path: str | Path | None) -> list[str] | None:
    return read_class_names(path) if path else None


def _check_names(names: Sequence[str], where: str) -> list[str]:
    names = [str(n).strip() for n in names]
    for n in names:
        if any(c in n for c in ";|\n\r"):
            raise TokensegError(f"{where}: class name {n!r} holds ';', '|' or a line break, which labels.csv "
                                f"uses as separators: rename it (--classes FILE)")
    return names


def _image_size(item: Item) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(upright size, stored size, EXIF orientation) of an item's image, from its header."""
    from PIL import Image

    src = io.BytesIO(item.image_bytes) if item.image_bytes is not None else item.image
    with Image.open(src) as img:
        w, h = img.size
        orient = exif_orientation(img)
    up = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    return up, (w, h), orient
