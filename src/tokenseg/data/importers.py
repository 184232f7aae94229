"""``tokenseg data import``: the label formats labelling tools write -> the folder layout of
``data.format=folder`` (:mod:`tokenseg.data.folder`)::

    DST/images/<id>.<ext>    the images (hard links by default, see LINK_MODES)
    DST/masks/<id>.png       rasterised polygons/masks: palette PNG, 0 background, c + 1 class c, 255 ignore
    DST/labels.csv           image,labels[,split]   image-level labels (every object's class)
    DST/classes.txt          the class order

Sources (``--from``):

* ``yolo`` -- Ultralytics/YOLO: ``images/[<split>/]*.jpg`` with ``labels/[<split>/]*.txt`` (or Roboflow's
  ``<split>/images`` + ``<split>/labels``); one object per line, ``class x1 y1 x2 y2 ...`` (a normalised
  polygon: YOLO-seg, also OBB's 4 corners) or ``class cx cy w h`` (a box). Class names from
  ``--classes``, else ``data.yaml`` (any ``*.yaml`` with ``names``), ``classes.txt`` or ``obj.names``.
  Boxes give image labels only: an image with a box gets no mask (a mask without that object would
  call it background); a folder of boxes only gives labels and no masks at all. An image without a
  label file, or with an empty one, is background only (Ultralytics' rule).
* ``coco`` -- COCO instances JSON (any tool's export): a ``.json`` file, or a folder with
  ``annotations/instances_<split>.json`` (+ ``<split>/`` image folders) or Roboflow's
  ``<split>/_annotations.coco.json``. Parsed and rasterised by :mod:`tokenseg.data.coco` (pycocotools
  when installed); crowd regions become 255 (ignore) where no instance covers them; images without
  annotations are left out as in the COCO reader (``--keep-empty`` keeps them as background).
* ``labelme`` -- LabelMe ``*.json`` files (any depth): ``polygon``, ``rectangle``, ``circle`` and
  ``mask`` shapes are painted; ``line``/``point`` shapes give image labels only (no mask for that
  image). ``_background_``/``background`` shapes paint background (holes), ``__ignore__`` paints 255.
  The image is ``imagePath`` (relative to the JSON), or the embedded ``imageData``.

Overlaps are painted largest first, so small objects stay visible on top (the COCO reader's rule);
pixels are inside a polygon when their centre is (pycocotools' convention).

Nothing is written into the source. Every file is written atomically, and the command resumes: a
destination that holds an earlier import of the same source with the same options is completed
(files already there are kept); any other non-empty destination is refused without ``--overwrite``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.files import (TEMP_PREFIX, atomic_write, remove_stale_temps, display_name, relative_name_problem, safe_output_path, write_bytes_atomic, write_json_atomic, write_text_atomic)
from ..core.errors import TokensegError
from ..core.locks import output_lock
from ..core.masks import save_palette_png
from .base import IMAGE_EXTENSIONS
from .guard import refuse_inside_dataset
from .labels import BACKGROUND_NAMES, EntryErrors, did_you_mean, read_class_names
from .scan import EXIF_ORIENTATION, MAX_LISTED

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


# ----------------------------------------------------------------------------------------------
# YOLO
# ----------------------------------------------------------------------------------------------

def _yolo_names(src: Path) -> tuple[list[str] | None, str]:
    import yaml

    yamls = [src / "data.yaml", src / "dataset.yaml"] + sorted(src.glob("*.yaml")) + sorted(src.glob("*.yml"))
    for y in dict.fromkeys(yamls):
        if not y.is_file():
            continue
        try:
            doc = yaml.safe_load(y.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TokensegError(f"{y}: cannot read ({exc})") from exc
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, dict):
            try:
                keys = sorted(int(k) for k in names)
            except (TypeError, ValueError):
                raise TokensegError(f"{y}: 'names' keys must be class indices 0, 1, ...") from None
            if keys != list(range(len(keys))):
                raise TokensegError(f"{y}: 'names' must number the classes 0..{len(keys) - 1} without gaps")
            names = [names[k] if k in names else names[str(k)] for k in keys]
        if isinstance(names, list) and names:
            return [str(n) for n in names], str(y)
    for c in (src / "classes.txt", src / "obj.names", src / "labels" / "classes.txt"):
        if c.is_file():
            try:
                lines = c.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise TokensegError(f"{c}: cannot read class names ({exc})") from exc
            names = [ln.strip() for ln in lines if ln.strip()]
            if names:
                return names, str(c)  # YOLO numbers from 0: no 'background' line to drop
    return None, ""


def _yolo_pairs(src: Path) -> list[tuple[Path, Path]]:
    """(images folder, labels folder) pairs: ``images/`` + ``labels/`` or ``<split>/images`` + ``<split>/labels``."""
    pairs = []
    if (src / "images").is_dir():
        pairs.append((src / "images", src / "labels"))
    for d in sorted(p for p in src.iterdir() if p.is_dir() and (p / "images").is_dir()):
        pairs.append((d / "images", d / "labels"))
    return pairs


def read_yolo(src: str | Path, classes: Sequence[str] | None = None) -> Source:
    src = Path(src)
    pairs = _yolo_pairs(src)
    if not pairs:
        raise TokensegError(f"{src}: not a YOLO folder: expected images/ and labels/ (or <split>/images and "
                            f"<split>/labels) inside it")
    names, names_from = (list(classes), "--classes") if classes else _yolo_names(src)
    items: list[Item] = []
    problems: list[str] = []
    n_boxes = n_polys = n_nolabel = n_empty = 0
    box_images: list[str] = []
    orphans: list[Path] = []  # label files without an image
    max_class = -1
    for images_dir, labels_dir in pairs:
        prefix = "" if images_dir == src / "images" else images_dir.parent.name + "/"
        stems = {p.relative_to(images_dir).with_suffix("").as_posix() for p in _image_files(images_dir)}
        if labels_dir.is_dir():
            orphans += [t for t in sorted(labels_dir.rglob("*.txt"))
                        if t.relative_to(labels_dir).with_suffix("").as_posix() not in stems
                        and t.name != "classes.txt"]
        for img in _image_files(images_dir):
            rel = img.relative_to(images_dir).with_suffix("")
            image_id = prefix + rel.as_posix()
            lab = labels_dir / rel.with_suffix(".txt")
            item = Item(image_id, img, img.suffix.lower(), _split_of(image_id), where=str(lab), normalised=True)
            items.append(item)
            if not lab.is_file():
                n_nolabel += 1
                continue
            try:
                lines = lab.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{lab}: cannot read ({exc})")
                item.where = ""  # marks the item as failed
                continue
            bad = False
            for k, line in enumerate(lines, 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                try:
                    cls = float(parts[0])
                    vals = [float(v) for v in parts[1:]]
                except ValueError:
                    problems.append(f"{lab}:{k}: not numbers: {line.strip()[:80]!r}")
                    bad = True
                    continue
                if cls != int(cls) or cls < 0:
                    problems.append(f"{lab}:{k}: class {parts[0]!r} is not a class index 0, 1, ...")
                    bad = True
                    continue
                cls = int(cls)
                max_class = max(max_class, cls)
                if vals and (min(vals) < -0.01 or max(vals) > 1.01):
                    problems.append(f"{lab}:{k}: coordinates must be fractions of the image size (0..1), got "
                                    f"{min(vals):g}..{max(vals):g} (pixel coordinates?)")
                    bad = True
                    continue
                vals = [min(max(v, 0.0), 1.0) for v in vals]
                if len(vals) == 4:
                    item.shapes.append(Shape(cls + 1, None))
                    n_boxes += 1
                elif len(vals) >= 6 and len(vals) % 2 == 0:
                    xy = np.asarray(vals).reshape(-1, 2)
                    x, y = xy[:, 0], xy[:, 1]
                    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
                    item.shapes.append(Shape(cls + 1, [vals], area))
                    n_polys += 1
                else:
                    problems.append(f"{lab}:{k}: expected 'class cx cy w h' (a box) or 'class x1 y1 x2 y2 x3 y3 "
                                    f"...' (a polygon), got {len(vals)} numbers")
                    bad = True
                    continue
                item.classes.add(cls)
            if bad:
                item.where = ""
            elif not item.shapes:
                n_empty += 1
            if item.shapes and not item.has_mask:
                box_images.append(image_id)
    if items and n_nolabel == len(items):
        raise TokensegError(f"{src}: no label file for any image (looked for labels/<same path>.txt next to "
                            f"{', '.join(str(p[0]) for p in pairs)}): is this a YOLO folder?")
    if names is None:
        raise TokensegError(
            f"{src}: no class names: give --classes FILE (one name per line, class 0 first) or a data.yaml with "
            f"'names' (looked for data.yaml, *.yaml, classes.txt, obj.names); the labels use class indices "
            f"0..{max_class}")
    names = _check_names(names, names_from)
    if max_class >= len(names):
        raise TokensegError(f"{src}: the labels use class index {max_class} but {names_from} names "
                            f"{len(names)} classes (0..{len(names) - 1})")
    notes = []
    segmentation = n_polys > 0
    if not segmentation:
        notes.append(f"{n_boxes} boxes and no polygon: image-level labels only, no masks "
                     f"(boxes are not masks; YOLO-seg polygons would give masks)")
    elif box_images:
        notes.append(f"{len(box_images)} image(s) have boxes besides polygons: labels only, no mask for them "
                     f"(e.g. {box_images[0]!r})")
    if n_nolabel:
        notes.append(f"{n_nolabel} image(s) have no label file: background only (as Ultralytics treats them)")
    if orphans:
        notes.append(f"{len(orphans)} label file(s) have no image and are left out (e.g. {orphans[0]}): is an "
                     f"image missing or misnamed?")
    if n_empty:
        notes.append(f"{n_empty} image(s) have an empty label file: background only")
    notes.append(f"class names from {names_from}")
    return Source("yolo", names, items, notes, problems, [p[0] for p in pairs], segmentation)


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------

def _coco_files(src: Path, split: str = "") -> list[tuple[str, Path]]:
    if src.is_file():
        return [(split, src)]
    found = [(p.stem.replace("instances_", ""), p) for p in sorted((src / "annotations").glob("instances_*.json"))]
    if not found:
        found = [(p.parent.name, p) for p in sorted(src.glob("*/_annotations.coco.json"))]
    if not found:
        found = [(p.stem, p) for p in sorted(src.glob("*.json"))]
    if not found:
        raise TokensegError(f"{src}: no COCO JSON: expected a .json file, annotations/instances_<split>.json or "
                            f"<split>/_annotations.coco.json")
    if split:
        if len(found) > 1:
            raise TokensegError(f"{src}: --split names the split of one JSON file; this folder has "
                                f"{len(found)} ({', '.join(s for s, _ in found)})")
        found = [(split, found[0][1])]
    return found


def _coco_image_root(ann: Path, src: Path, split: str, first_file: str, images: str | Path | None) -> Path:
    from .coco import coco_image_dir

    cands = ([Path(images)] if images else []) + [ann.parent, ann.parent / "images"]
    if src.is_dir():
        cands += [coco_image_dir(src, split), src / "images", src]
    cands += [ann.parent.parent / "images", ann.parent.parent]
    for c in cands:
        if first_file and (c / first_file).is_file():
            return c
    if images:
        return Path(images)
    raise TokensegError(f"{ann}: cannot find its images (e.g. {first_file!r}); looked in "
                        f"{', '.join(str(c) for c in dict.fromkeys(cands))}: give --images DIR")


def read_coco(src: str | Path, classes: Sequence[str] | None = None, split: str = "",
              images: str | Path | None = None, keep_empty: bool = False) -> Source:
    from .coco import read_coco_instances

    src = Path(src)
    if not src.exists():
        raise TokensegError(f"{src}: no such file or folder")
    files = _coco_files(src, split)
    names: list[str] | None = None
    items: list[Item] = []
    problems: list[str] = []
    notes: list[str] = []
    image_dirs: list[Path] = []
    seen: dict[str, str] = {}
    n_boxes = n_area = 0
    for sname, ann in files:
        index = read_coco_instances(ann)
        if names is None:
            names = index["classes"]
        elif index["classes"] != names:
            raise TokensegError(f"{ann}: its categories differ from {files[0][1]}'s; import the files one by one")
        first = next((im["file_name"] for im in index["images"]), "")
        root = _coco_image_root(ann, src, sname, first, images)
        image_dirs.append(root)
        prefix = f"{sname}/" if len(files) > 1 and sname else ""
        empty = 0
        for im in index["images"]:
            fname = im["file_name"].replace("\\", "/")
            bad = relative_name_problem(fname)
            if bad:
                problems.append(f"{ann}: image {im['coco_id']} file_name {fname!r} {bad}")
                continue
            if not im["anns"] and not keep_empty:
                empty += 1
                continue
            image_id = prefix + str(Path(fname).with_suffix("").as_posix())
            if image_id in seen:
                problems.append(f"{ann}: image {im['coco_id']} ({fname}) has the same id {image_id!r} as an image of "
                                f"{seen[image_id]}")
                continue
            seen[image_id] = str(ann)
            item = Item(image_id, root / fname, Path(fname).suffix.lower(), sname, (im["width"], im["height"]),
                        where=str(ann))
            for value, crowd, seg, area in im["anns"]:
                has_area = bool(seg) and not (isinstance(seg, list) and not any(len(p) >= 6 for p in seg))
                if isinstance(seg, list):
                    seg = [p for p in seg if len(p) >= 6]
                item.shapes.append(Shape(value, seg if has_area else None, area, bool(crowd)))
                n_area += has_area
                n_boxes += not has_area
                item.classes.add(value - 1)
            items.append(item)
        if empty:
            notes.append(f"{ann.name}: {empty} image(s) without annotations left out (--keep-empty keeps them "
                         f"as background)")
    assert names is not None
    if classes:
        order = list(classes)
        unknown = [n for n in names if n not in order]
        if unknown:
            hint = "; ".join(f"{n!r}" + (f" (did you mean {did_you_mean(n, order)!r}?)" if did_you_mean(n, order)
                                         else "") for n in unknown[:MAX_LISTED])
            raise TokensegError(f"--classes lists {len(order)} classes, but the COCO categories also have: {hint}")
        remap = {k + 1: order.index(n) + 1 for k, n in enumerate(names)}
        for it in items:
            for s in it.shapes:
                s.value = remap[s.value]
            it.classes = {remap[c + 1] - 1 for c in it.classes}
        names = order
    used = {c for it in items for c in it.classes}
    unused = [n for k, n in enumerate(names) if k not in used]
    if unused:
        notes.append(f"{len(unused)} class(es) have no annotation: {', '.join(unused[:10])}"
                     f"{' ...' if len(unused) > 10 else ''} (--classes FILE chooses the classes)")
    if n_boxes:
        notes.append(f"{n_boxes} annotation(s) without a segmentation (boxes): their images get labels, no mask")
    return Source("coco", _check_names(names, str(files[0][1])), items, notes, problems, image_dirs, n_area > 0)


# ----------------------------------------------------------------------------------------------
# LabelMe
# ----------------------------------------------------------------------------------------------

def _labelme_shape(sh: dict, value: int, size: tuple[int, int] | None) -> Shape:
    kind = sh.get("shape_type") or "polygon"
    pts = np.asarray(sh.get("points") or [], dtype=np.float64).reshape(-1, 2)
    if kind == "polygon" and len(pts) >= 3:
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
        return Shape(value, [pts.reshape(-1).tolist()], area)
    if kind == "rectangle" and len(pts) >= 2:
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        return Shape(value, [[x0, y0, x1, y0, x1, y1, x0, y1]], float((x1 - x0) * (y1 - y0)))
    if kind == "circle" and len(pts) >= 2 and size is not None:
        (cx, cy), (px, py) = pts[0], pts[1]
        r2 = (px - cx) ** 2 + (py - cy) ** 2
        W, H = size
        yy, xx = np.ogrid[:H, :W]
        disk = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r2  # pixel centres inside the circle
        return Shape(value, disk, float(np.pi * r2))
    if kind == "mask" and sh.get("mask") and len(pts) >= 1 and size is not None:
        import base64

        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(sh["mask"]))) as m:
            part = np.asarray(m.convert("L")) > 0
        W, H = size
        x0, y0 = int(round(pts[0][0])), int(round(pts[0][1]))
        full = np.zeros((H, W), dtype=bool)
        ys, xs = slice(max(y0, 0), min(y0 + part.shape[0], H)), slice(max(x0, 0), min(x0 + part.shape[1], W))
        full[ys, xs] = part[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return Shape(value, full, float(part.sum()))
    return Shape(value, None)  # line, linestrip, point(s), degenerate polygon: no area


def read_labelme(src: str | Path, classes: Sequence[str] | None = None) -> Source:
    src = Path(src)
    if not src.is_dir():
        raise TokensegError(f"{src}: not a folder of LabelMe JSON files")
    docs: list[tuple[Path, dict]] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.lower().endswith(".json") or f.startswith("."):
                continue
            p = Path(dirpath) / f
            try:
                doc = json.loads(p.read_text(encoding="utf-8-sig"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                docs.append((p, {"_error": str(exc)}))
                continue
            if isinstance(doc, dict) and isinstance(doc.get("shapes"), list):
                docs.append((p, doc))
            else:
                skipped += 1
    if not docs:
        raise TokensegError(f"{src}: no LabelMe JSON (a file with 'shapes' and 'imagePath') found")
    special = {n.lower() for n in BACKGROUND_NAMES + IGNORE_NAMES}
    found = sorted({str(sh.get("label", "")).strip() for _, d in docs for sh in d.get("shapes", [])
                    if isinstance(sh, dict)} - {""})
    if classes:
        names = list(classes)
        errors = EntryErrors(src)
        for n in found:
            if n not in names and n.lower() not in special:
                hint = did_you_mean(n, names)
                where = next(p for p, d in docs for sh in d.get("shapes", []) if str(sh.get("label", "")).strip() == n)
                errors.add(f"{where}: label {n!r} is not in --classes" + (f" (did you mean {hint!r}?)" if hint else ""))
        errors.raise_if_any()
    else:
        names = [n for n in found if n.lower() not in special]
    index = {n: k for k, n in enumerate(names)}
    items: list[Item] = []
    problems: list[str] = []
    no_area = 0
    dirs: set[Path] = set()
    for p, doc in docs:
        if "_error" in doc:
            problems.append(f"{p}: cannot read ({doc['_error']})")
            continue
        image_id = p.relative_to(src).with_suffix("").as_posix()
        ipath = str(doc.get("imagePath") or "").replace("\\", "/")
        img = (p.parent / ipath) if ipath else None
        if img is not None and not img.is_file() and (p.parent / Path(ipath).name).is_file():
            img = p.parent / Path(ipath).name
        data = None
        if img is None or not img.is_file():
            if doc.get("imageData"):
                import base64

                data = base64.b64decode(doc["imageData"])
                img = None
            else:
                problems.append(f"{p}: image {ipath!r} not found (and no imageData in the file)")
                continue
        else:
            dirs.add(img.parent)
        ext = Path(ipath).suffix.lower() or ".png"
        size = None
        if doc.get("imageWidth") and doc.get("imageHeight"):
            size = (int(doc["imageWidth"]), int(doc["imageHeight"]))
        item = Item(image_id, img, ext, _split_of(image_id), size, where=str(p), image_bytes=data)
        if size is None:
            size = _image_size(item)[0]
            item.size = size
        for sh in doc["shapes"]:
            label = str(sh.get("label", "") if isinstance(sh, dict) else "").strip()
            if not label:
                problems.append(f"{p}: a shape has no label")
                item.where = ""
                break
            if label.lower() in {n.lower() for n in BACKGROUND_NAMES}:
                value, crowd = 0, False
            elif label.lower() in IGNORE_NAMES:
                value, crowd = IGNORE_VALUE, True
            else:
                value, crowd = index[label] + 1, False
                item.classes.add(index[label])
            try:
                shape = _labelme_shape(sh, value, size)
            except Exception as exc:  # a broken base64 mask, bad points
                problems.append(f"{p}: shape {label!r}: {type(exc).__name__}: {exc}")
                item.where = ""
                break
            shape.crowd = crowd
            if shape.seg is None:
                no_area += 1
                if value in (0, IGNORE_VALUE):
                    continue  # a background/ignore line changes no label
            item.shapes.append(shape)
        if item.where:
            items.append(item)
    notes = []
    if skipped:
        notes.append(f"{skipped} JSON file(s) are not LabelMe files (no 'shapes'): left out")
    if no_area:
        notes.append(f"{no_area} shape(s) without area (lines, points): their images get labels, no mask")
    return Source("labelme", _check_names(names, str(src)), items, notes, problems, sorted(dirs), True)


# ----------------------------------------------------------------------------------------------
# writing the folder dataset
# ----------------------------------------------------------------------------------------------

def _image_size(item: Item) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(upright size, stored size, EXIF orientation) of an item's image, from its header."""
    from PIL import Image

    src = io.BytesIO(item.image_bytes) if item.image_bytes is not None else item.image
    with Image.open(src) as img:
        w, h = img.size
        try:
            orient = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
        except Exception:
            orient = 1
    up = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    return up, (w, h), orient


def _place_image(src: Path, dst: Path, mode: str) -> str:
    """Put ``src`` at ``dst`` atomically (a temp name, then rename); returns how: hard/copy/symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("hard", "symlink"):
        tmp = dst.parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}.tmp"  # short: a 250-byte name must work
        try:
            if mode == "hard":
                os.link(src, tmp)
            else:
                os.symlink(os.path.abspath(src), tmp)
            os.replace(tmp, dst)
            return mode
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if mode == "symlink":
                raise
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return "copy"


def _item_mask(item: Item, backend: str) -> tuple[np.ndarray | None, str]:
    """The item's semantic mask (None without one) and a problem ("" when fine)."""
    from PIL import Image

    from .coco import semantic_mask

    up, stored, orient = _image_size(item)
    if not item.shapes and item.size is None:
        return np.zeros((up[1], up[0]), np.uint8), ""
    frame = up
    if item.size is not None and tuple(item.size) != up:
        if tuple(item.size) == stored and orient in _EXIF_TRANSPOSE:
            frame = stored  # annotated on the stored pixels, the image shows rotated: rotate the mask too
        else:
            return None, (f"{item.where}: the annotation is for a {item.size[0]}x{item.size[1]} image, but "
                          f"{display_name(item.image or 'the embedded image')} is {up[0]}x{up[1]}")
    W, H = frame
    anns = []
    for s in item.shapes:
        seg = s.seg
        if item.normalised:
            seg = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * (W, H)).reshape(-1).tolist() for p in seg]
        if isinstance(seg, np.ndarray) and frame != up:
            return None, f"{item.where}: a circle/mask shape on an EXIF-rotated image: cannot place it"
        anns.append((s.value, int(s.crowd), seg, s.area * (W * H if item.normalised else 1)))
    mask = semantic_mask(anns, H, W, backend)
    if frame != up:
        mask = np.asarray(Image.fromarray(mask).transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[orient])))
    return mask, ""


def _settings(source: Source, src: Path, options: dict) -> dict:
    return {"version": MARKER_VERSION, "format": source.format, "source": os.path.abspath(src),
            "classes": source.classes, "options": options}


def _prepare_destination(dst: Path, settings: dict, overwrite: bool) -> bool:
    """True when resuming an earlier import of the same source; raises for another non-empty folder."""
    marker = dst / MARKER
    entries = [e for e in dst.iterdir() if e.name not in (MARKER, ".tokenseg.lock")] if dst.is_dir() else []
    if not entries:
        return False
    previous = None
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
    if previous is not None and {k: v for k, v in previous.items() if k != "complete"} == settings:
        return not overwrite
    if overwrite:
        return False
    why = (f"it holds an import of {previous.get('source')} ({previous.get('format')}) with other settings"
           if previous else f"it is not empty ({len(entries)} entries, e.g. {entries[0].name})")
    raise TokensegError(f"{dst}: {why}; choose an empty (or new) folder, or pass --overwrite to write over it")


def import_dataset(fmt: str, src: str | Path, dst: str | Path, *, classes: str | Path | Sequence[str] | None = None,
                   link: str = "hard", overwrite: bool = False, split: str = "", images: str | Path | None = None,
                   keep_empty: bool = False, rasterizer: str = "auto", workers: int = 2,
                   progress: bool = True) -> dict:
    """``tokenseg data import``: read ``src`` in format ``fmt`` and write the folder dataset ``dst``
    (see the module doc). Returns a summary dict (counts, splits, notes, problems)."""
    from .coco import RASTERIZERS, have_pycocotools

    if fmt not in IMPORT_FORMATS:
        raise TokensegError(f"--from must be one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    if link not in LINK_MODES:
        raise TokensegError(f"--link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    if rasterizer not in RASTERIZERS:
        raise TokensegError(f"--rasterizer must be one of {', '.join(RASTERIZERS)}, got {rasterizer!r}")
    backend = ("pycocotools" if have_pycocotools() else "numpy") if rasterizer == "auto" else rasterizer
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise TokensegError(f"{src}: no such file or folder")
    names = list(classes) if isinstance(classes, (list, tuple)) else _class_file(classes)
    if fmt == "yolo":
        source = read_yolo(src, names)
    elif fmt == "coco":
        source = read_coco(src, names, split, images, keep_empty)
    else:
        source = read_labelme(src, names)
    src_root = src if src.is_dir() else src.parent
    refuse_inside_dataset(dst, [src_root, *source.image_dirs], "data import --out")
    for sub in (dst / "images", dst / "masks"):
        s_real, sub_real = Path(os.path.realpath(src_root)), Path(os.path.realpath(sub))
        if s_real == sub_real or sub_real in s_real.parents:
            raise TokensegError(f"data import --out {dst}: would write into the source {src} ({sub} holds it)")
    options = {"link": link, "split": split, "images": str(images or ""), "keep_empty": keep_empty,
               "rasterizer": backend}
    settings = _settings(source, src, options)

    problems = list(source.problems)
    items = [it for it in source.items if it.where]
    ok_items: list[Item] = []
    seen: dict[str, str] = {}
    for it in items:
        if display_name(it.id) != it.id:
            problems.append(f"{display_name(it.where)}: file name {display_name(it.id)!r} is not valid UTF-8: "
                            f"rename it")
        elif it.id in seen:
            problems.append(f"{display_name(it.image or it.where)}: same image id {it.id!r} as {seen[it.id]} "
                            f"(two files with one name and different extensions?): rename one")
        else:
            seen[it.id] = display_name(it.image or it.where)
            ok_items.append(it)
    with output_lock(dst, "tokenseg data import"):
        resume = _prepare_destination(dst, settings, overwrite)
        for sub in ("images", "masks"):  # what a killed import left half-written
            remove_stale_temps(dst / sub)
        write_json_atomic(dst / MARKER, {**settings, "complete": False})

        def out_paths(it: Item) -> tuple[Path, Path]:
            return (safe_output_path(dst / "images", it.id + it.ext), safe_output_path(dst / "masks", it.id + ".png"))

        def one(it: Item) -> tuple[str, str, bool]:
            img_out, mask_out = out_paths(it)
            want_mask = source.segmentation and it.has_mask
            if resume and img_out.exists() and (not want_mask or mask_out.is_file()):
                return "kept", "", want_mask
            try:
                if want_mask:
                    mask, problem = _item_mask(it, backend)
                    if problem:
                        return "failed", problem, False
                    save_palette_png(mask_out, mask)
                elif mask_out.is_file():
                    mask_out.unlink()  # --overwrite of an import that had a mask for this image
                if it.image_bytes is not None:
                    write_bytes_atomic(img_out, it.image_bytes)
                    how = "embedded"
                else:
                    how = _place_image(it.image, img_out, link)
            except TokensegError as exc:
                return "failed", str(exc), False
            except Exception as exc:  # a broken image or segmentation: reported, the rest goes on
                return "failed", f"{display_name(it.where)}: {type(exc).__name__}: {exc}", False
            return how, "", want_mask

        from ..core.progress import progress_bar

        counts: dict[str, int] = {}
        done: list[tuple[Item, bool]] = []
        bar = progress_bar(total=len(ok_items), desc="import", unit="img", disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for it, (how, problem, masked) in zip(ok_items, pool.map(one, ok_items)):
                bar.update(1)
                counts[how] = counts.get(how, 0) + 1
                if problem:
                    problems.append(problem)
                else:
                    done.append((it, masked))
        bar.close()

        splits = sorted({it.split for it, _ in done})
        use_split = bool(done) and "" not in splits
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "labels", "split"] if use_split else ["image", "labels"])
        for it, _ in done:
            cells = [it.id + it.ext, ";".join(source.classes[c] for c in sorted(it.classes))]
            w.writerow(cells + [it.split] if use_split else cells)
        write_text_atomic(dst / "classes.txt", "\n".join(source.classes) + "\n")
        write_text_atomic(dst / "labels.csv", buf.getvalue())
        ours = {out_paths(it)[k] for it, _ in done for k in (0, 1)}
        strays = [p for sub in ("images", "masks") if (dst / sub).is_dir()
                  for p in (dst / sub).rglob("*") if p.is_file() and p not in ours and not p.name.startswith(".")]
        write_json_atomic(dst / MARKER, {**settings, "complete": not problems})
    per_split = {s: sum(1 for it, _ in done if it.split == s) for s in splits} if use_split else {}
    return {"destination": str(dst), "format": source.format, "images": len(done),
            "masks": sum(1 for _, m in done if m), "classes": source.classes, "splits": per_split,
            "placed": counts, "resumed": resume, "notes": source.notes, "problems": problems,
            "strays": [str(p) for p in strays[:MAX_LISTED]], "stray_count": len(strays)}


def format_summary(s: dict) -> str:
    """What ``tokenseg data import`` prints."""
    dst = s["destination"]
    how = {"hard": "hard-linked", "copy": "copied", "symlink": "symlinked", "embedded": "from imageData",
           "kept": "already there", "failed": "failed"}
    placed = ", ".join(f"{v} {how.get(k, k)}" for k, v in sorted(s["placed"].items()))
    lines = [f"wrote {dst}: {s['images']} images ({placed or 'none'}), {s['masks']} masks, "
             f"{len(s['classes'])} classes ({', '.join(s['classes'][:12])}{' ...' if len(s['classes']) > 12 else ''})"
             + (" [resumed]" if s["resumed"] else "")]
    if s["splits"]:
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    lines += [f"note: {n}" for n in s["notes"]]
    if s["stray_count"]:
        lines.append(f"note: {s['stray_count']} file(s) under {dst}/images or masks are not from this import "
                     f"(left in place), e.g. {s['strays'][0]}")
    if s["problems"]:
        lines.append(f"{len(s['problems'])} image(s) left out:")
        lines += [f"  - {p}" for p in s["problems"][:MAX_LISTED]]
        if len(s["problems"]) > MAX_LISTED:
            lines.append(f"  ... and {len(s['problems']) - MAX_LISTED} more")
        lines.append("fix them and run the same command again: it resumes")
    sp = s["splits"]
    train = next((k for k in sp if k.lower().startswith("train")), None)
    val = next((k for k in sp if k.lower().startswith(("val", "valid", "test", "dev")) and k != train), None)
    split_args = (f"data.train_split={train} data.val_split={val or train}" if train else
                  "data.train_split=all data.val_split=all")
    root = shlex.quote(f"data.root={dst}")
    lines.append(f"next: tokenseg data check photos-scratch {root} {split_args}")
    lines.append(f"then: tokenseg run photos-scratch {root} {split_args}   (from scratch, minutes on a CPU; "
                 f"real seeds need ImageNet weights: preset photos, README \"Your own images\")")
    return display_name("\n".join(lines))
