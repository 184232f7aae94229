"""Your own images: a folder of images + a CSV or JSON of image-level labels (``data.format=folder``).

Layout (``data.root``), every part but the images optional::

    images/                 the images, any depth (data.image_dir; default images/ if it exists, else
                            the root itself). Image id = path below it without extension: "cats/001".
    labels.csv | labels.json  image-level labels (data.labels_file; default: these two names, in order)
    classes.txt             class order, one name per line (data.class_names_file)
    masks/<id>.png          ground-truth masks for evaluation: 0 background, c + 1 class c, 255 ignore
                            (data.mask_dir if that folder exists under the root, else masks/)
    splits/<split>.txt      split lists, one image id or file name per line

Labels from a labelling tool (YOLO, COCO, LabelMe): ``tokenseg data import`` writes this layout
(:mod:`tokenseg.data.importers`). Image ids must be relative paths below the image folder: ids with
``..`` components or absolute ones are refused (outputs are named after ids).

CSV: a header row, then one row per image. Either ``image,labels[,split]`` with class names separated by
``;`` or ``|`` (empty: no foreground class), or a multi-hot table ``image,<class 1>,<class 2>,...[,split]``
of 0/1. The image column may be called image/id/file/filename/path; file names may keep their extension.
JSON: our labels format (``{"classes": [...], "labels": {id: [names]}, "splits": {split: [ids]}}``) or a
plain ``{image: [names]}`` mapping.

Class order: the class names file, else the JSON ``classes`` / the CSV multi-hot header, else the sorted
set of names in the labels (refused when masks exist: their values need a declared order).

Splits: the CSV ``split`` column or JSON ``splits``, else ``splits/<split>.txt`` (or a path to a list
file); the split ``all`` is always every labelled image. Images in the folder without labels are left out
(and listed by ``tokenseg data check``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..core.errors import TokensegError
from .base import IMAGE_EXTENSIONS, WSSSDataset
from .labels import LabelTable, read_class_names, read_labels_table, resolve_labels
from .label_files import labels_from_mask
from .scan import MAX_LISTED, Problems, UnusableSplit, drop_bad_images, scan_cache_file

LABEL_SOURCES = ("auto", "file", "masks")


def folder_paths(root: Path, image_dir: str = "", labels_file: str | Path | None = None,
                 mask_dir: str = "", class_names_file: str | Path | None = None) -> dict:
    """Resolve the optional parts of a folder dataset (see the module doc)."""
    root = Path(root)
    if image_dir:
        images = root / image_dir
    else:
        images = root / "images" if (root / "images").is_dir() else root
    if labels_file:
        lab = Path(labels_file)
        if not lab.is_absolute() and not lab.exists() and (root / lab).exists():
            lab = root / lab
    else:
        lab = next((root / n for n in ("labels.csv", "labels.json") if (root / n).is_file()), None)
    masks = None
    for cand in ([mask_dir] if mask_dir else []) + ["masks"]:
        if (root / cand).is_dir():
            masks = root / cand
            break
    if class_names_file:
        cls = Path(class_names_file)
        if not cls.is_absolute() and not cls.exists() and (root / cls).exists():
            cls = root / cls
    else:
        cls = next((root / n for n in ("classes.txt", "class_names.txt") if (root / n).is_file()), None)
    return {"images": images, "labels": lab, "masks": masks, "classes": cls}


def index_images(image_dir: Path, exclude: Sequence[Path] = ()) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """``{id: path}`` of every image below ``image_dir`` (hidden entries skipped); ids that two files
    share (``a.jpg`` and ``a.png``) are returned separately."""
    found: dict[str, list[Path]] = {}
    skip = {Path(p).resolve() for p in exclude if p is not None}
    for dirpath, dirnames, filenames in os.walk(image_dir):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        for fn in sorted(filenames):
            if fn.startswith(".") or Path(fn).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            p = here / fn
            image_id = p.relative_to(image_dir).with_suffix("").as_posix()
            found.setdefault(image_id, []).append(p)
    unique = {k: v[0] for k, v in found.items() if len(v) == 1}
    clashes = {k: v for k, v in found.items() if len(v) > 1}
    return unique, clashes


def _split_list(path: Path) -> list[str]:
    from .labels import EntryErrors, _id_of, id_problem

    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read split list ({exc})") from exc
    ids, seen = [], {}
    errors = EntryErrors(path)
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        name = s.split(",")[0]
        image_id = _id_of(name)
        bad = id_problem(name, image_id)
        if bad:
            errors.add(f"{path}:{n}: {bad}")
        elif image_id in seen:
            errors.add(f"{path}:{n}: image {image_id!r} listed twice (first on line {seen[image_id]})")
        else:
            seen[image_id] = n
            ids.append(image_id)
    errors.raise_if_any()
    return ids


class _ImageHints:
    """Did-you-mean for image ids that the labels name but the folder lacks: the same id in another
    case, the same file name in one other subfolder, else the closest id (difflib). Only asked for the
    problems that are shown, so a folder of 100k images costs nothing when all is well."""

    def __init__(self, index: dict[str, Path]) -> None:
        self.index = index
        self._lower: dict[str, str] | None = None
        self._base: dict[str, list[str]] | None = None
        self.asked = 0

    def __call__(self, image_id: str) -> str | None:
        if not self.index or self.asked >= MAX_LISTED:
            return None
        self.asked += 1
        if self._lower is None:
            self._lower = {k.lower(): k for k in self.index}
            self._base = {}
            for k in self.index:
                self._base.setdefault(k.rsplit("/", 1)[-1].lower(), []).append(k)
        hit = self._lower.get(image_id.lower())
        if hit is not None:
            return hit
        same = self._base.get(image_id.rsplit("/", 1)[-1].lower(), [])
        if len(same) == 1:
            return same[0]
        import difflib

        close = difflib.get_close_matches(image_id, list(self.index), n=1, cutoff=0.8)
        return close[0] if close else None


def _find_image_folder(root: Path, images_dir: Path, files: Sequence[str]) -> tuple[Path, int] | None:
    """The folder below ``root`` (two levels deep) that holds most of ``files`` (labels' file names),
    for the hint when none of them is where we looked."""
    best: tuple[Path, int] | None = None
    names = list(files)[:50]
    cands = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")] if root.is_dir() else []
    cands += [e for d in cands for e in sorted(d.iterdir()) if e.is_dir() and not e.name.startswith(".")]
    for d in ([root] if images_dir != root else []) + cands:
        if d == images_dir:
            continue
        n = 0
        for f in names:
            q = d / f
            if q.is_file() or (not q.suffix and any((d / (f + e)).is_file() for e in IMAGE_EXTENSIONS[:4])):
                n += 1
        if n and (best is None or n > best[1]):
            best = (d, n)
    return best


def load_folder(root: str | Path, split: str = "all", labels_file: str | Path | None = None, *,
                image_dir: str = "", mask_dir: str = "", class_names_file: str | Path | None = None,
                class_names: Sequence[str] | None = None, label_source: str = "auto", skip_bad: bool = False,
                cache_dir: str | Path | None = None, workers: int = 2) -> WSSSDataset:
    """Read ``split`` of a folder dataset (see the module doc)."""
    root = Path(root)
    if not root.is_dir():
        raise TokensegError(f"data.root: {root} is not a folder")
    if label_source not in LABEL_SOURCES:
        raise TokensegError(f"data.label_source for folder datasets must be one of {list(LABEL_SOURCES)}, "
                            f"got {label_source!r}")
    parts = folder_paths(root, image_dir, labels_file, mask_dir, class_names_file)
    images_dir: Path = parts["images"]
    if not images_dir.is_dir():
        raise TokensegError(f"{images_dir}: image folder not found (data.image_dir)")
    if labels_file and not Path(parts["labels"]).is_file():
        raise TokensegError(f"{parts['labels']}: labels file not found (data.labels_file)")
    use_file = label_source == "file" or (label_source == "auto" and parts["labels"] is not None)
    if use_file and parts["labels"] is None:
        raise TokensegError(f"{root}: no labels file (labels.csv / labels.json); set data.labels_file")
    if not use_file and parts["masks"] is None:
        raise TokensegError(
            f"{root}: no image-level labels: give a labels CSV/JSON (data.labels_file, or labels.csv in the "
            f"folder) or a masks/ folder to read them from")
    table: LabelTable | None = read_labels_table(parts["labels"]) if use_file else None

    names: list[str]
    if class_names:
        names = list(class_names)
    elif parts["classes"] is not None:
        names = read_class_names(parts["classes"])
    elif table is not None and table.classes:
        names = list(table.classes)
    elif table is not None and parts["masks"] is None:
        names = sorted({n for v in table.labels.values() for n in v})
        if not names:
            raise TokensegError(f"{table.path}: no class names in any label")
    else:
        where = parts["masks"]
        raise TokensegError(
            f"{where}: masks store class indices, so the class order must be declared: add classes.txt "
            f"(one name per line, class 1 first) or set data.class_names_file")

    exclude = [p for p in (parts["masks"], root / "splits") if p is not None]
    index, clashes = index_images(images_dir, exclude)

    # which ids
    split_desc = split
    def has_mask(image_id: str) -> bool:
        return parts["masks"] is not None and (parts["masks"] / f"{image_id}.png").is_file()

    if split == "all":  # every labelled image (read off the masks: every image with a mask)
        ids = list(table.labels) if table is not None else [i for i in sorted(index) if has_mask(i)]
    elif table is not None and table.splits:
        if split not in table.splits:
            have = sorted(table.splits)
            raise TokensegError(f"{table.path}: no image in split {split!r}; splits: {', '.join(have)}, all")
        ids = list(table.splits[split])
    else:
        lst = Path(split) if (split.endswith(".txt") or "/" in split) else root / "splits" / f"{split}.txt"
        if not lst.is_absolute() and not lst.exists() and (root / lst).exists():
            lst = root / lst
        if not lst.is_file():
            src = table.path if table is not None else root
            raise TokensegError(
                f"{lst}: split list not found, and {src} defines no splits (no 'split' column); "
                f"use split 'all' (data.train_split=all data.val_split=all), add a split column, or "
                f"write {root / 'splits' / (split + '.txt')}")
        ids = _split_list(lst)
        split_desc = str(lst)

    problems = Problems(f"{root.name}:{split}")
    known = {}
    if table is not None:
        known = resolve_labels(table, names, [i for i in ids if i in table.labels])
    image_paths: list[Path] = []
    mask_paths: list[Path | None] = []
    labels: list[list[int]] = []
    hints = _ImageHints(index)
    for image_id in ids:
        path = None
        if table is not None and image_id in table.files:
            cand = images_dir / table.files[image_id]
            if cand.is_file():
                path = cand
        if path is None:
            if image_id in clashes:
                problems.add(image_id, clashes[image_id][0],
                             f"several files for image id {image_id!r}: "
                             f"{', '.join(p.name for p in clashes[image_id])}; name the file in the labels",
                             "ambiguous_image")
                path = clashes[image_id][0]
            elif image_id in index:
                path = index[image_id]
            else:
                shown = table.files.get(image_id, image_id) if table is not None else image_id
                path = images_dir / shown
                close = hints(image_id)
                problems.add(image_id, path, "image file not found (listed in the labels but not in the folder)"
                             + (f"; did you mean {close!r} ({index[close].relative_to(images_dir)})?"
                                if close else ""), "missing_image")
        mp = parts["masks"] / f"{image_id}.png" if parts["masks"] is not None else None
        mp = mp if mp is not None and mp.is_file() else None
        lab: list[int] = []
        if table is not None:
            if image_id in known:
                lab = known[image_id]
            else:
                problems.add(image_id, table.path, f"no labels for image {image_id!r}", "no_labels")
        elif mp is None:
            problems.add(image_id, parts["masks"] / f"{image_id}.png", "mask not found (labels are read from masks)",
                         "no_labels")
        else:
            try:
                lab = labels_from_mask(mp, len(names))
            except TokensegError as exc:
                problems.add(image_id, None, str(exc), "bad_mask")
        image_paths.append(path)
        mask_paths.append(mp)
        labels.append(lab)
    labelled = set(table.labels) if table is not None else {i for i in index if has_mask(i)}
    unlabelled = sorted(set(index) - labelled)
    if skip_bad:
        good = [k for k, i in enumerate(ids) if i not in problems]
        drop_bad_images([ids[k] for k in good], [image_paths[k] for k in good], problems, workers,
                        scan_cache_file(cache_dir, images_dir) if cache_dir else None)
    missing = [p for p in problems.items if p["kind"] == "missing_image"]
    if ids and len(missing) == len(ids):  # not one image where we looked: say where, and where they are
        where = str(images_dir) + (" (data.image_dir)" if image_dir else
                                   " (the root itself, as it has no images/ folder)" if images_dir == root else "")
        msg = (f"{root}: split {split!r} has no usable images: none of the {len(ids)} images named in the "
               f"labels is in {where}")
        files = [table.files.get(i, i) for i in ids] if table is not None else ids
        found = _find_image_folder(root, images_dir, files)
        tried = min(len(files), 50)
        if found is not None and 2 * found[1] >= tried:
            rel = found[0].relative_to(root).as_posix() if found[0] != root else "."
            msg += (f"; {'they are' if found[1] == tried else f'{found[1]} of the first {tried} are'} in "
                    f"{found[0]}: set data.image_dir={rel}")
        shown = [Problems.describe(p) for p in problems.items[:MAX_LISTED]]
        more = f"\n  ... and {len(problems.items) - MAX_LISTED} more" if len(problems.items) > MAX_LISTED else ""
        raise UnusableSplit(msg + "\n  " + "\n  ".join(shown) + more, problems.items, images_dir)
    drop = problems.resolve(skip_bad)
    keep = [k for k, i in enumerate(ids) if i not in drop]
    if not keep:
        raise UnusableSplit(f"{root}: split {split!r} has no usable images", problems.items, images_dir)
    meta = {"format": "folder", "root": str(root), "split": split, "split_source": split_desc,
            "image_dir": str(images_dir), "labels_file": str(table.path) if table is not None else "",
            "class_names_file": str(parts["classes"] or ""), "mask_dir": str(parts["masks"] or ""),
            "unlabelled_images": unlabelled, "skipped": problems.items if drop else []}
    source = table.source if table is not None else f"masks:{parts['masks'].name}"
    return WSSSDataset(name=f"{root.name}:{split}", class_names=names, ids=[ids[k] for k in keep],
                       image_paths=[image_paths[k] for k in keep], labels=[labels[k] for k in keep],
                       mask_paths=[mask_paths[k] for k in keep], label_source=source, meta=meta)
