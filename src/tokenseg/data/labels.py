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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


from ..core.errors import TokensegError
from ..core.files import relative_name_problem
from .base import IMAGE_EXTENSIONS
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
