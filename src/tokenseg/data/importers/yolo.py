"""Ultralytics/YOLO label folders (polygons, oriented boxes, boxes) as a :class:`~.common.Source`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.errors import TokensegError
from .common import Item, Shape, Source, _check_names, _image_files, _split_of


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
