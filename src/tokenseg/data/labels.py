"""Image-level label files: read (JSON, CSV), write (our JSON), derive (VOC XML, masks), import
(the authors' pickled ``cls_labels.npy``).

Our labels file is plain JSON::

    {"format": "tokenseg-labels", "version": 1,
     "classes": ["aeroplane", ...],            # class order (index c is mask value c + 1)
     "source": "xml:Annotations",               # where the labels came from
     "labels": {"2007_000032": ["aeroplane", "person"], ...},
     "splits": {"train": ["2007_000032", ...]}} # optional (folder datasets)

Class names are free text. An image with an empty list has no foreground class.
"""
from __future__ import annotations

import csv
import difflib
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..core.masks import IGNORE_INDEX, read_mask
from ..core.errors import TokensegError
from ..core.files import relative_name_problem, write_json_atomic
from .base import COCO_CLASSES, IMAGE_EXTENSIONS, VOC_CLASSES
from .scan import MAX_LISTED

LABELS_FORMAT = "tokenseg-labels"
LABELS_VERSION = 1
BACKGROUND_NAMES = ("background", "__background__", "_background_", "bg")
IMAGE_COLUMNS = ("image", "image_id", "id", "file", "filename", "file_name", "path", "name")
LABEL_COLUMNS = ("labels", "label", "classes", "class", "tags")
SPLIT_COLUMNS = ("split", "subset", "set")
LABEL_SEPARATORS = (";", "|")


@dataclass
class LabelTable:
    """Labels read from a file: ``labels[id]`` = class names; ``splits[id]`` = split name (optional)."""

    path: Path | None
    classes: list[str] | None
    labels: dict[str, list[str]]
    source: str
    splits: dict[str, list[str]] = field(default_factory=dict)  # split name -> ids (may overlap)
    files: dict[str, str] = field(default_factory=dict)  # id -> file name as written in the table
    lines: dict[str, int] = field(default_factory=dict)  # id -> line number (CSV), for messages


class EntryErrors:
    """The bad entries of one file, raised together in one error (the first :data:`MAX_LISTED`, then
    "and N more"), so a user fixes them in one pass instead of one run per mistake."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = path
        self.items: list[str] = []
        self.summary: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1 and not self.summary:
            raise TokensegError(self.items[0])
        shown = self.items[:MAX_LISTED]
        more = f"\n  ... and {len(self.items) - MAX_LISTED} more" if len(self.items) > MAX_LISTED else ""
        head = f"{self.path}: {len(self.items)} bad entr{'y' if len(self.items) == 1 else 'ies'}"
        head += (": " + "; ".join(self.summary)) if self.summary else ""
        raise TokensegError(head + ":\n  " + "\n  ".join(shown) + more)


def _typo_distance(a: str, b: str) -> int:
    """Edits between two short strings, a swap of neighbours counting as one (optimal string
    alignment): difflib scores "dgo" vs "dog" 0.67, yet it is one typo."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def did_you_mean(name: str, candidates: Sequence[str], cutoff: float = 0.75) -> str | None:
    """The closest of ``candidates`` to a misspelt ``name`` ("girafe" -> "giraffe", "dgo" -> "dog"):
    the same name in another case, else difflib's ratio >= ``cutoff``, else one typo away (two for
    names of 8+ letters); None when nothing is close."""
    low = name.lower()
    lowered = {c.lower(): c for c in candidates}
    if low in lowered:
        return lowered[low]
    close = difflib.get_close_matches(low, list(lowered), n=1, cutoff=cutoff)
    if close:
        return lowered[close[0]]
    if len(low) < 3:
        return None
    budget = 2 if len(low) >= 8 else 1
    near = [(d, c) for c in lowered if abs(len(c) - len(low)) <= budget
            and (d := _typo_distance(low, c)) <= budget]
    return lowered[min(near)[1]] if near else None


def id_problem(name: str, image_id: str) -> str:
    """Why ``image_id`` (read as ``name`` from a labels/split file) cannot be an image id, or ""."""
    problem = relative_name_problem(image_id)
    if problem:
        return (f"image {name!r} {problem}: image ids are paths relative to the image folder "
                f"(no '..', not absolute), because outputs are named after them")
    return ""


# ----------------------------------------------------------------------------------------------
# class-name files
# ----------------------------------------------------------------------------------------------

def check_class_names(names: Sequence[str], where: str) -> list[str]:
    names = [str(n).strip() for n in names]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if not n:
            raise TokensegError(f"{where}: class {i} has an empty name")
        if n in seen:
            raise TokensegError(f"{where}: class name {n!r} is listed twice (entries {seen[n]} and {i})")
        seen[n] = i
    if not names:
        raise TokensegError(f"{where}: no class names")
    return names


def read_class_names(path: str | Path) -> list[str]:
    """Class names, in order: a text file (one per line; blank lines and ``#`` comments skipped) or a
    JSON list. A leading ``background`` entry is dropped (class 0 is always background)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TokensegError(f"{path}: class names file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read class names file ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokensegError(f"{path}: invalid JSON ({exc})") from exc
        if isinstance(names, dict) and "classes" in names:
            names = names["classes"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TokensegError(f"{path}: a JSON class names file must be a list of strings")
    else:
        names = [ln.strip() for ln in text.splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
    if names and names[0].strip().lower() in BACKGROUND_NAMES:
        names = names[1:]
    return check_class_names(names, str(path))


# ----------------------------------------------------------------------------------------------
# reading label files
# ----------------------------------------------------------------------------------------------

def _no_duplicate_keys(path: Path):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise TokensegError(f"{path}: key {k!r} appears twice in one JSON object")
            out[k] = v
        return out
    return hook


def _id_of(name: str) -> str:
    """Image id of a file name as written in a label table: posix path without image extension."""

    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    p = Path(name)
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        name = str(p.with_suffix("").as_posix())
    return name


def read_labels_table(path: str | Path) -> LabelTable:
    """Read a labels file: our JSON (see module doc), a plain JSON mapping ``{image: [names]}``, or CSV."""
    path = Path(path)
    if not path.is_file():
        raise TokensegError(f"{path}: labels file not found")
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _read_labels_csv(path)
    if path.suffix.lower() == ".npy":
        raise TokensegError(
            f"{path}: a .npy labels file is a pickle; convert it once with "
            f"`tokenseg data labels --import-npy {path} --allow-pickle -o labels.json`")
    return _read_labels_json(path)


def _read_labels_json(path: Path) -> LabelTable:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_duplicate_keys(path))
    except TokensegError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read labels file ({exc})") from exc
    if not isinstance(data, dict):
        raise TokensegError(f"{path}: labels file must be a JSON object with a 'labels' mapping")
    if "labels" in data and isinstance(data["labels"], dict):
        raw, classes = data["labels"], data.get("classes")
        source = str(data.get("source", "file"))
        split_lists = data.get("splits") or {}
    elif "labels" in data:
        raise TokensegError(f"{path}: 'labels' must map image ids to lists of class names")
    elif any(k in data for k in ("classes", "format", "source", "splits")):
        raise TokensegError(f"{path}: labels file has no 'labels' mapping")
    else:  # a plain {image: [names]} mapping
        raw, classes, source, split_lists = data, None, "file", {}
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise TokensegError(f"{path}: 'classes' must be a list of class names")
        classes = check_class_names(classes, f"{path} ('classes')")
    labels: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    errors = EntryErrors(path)
    for key, names in raw.items():
        if isinstance(names, str):
            names = [n for n in _split_cell(names)]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            errors.add(f"{path}: labels of image {key!r} must be a list of class names, got {names!r}")
            continue
        image_id = _id_of(key)
        bad = id_problem(key, image_id)
        if bad:
            errors.add(f"{path}: {bad}")
            continue
        if image_id in labels:
            errors.add(f"{path}: image {image_id!r} is listed twice ({files[image_id]!r}, {key!r})")
            continue
        labels[image_id] = [n.strip() for n in names]
        files[image_id] = key
    splits: dict[str, list[str]] = {}
    if not isinstance(split_lists, dict):
        errors.add(f"{path}: 'splits' must map split names to lists of image ids")
        split_lists = {}
    for split, ids in split_lists.items():
        if not isinstance(ids, list):
            errors.add(f"{path}: split {split!r} must be a list of image ids")
            continue
        members, seen = [], set()
        for k in ids:
            m = _id_of(str(k))
            bad = id_problem(str(k), m)
            if bad:
                errors.add(f"{path}: split {split!r}: {bad}")
            elif m in seen:
                errors.add(f"{path}: image {m!r} is listed twice in split {split!r}")
            else:
                seen.add(m)
                members.append(m)
        splits[str(split)] = members
    errors.raise_if_any()
    return LabelTable(path, classes, labels, source, splits, files)


def _split_cell(cell: str) -> list[str]:
    cell = cell.strip()
    if not cell:
        return []
    for sep in LABEL_SEPARATORS:
        if sep in cell:
            return [p.strip() for p in cell.split(sep) if p.strip()]
    return [cell]


def _read_labels_csv(path: Path) -> LabelTable:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read labels file ({exc})") from exc
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    delimiter = "\t" if (path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first)) else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not numbered:
        raise TokensegError(f"{path}: empty labels file (expected a header row, e.g. 'image,labels')")
    header_line, header = numbered[0]
    header = [h.strip() for h in header]
    lower = [h.lower() for h in header]

    def find(options: Sequence[str]) -> int | None:
        for o in options:
            if o in lower:
                return lower.index(o)
        return None

    img_col = find(IMAGE_COLUMNS)
    if img_col is None:
        img_col = 0
    lab_col = find(LABEL_COLUMNS)
    split_col = find(SPLIT_COLUMNS)
    class_cols: list[int] = []
    classes = None
    if lab_col is None:  # multi-hot table: one 0/1 column per class
        class_cols = [i for i in range(len(header)) if i not in (img_col, split_col)]
        if not class_cols:
            raise TokensegError(
                f"{path}:{header_line}: header {header!r} has no 'labels' column and no class columns; "
                f"expected 'image,labels[,split]' or 'image,<class 1>,<class 2>,...'")
        classes = check_class_names([header[i] for i in class_cols], f"{path}:{header_line} (header)")
    labels: dict[str, list[str]] = {}
    splits: dict[str, list[str]] = {}
    files: dict[str, str] = {}
    where: dict[str, int] = {}
    if len(numbered) == 1:
        raise TokensegError(f"{path}: the labels file has a header row ({delimiter.join(header)}) but no image rows; "
                            f"add one row per image, e.g. 'a.jpg,cat dog'")
    errors = EntryErrors(path)
    for lineno, row in numbered[1:]:
        if len(row) != len(header):
            errors.add(f"{path}:{lineno}: expected {len(header)} columns ({delimiter.join(header)}), got "
                       f"{len(row)}: {delimiter.join(row)!r}")
            continue
        name = row[img_col].strip()
        if not name:
            errors.add(f"{path}:{lineno}: empty image name")
            continue
        image_id = _id_of(name)
        bad = id_problem(name, image_id)
        if bad:
            errors.add(f"{path}:{lineno}: {bad}")
            continue
        if image_id in labels:
            errors.add(f"{path}:{lineno}: image {image_id!r} is listed twice (first on line {where[image_id]})")
            continue
        if lab_col is not None:
            names = _split_cell(row[lab_col])
        else:
            names, ok = [], True
            for i in class_cols:
                v = row[i].strip().lower()
                if v in ("1", "1.0", "true", "yes", "y"):
                    names.append(header[i])
                elif v not in ("", "0", "0.0", "false", "no", "n", "-1"):
                    errors.add(f"{path}:{lineno}: column {header[i]!r} must be 0 or 1, got {row[i]!r}")
                    ok = False
            if not ok:
                continue
        if split_col is not None:
            s = row[split_col].strip()
            if not s:
                errors.add(f"{path}:{lineno}: empty split for image {name!r}")
                continue
            splits.setdefault(s, []).append(image_id)
        labels[image_id] = names
        files[image_id] = name
        where[image_id] = lineno
    errors.raise_if_any()
    return LabelTable(path, classes, labels, f"file:{path.name}", splits, files, where)


def resolve_labels(table: LabelTable, class_names: Sequence[str], ids: Iterable[str] | None = None
                   ) -> dict[str, list[int]]:
    """Class names → sorted 0-based indices, for ``ids`` (default: all); unknown classes are errors."""
    index = {n: i for i, n in enumerate(class_names)}
    out = {}
    errors = EntryErrors(table.path)
    unknown: dict[str, int] = {}
    hints: dict[str, str | None] = {}
    for image_id in (table.labels if ids is None else ids):
        names = table.labels[image_id]
        idx = set()
        for n in names:
            if n not in index:
                if n not in hints:
                    hints[n] = did_you_mean(n, class_names)
                unknown[n] = unknown.get(n, 0) + 1
                line = f":{table.lines[image_id]}" if image_id in table.lines else ""
                hint = f" (did you mean {hints[n]!r}?)" if hints[n] else ""
                errors.add(f"{table.path}{line}: image {image_id!r} has unknown class {n!r}{hint}")
                continue
            idx.add(index[n])
        out[image_id] = sorted(idx)
    if errors:
        known = f"known classes: {', '.join(class_names[:30])}{' ...' if len(class_names) > 30 else ''}"
        if len(errors) == 1:
            errors.items[0] += f"; {known}"
        else:
            errors.summary = [", ".join(
                f"unknown class {n!r} x{k}" + (f" (did you mean {hints[n]!r}?)" if hints[n] else "")
                for n, k in list(unknown.items())[:MAX_LISTED]) + ("" if len(unknown) <= MAX_LISTED else " ..."),
                known]
        errors.raise_if_any()
    return out


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
