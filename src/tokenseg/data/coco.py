"""MS COCO 2014 reader: image-level labels and semantic masks from the instance annotations.

Layout (``data.root``)::

    train2014/COCO_train2014_*.jpg   val2014/...
    annotations/instances_train2014.json   annotations/instances_val2014.json

``data.train_split=train2014``, ``data.val_split=val2014``. Classes are the 80 categories sorted by
category id (the standard order); category ids are remapped to 1..80 in masks, 0 is background.
Image ids are file stems (``COCO_train2014_000000000009``). Images without any annotation are left
out, as in the papers (82,081 train / 40,137 val ids).

Image-level labels are the categories of all annotations, crowd ones included (the object is in the
picture). Masks paint non-crowd instances largest first (so small objects stay visible on top);
crowd regions that no instance covers become 255 (ignore).

The conversion runs once per annotation file and is cached as palette PNGs + ``index.json`` under
``<cache>/coco/<split>-<hash>/`` (``tokenseg.data.cache_root(cfg)``), never inside the dataset folder.
Masks are rasterised with pycocotools when installed (``pip install tokenseg[coco]``), else by the
polygon/RLE rasteriser below (pixel-centre sampling, even-odd rule; RLE decoding is exact).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.masks import IGNORE_INDEX, save_palette_png
from ..core.errors import TokensegError
from ..core.files import write_json_atomic
from .base import COCO_CLASSES, WSSSDataset  # noqa: F401 (COCO_CLASSES: re-exported)
from .labels import read_labels_table, resolve_labels
from .scan import Problems, UnusableSplit, drop_bad_images, scan_cache_file

COCO_CACHE_VERSION = 1
RASTERIZERS = ("auto", "pycocotools", "numpy")


# ----------------------------------------------------------------------------------------------
# rasterising COCO segmentations
# ----------------------------------------------------------------------------------------------

def have_pycocotools() -> bool:
    try:
        import pycocotools.mask  # noqa: F401
    except Exception:
        return False
    return True


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode the compact RLE string of COCO: each count is a little-endian run of 5-bit groups stored
    as ``chr(48 + group)``, bit 0x20 meaning 'more groups follow' and bit 0x10 of the last group the
    sign; from the third count on, counts are stored as the difference to the count two places back."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        value, shift, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("truncated RLE string")
            group = ord(s[p]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            p += 1
            shift += 5
            if not more and (group & 0x10):
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO RLE (``{"size": [h, w], "counts": list | str}``, column-major runs starting with zeros)
    as an (h, w) bool array."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()


def polygon_mask(polygon: Sequence[float], height: int, width: int) -> np.ndarray:
    """Fill one polygon ``[x1, y1, x2, y2, ...]`` (pixel coordinates): pixel (i, j) is inside when its
    centre (j + 0.5, i + 0.5) is, by the even-odd rule. Agrees with pycocotools on >99% of pixels
    (they differ only along edges)."""
    out = np.zeros((height, width), dtype=bool)
    # vertices snapped to a 1/5-pixel grid, as pycocotools does before rasterising
    xy = np.floor(np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * 5.0 + 0.5) / 5.0
    if len(xy) < 3 or height == 0 or width == 0:
        return out
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(0, int(np.floor(y0.min() - 0.5)))
    r_hi = min(height, int(np.ceil(y0.max() + 0.5)) + 1)
    if r_lo >= r_hi:
        return out
    rows = np.arange(r_lo, r_hi, dtype=np.float64)[:, None] + 0.5
    crosses = (y0[None, :] <= rows) != (y1[None, :] <= rows)
    ri, ei = np.nonzero(crosses)
    if len(ri) == 0:
        return out
    yr = rows[ri, 0]
    xi = x0[ei] + (yr - y0[ei]) * (x1[ei] - x0[ei]) / (y1[ei] - y0[ei])
    col = np.clip(np.floor(xi - 0.5).astype(np.int64) + 1, 0, width)
    toggles = np.zeros((r_hi - r_lo, width + 1), dtype=np.int32)
    np.add.at(toggles, (ri, col), 1)
    out[r_lo:r_hi] = (np.cumsum(toggles, axis=1)[:, :width] % 2) == 1
    return out


def segmentation_mask(seg, height: int, width: int, backend: str = "numpy") -> np.ndarray:
    """A COCO ``segmentation`` (list of polygons, uncompressed or compressed RLE) as an (h, w) bool;
    an (h, w) array is taken as a ready mask (the importers' circles and LabelMe masks)."""
    if isinstance(seg, np.ndarray):
        if seg.shape != (height, width):
            raise ValueError(f"mask size {list(seg.shape)} differs from the image size {[height, width]}")
        return seg.astype(bool)
    if backend == "pycocotools":
        from pycocotools import mask as mask_utils

        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = dict(seg)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation noise
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    if isinstance(seg, list):
        m = np.zeros((height, width), dtype=bool)
        for poly in seg:
            m |= polygon_mask(poly, height, width)
        return m
    m = rle_decode(seg)
    if m.shape != (height, width):
        raise ValueError(f"RLE size {list(m.shape)} differs from the image size {[height, width]}")
    return m


def semantic_mask(anns: Sequence[tuple[int, int, object, float]], height: int, width: int,
                  backend: str = "numpy") -> np.ndarray:
    """(h, w) uint8 mask from ``(class value 1..C, iscrowd, segmentation, area)`` tuples: instances
    largest first (smaller ones stay on top), then crowd regions → 255 where still background."""
    mask = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    for value, iscrowd, seg, _area in sorted(anns, key=lambda a: -float(a[3])):
        m = segmentation_mask(seg, height, width, backend)
        if iscrowd:
            crowd |= m
        else:
            mask[m] = value
    mask[crowd & (mask == 0)] = IGNORE_INDEX
    return mask


def _convert_chunk(jobs: list, backend: str) -> list[tuple[str, str]]:
    errors = []
    for out, h, w, anns in jobs:
        try:
            save_palette_png(out, semantic_mask(anns, h, w, backend))
        except Exception as exc:  # reported per image
            errors.append((out, f"{type(exc).__name__}: {exc}"))
    return errors


# ----------------------------------------------------------------------------------------------
# the reader
# ----------------------------------------------------------------------------------------------

def coco_annotation_file(root: Path, split: str) -> Path:
    if split.endswith(".json"):
        p = Path(split)
        return p if p.is_absolute() or p.exists() else root / p
    for name in (f"instances_{split}.json", f"instances_{split}2014.json"):
        p = root / "annotations" / name
        if p.is_file():
            return p
    return root / "annotations" / f"instances_{split}.json"


def coco_image_dir(root: Path, split: str) -> Path:
    stem = Path(split).stem.replace("instances_", "") if split.endswith(".json") else split
    for cand in (root / stem, root / f"{stem}2014", root / "images" / stem):
        if cand.is_dir():
            return cand
    return root / stem


def _cache_key(ann_path: Path, backend: str) -> str:
    st = ann_path.stat()
    text = f"|{st.st_size}|{st.st_mtime_ns}|{backend}|{COCO_CACHE_VERSION}"
    return hashlib.sha1(os.fsencode(ann_path.resolve()) + text.encode("utf-8")).hexdigest()[:12]


def read_coco_instances(ann_path: Path) -> dict:
    """Parse a COCO instances JSON (COCO itself, or any tool's export): ``{"classes": names sorted by
    category id, "category_ids", "images": [{"coco_id", "file_name", "height", "width", "anns":
    [[class value 1..C, iscrowd, segmentation, area], ...]}]}``. Used by the reader and by
    ``tokenseg data import --from coco``."""
    try:
        with open(ann_path, "rb") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{ann_path}: cannot read COCO annotations ({exc})") from exc
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise TokensegError(f"{ann_path}: not a COCO instances file (needs 'images', 'annotations', 'categories')")
    cats = sorted(data["categories"], key=lambda c: int(c["id"]))
    cat_value = {int(c["id"]): k + 1 for k, c in enumerate(cats)}
    classes = [str(c["name"]) for c in cats]
    if len(set(classes)) != len(classes):
        raise TokensegError(f"{ann_path}: duplicated category names")
    images: dict[int, dict] = {}
    for im in data["images"]:
        iid = int(im["id"])
        if iid in images:
            raise TokensegError(f"{ann_path}: image id {iid} listed twice")
        images[iid] = {"file_name": str(im["file_name"]), "height": int(im["height"]),
                       "width": int(im["width"]), "anns": []}
    for ann in data["annotations"]:
        iid, cid = int(ann["image_id"]), int(ann["category_id"])
        if iid not in images:
            raise TokensegError(f"{ann_path}: annotation {ann.get('id')} refers to unknown image id {iid}")
        if cid not in cat_value:
            raise TokensegError(f"{ann_path}: annotation {ann.get('id')} has unknown category id {cid}")
        images[iid]["anns"].append([cat_value[cid], int(ann.get("iscrowd", 0)), ann.get("segmentation", []),
                                    float(ann.get("area", 0.0))])
    return {"classes": classes, "category_ids": [int(c["id"]) for c in cats],
            "images": [dict(coco_id=k, **v) for k, v in sorted(images.items())]}


_build_index = read_coco_instances  # the reader's name for it (tests replace it to prove the cache is used)


def load_coco(root: str | Path, split: str, cache_dir: str | Path, *, labels_file: str | Path | None = None,
              class_names: Sequence[str] | None = None, skip_bad: bool = False, workers: int = 2,
              keep_empty: bool = False, rasterizer: str = "auto", progress: bool = True) -> WSSSDataset:
    """Read COCO ``split`` (e.g. ``train2014``): labels and masks from the instance annotations, masks
    converted once into ``cache_dir`` (see the module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise TokensegError(f"data.root: {root} is not a folder")
    if rasterizer not in RASTERIZERS:
        raise TokensegError(f"COCO rasterizer must be one of {list(RASTERIZERS)}, got {rasterizer!r}")
    backend = rasterizer
    if backend == "auto":
        backend = "pycocotools" if have_pycocotools() else "numpy"
    elif backend == "pycocotools" and not have_pycocotools():
        raise TokensegError("pycocotools is not installed (pip install 'tokenseg[coco]')")
    ann_path = coco_annotation_file(root, split)
    if not ann_path.is_file():
        have = sorted(p.name for p in (root / "annotations").glob("instances_*.json")) \
            if (root / "annotations").is_dir() else []
        raise TokensegError(
            f"{ann_path}: COCO annotation file not found (data.root={root}, split={split!r}); "
            f"found: {', '.join(have) or 'no instances_*.json'}"
            + ("; for COCO 2014 set data.train_split=train2014 data.val_split=val2014"
               if split in ("train_aug", "val", "train") else ""))
    image_dir = coco_image_dir(root, split)
    if not image_dir.is_dir():
        raise TokensegError(f"{image_dir}: COCO image folder not found (split={split!r})")
    sname = ann_path.stem.replace("instances_", "")  # "train" and "train2014" share one cache
    out = Path(cache_dir) / "coco" / f"{sname}-{_cache_key(ann_path, backend)}"
    index_path = out / "index.json"
    index = None
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            if index.get("version") != COCO_CACHE_VERSION:
                index = None
        except (OSError, ValueError):
            index = None
    if index is None:
        full = _build_index(ann_path)
        _convert_masks(full, out / "masks", backend, workers, progress, ann_path)
        index = {"version": COCO_CACHE_VERSION, "annotation_file": str(ann_path.resolve()), "rasterizer": backend,
                 "classes": full["classes"], "category_ids": full["category_ids"],
                 "images": [[Path(im["file_name"]).stem, im["file_name"], im["height"], im["width"],
                             sorted({a[0] - 1 for a in im["anns"]}), len(im["anns"])] for im in full["images"]]}
        write_json_atomic(index_path, index)
        del full
    names = list(class_names or index["classes"])
    if len(names) != len(index["classes"]):
        raise TokensegError(f"data.class_names_file lists {len(names)} classes, {ann_path} has {len(index['classes'])}")
    name = f"coco:{split if not split.endswith('.json') else sname}"
    problems = Problems(name)
    rows = [r for r in index["images"] if keep_empty or r[5] > 0]
    ids = [r[0] for r in rows]
    image_paths = [image_dir / r[1] for r in rows]
    mask_paths: list[Path | None] = [out / "masks" / f"{r[0]}.png" for r in rows]
    labels = [list(r[4]) for r in rows]
    label_desc = f"coco-instances:{ann_path.name}"
    meta = {"format": "coco", "root": str(root), "split": split, "annotation_file": str(ann_path),
            "image_dir": str(image_dir),
            "mask_cache": str(out / "masks"), "rasterizer": index.get("rasterizer", backend),
            "empty_images_left_out": 0 if keep_empty else len(index["images"]) - len(rows)}
    if labels_file:
        table = read_labels_table(labels_file)
        known = resolve_labels(table, names, [i for i in ids if i in table.labels])
        for k, image_id in enumerate(ids):
            if image_id in known:
                labels[k] = known[image_id]
            else:
                problems.add(image_id, labels_file, f"no labels for image {image_id!r}", "no_labels")
        label_desc = table.source
        meta["labels_file"] = str(labels_file)
    for k, (image_id, p) in enumerate(zip(ids, image_paths)):
        if not p.is_file():
            problems.add(image_id, p, "image file not found", "missing_image")
        mp = mask_paths[k]
        if mp is not None and not mp.is_file():
            problems.add(image_id, mp, "mask conversion failed", "bad_mask")
    if skip_bad:
        good = [k for k, i in enumerate(ids) if i not in problems]
        drop_bad_images([ids[k] for k in good], [image_paths[k] for k in good], problems, workers,
                        scan_cache_file(cache_dir, image_dir))
    drop = problems.resolve(skip_bad)
    meta["skipped"] = problems.items if drop else []
    keep = [k for k, i in enumerate(ids) if i not in drop]
    if not keep:
        raise UnusableSplit(f"{name}: no usable images (looked in {image_dir})", problems.items, image_dir)
    return WSSSDataset(name=name, class_names=names, ids=[ids[k] for k in keep],
                       image_paths=[image_paths[k] for k in keep], labels=[labels[k] for k in keep],
                       mask_paths=[mask_paths[k] for k in keep], label_source=label_desc, meta=meta)


def _convert_masks(full: dict, mask_dir: Path, backend: str, workers: int, progress: bool,
                   ann_path: Path) -> None:
    """Write one palette PNG per image (skipping PNGs already there: a killed conversion resumes)."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for im in full["images"]:
        out = mask_dir / f"{Path(im['file_name']).stem}.png"
        if not out.is_file():
            jobs.append((str(out), im["height"], im["width"], [tuple(a) for a in im["anns"]]))
    if not jobs:
        return
    errors: list[tuple[str, str]] = []
    bar = None
    if progress and len(jobs) > 500:
        from ..core.progress import progress_bar as tqdm
        bar = tqdm(total=len(jobs), desc=f"COCO masks ({backend})", unit="img", file=sys.stderr)
    chunk = 64
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    if workers > 1 and len(jobs) > 4 * chunk:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for part, errs in zip(chunks, pool.map(_convert_chunk, chunks, [backend] * len(chunks))):
                errors += errs
                if bar is not None:
                    bar.update(len(part))
    else:
        for part in chunks:
            errors += _convert_chunk(part, backend)
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    if errors:
        shown = "\n  ".join(f"{Path(o).stem}: {e}" for o, e in errors[:10])
        print(f"tokenseg: warning: {ann_path}: {len(errors)} mask(s) could not be rasterised:\n  {shown}",
              file=sys.stderr)
