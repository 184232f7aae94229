"""Image-level labels derived from VOC's XML annotations and from masks, labels files written, and the
authors' ``cls_labels.npy`` imported."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.masks import IGNORE_INDEX, read_mask
from ..core.errors import TokensegError
from ..core.files import write_json_atomic
from .base import COCO_CLASSES, VOC_CLASSES
from .labels import LABELS_FORMAT, LABELS_VERSION


# ----------------------------------------------------------------------------------------------
# deriving labels
# ----------------------------------------------------------------------------------------------

def voc_xml_objects(path: str | Path) -> list[str]:
    """Object class names of a VOC annotation XML (every ``<object>``, difficult ones included, as
    PSA's ``cls_labels.npy``; ``<part>`` names such as 'head' are not objects)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise TokensegError(f"{path}: annotation file not found") from None
    except (ET.ParseError, OSError) as exc:
        raise TokensegError(f"{path}: cannot parse annotation XML ({exc})") from exc
    names = []
    for obj in root.iter("object"):
        el = obj.find("name")
        if el is None or not (el.text or "").strip():
            raise TokensegError(f"{path}: an <object> has no <name>")
        names.append(el.text.strip())
    return names


def labels_from_xml(path: str | Path, class_names: Sequence[str]) -> list[int]:
    index = {n: i for i, n in enumerate(class_names)}
    out = set()
    for n in voc_xml_objects(path):
        if n not in index:
            raise TokensegError(
                f"{path}: object name {n!r} is not one of the dataset's classes "
                f"({', '.join(class_names)}); VOC XML names must match the class names exactly")
        out.add(index[n])
    return sorted(out)


def labels_from_mask(path: str | Path, num_classes: int) -> list[int]:
    """Foreground classes present in a mask (values 1..C; 0 background and 255 ignore skipped)."""
    mask = read_mask(path)
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    values = values[(values != 0) & (values != IGNORE_INDEX)]
    if len(values) and values.max() > num_classes:
        raise TokensegError(
            f"{path}: mask value {int(values.max())} exceeds the class count {num_classes} "
            f"(+ background 0, ignore 255)")
    return [int(v) - 1 for v in values]


def labels_from_masks(paths: Sequence[str | Path | None], num_classes: int, workers: int = 2
                      ) -> list[list[int] | TokensegError | None]:
    """:func:`labels_from_mask` over many masks with a thread pool (PNG decoding releases the GIL);
    ``None`` for a missing path, the error for an unreadable mask."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        if p is None:
            return None
        try:
            return labels_from_mask(p, num_classes)
        except TokensegError as exc:
            return exc

    if workers <= 1 or len(paths) < 64:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths, chunksize=32))


# ----------------------------------------------------------------------------------------------
# writing and importing
# ----------------------------------------------------------------------------------------------

def labels_document(class_names: Sequence[str], labels: Mapping[str, Sequence[int]], source: str,
                    splits: Mapping[str, Sequence[str]] | None = None) -> dict:
    names = list(class_names)
    doc = {
        "format": LABELS_FORMAT, "version": LABELS_VERSION, "classes": names, "source": source,
        "labels": {k: [names[c] for c in sorted(set(v))] for k, v in labels.items()},
    }
    if splits:
        doc["splits"] = {k: list(v) for k, v in splits.items()}
    return doc


def write_labels_file(path: str | Path, dataset_or_labels, class_names: Sequence[str] | None = None,
                      source: str | None = None, splits: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Write our labels JSON atomically, from a :class:`WSSSDataset` (or several, merged) or from a
    mapping ``{image_id: [0-based class indices]}`` with ``class_names`` and ``source``."""
    from .base import WSSSDataset

    items = dataset_or_labels
    if isinstance(items, WSSSDataset):
        items = [items]
    if isinstance(items, (list, tuple)) and items and all(isinstance(d, WSSSDataset) for d in items):
        names = list(class_names or items[0].class_names)
        labels: dict[str, list[int]] = {}
        for ds in items:
            if ds.class_names != names:
                raise TokensegError(f"{ds.name}: class names differ from the other splits'")
            for image_id, lab in zip(ds.ids, ds.labels):
                labels[image_id] = list(lab)
        src = source or " + ".join(dict.fromkeys(ds.label_source for ds in items))
    else:
        if class_names is None:
            raise TokensegError("write_labels_file: class_names is required with a labels mapping")
        names, labels, src = list(class_names), {str(k): list(v) for k, v in items.items()}, source or "unknown"
        for k, v in labels.items():
            for c in v:
                if not 0 <= int(c) < len(names):
                    raise TokensegError(f"image {k!r}: class index {c} outside 0..{len(names) - 1}")
    path = Path(path)
    write_json_atomic(path, labels_document(names, labels, src, splits))
    return path


def import_cls_labels_npy(path: str | Path, class_names: Sequence[str] | None = None,
                          allow_pickle: bool = False) -> tuple[list[str], dict[str, list[int]], str]:
    """Read the authors' ``cls_labels.npy`` (a pickled ``{image_id: multi-hot array}``, made by PSA from
    the VOC XML). Loading a pickle can run code, so ``allow_pickle`` must be given explicitly."""
    path = Path(path)
    if not path.is_file():
        raise TokensegError(f"{path}: file not found")
    if not allow_pickle:
        raise TokensegError(
            f"{path}: cls_labels.npy is a pickled dict and loading a pickle can run arbitrary code; "
            f"if you trust the file, pass --allow-pickle (Python: allow_pickle=True)")
    print(f"tokenseg: warning: unpickling {path}: a pickle can run code; only load files you trust",
          file=sys.stderr)
    try:
        obj = np.load(path, allow_pickle=True)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
    except Exception as exc:
        raise TokensegError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or not obj:
        raise TokensegError(f"{path}: expected a non-empty dict {{image_id: multi-hot array}}, got {type(obj).__name__}")
    dims = {np.asarray(v).reshape(-1).shape[0] for v in obj.values()}
    if len(dims) != 1:
        raise TokensegError(f"{path}: label vectors have different lengths {sorted(dims)}")
    dim = dims.pop()
    if class_names is None:
        if dim == 20:
            class_names = VOC_CLASSES
        elif dim == 80:
            class_names = COCO_CLASSES
        else:
            raise TokensegError(f"{path}: {dim}-dim labels; give the class names (--classes FILE)")
    class_names = list(class_names)
    if len(class_names) != dim:
        raise TokensegError(f"{path}: {dim}-dim labels but {len(class_names)} class names")
    labels: dict[str, list[int]] = {}
    for key, vec in obj.items():
        image_id = _npy_key(key)
        v = np.asarray(vec, dtype=np.float64).reshape(-1)
        if not np.all((v == 0) | (v == 1)):
            raise TokensegError(f"{path}: image {image_id!r}: labels must be 0/1, got {v.tolist()}")
        if image_id in labels:
            raise TokensegError(f"{path}: image {image_id!r} appears twice")
        labels[image_id] = [int(c) for c in np.flatnonzero(v)]
    return class_names, labels, f"npy:{path.name} (authors' cls_labels, PSA from VOC XML)"


def _npy_key(key) -> str:
    """IRN stores VOC ids as ints (2007000032 for '2007_000032'); PSA/MCTformer as strings."""
    if isinstance(key, bytes):
        key = key.decode("utf-8")
    if isinstance(key, (int, np.integer)):
        s = str(int(key))
        return f"{s[:4]}_{s[4:]}" if len(s) == 10 else s
    return str(key)
