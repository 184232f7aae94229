"""LabelMe ``*.json`` files as a :class:`~.common.Source`."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.errors import TokensegError
from ..labels import BACKGROUND_NAMES, EntryErrors, did_you_mean
from .common import IGNORE_NAMES, IGNORE_VALUE, Item, Shape, Source, _check_names, _image_size, _split_of


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
