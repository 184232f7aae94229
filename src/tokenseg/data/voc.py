"""PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) reader; also the layout the synthetic generator writes.

Layout (``data.root`` = ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                      image-level labels (what PSA's cls_labels.npy holds)
    SegmentationClass/<id>.png                VOC masks (train 1,464 + val 1,449)
    SegmentationClassAug/<id>.png             SBD-augmented masks (optional)
    ImageSets/Segmentation/{train,val,train_aug}.txt

**Labels**, first that applies (``label_source="auto"``): the ``labels_file`` argument
(``data.labels_file``), ``<root>/labels.json`` (the synthetic dataset has one), ``Annotations/*.xml``,
then the masks. ``label_source`` = ``file`` | ``xml`` | ``masks`` forces one. The source used is
recorded in :attr:`WSSSDataset.label_source`.

**Masks**, per image: ``<root>/<mask_dir>/<id>.png`` (default ``SegmentationClass``), else
``<root>/<aug_mask_dir>/<id>.png`` (default ``SegmentationClassAug``), else none. For the train 1,464
images both exist and the first wins; set ``data.mask_dir=SegmentationClassAug`` to evaluate against
the SBD folder exactly as the MCTformer authors do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..core.errors import TokensegError
from .base import VOC_CLASSES, WSSSDataset
from .labels import read_labels_table, resolve_labels
from .label_files import labels_from_masks, labels_from_xml
from .scan import Problems, UnusableSplit, drop_bad_images, scan_cache_file

LABEL_SOURCES = ("auto", "file", "xml", "masks")


def split_file(root: Path, split: str) -> Path:
    """The list file of ``split``: ``ImageSets/Segmentation/{split}.txt``, or ``split`` itself when it
    is a path to a ``.txt`` file (absolute, relative to the working directory, or to the root)."""
    if split.endswith(".txt") or "/" in split or "\\" in split:
        p = Path(split).expanduser()
        if not p.is_absolute() and not p.exists() and (root / p).exists():
            p = root / p
        return p
    return root / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of a split list (first column; ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
    lines, as in the authors' train_aug.txt, give ``x``)."""
    root = Path(root)
    path = split_file(root, split)
    if not path.is_file():
        hint = ""
        if Path(split).stem == "train_aug":
            hint = ("; train_aug.txt (10,582 ids, VOC train + SBD) does not ship with VOC2012: copy it "
                    "there, or point data.train_split at the file (data.train_split=/path/to/train_aug.txt)")
        raise TokensegError(f"{path}: split file not found (data.root={root}, split={split!r}){hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read split file ({exc})") from exc
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        image_id = parts[0]
        if "/" in image_id or Path(image_id).suffix.lower() in (".jpg", ".jpeg", ".png"):
            image_id = Path(image_id).stem
        if image_id in seen:
            raise TokensegError(f"{path}:{lineno}: image {image_id!r} listed twice (first on line {seen[image_id]})")
        seen[image_id] = lineno
        ids.append(image_id)
    if not ids:
        raise TokensegError(f"{path}: split file lists no images")
    return ids


def read_labels_json(path: Path) -> tuple[list[str] | None, dict[str, list[str]], str]:
    """tokenseg labels file: {"classes": [...], "source": str, "labels": {image_id: [class names]}}."""
    table = read_labels_table(path)
    return table.classes, table.labels, table.source


def voc_mask_path(root: Path, image_id: str, mask_dir: str = "SegmentationClass",
                  aug_mask_dir: str | None = "SegmentationClassAug") -> Path | None:
    for d in (mask_dir, aug_mask_dir):
        if d:
            p = root / d / f"{image_id}.png"
            if p.is_file():
                return p
    return None


def load_voc(root: str | Path, split: str, labels_file: str | Path | None = None,
             class_names: Sequence[str] | None = None, mask_dir: str = "SegmentationClass", *,
             aug_mask_dir: str | None = "SegmentationClassAug", label_source: str = "auto",
             skip_bad: bool = False, cache_dir: str | Path | None = None, workers: int = 2) -> WSSSDataset:
    """Read one split of a VOC-layout dataset (see the module doc for the label and mask rules).

    Missing images, unreadable annotations and bad masks are errors naming the file; with
    ``skip_bad`` those images are dropped (listed in ``meta["skipped"]``) and every image is decoded
    once to find corrupt files (cached under ``cache_dir``)."""
    root = Path(root)
    if not root.is_dir():
        raise TokensegError(f"data.root: {root} is not a folder")
    if not (root / "JPEGImages").is_dir():
        sub = next((root / n for n in ("VOC2012", "VOCdevkit/VOC2012") if (root / n / "JPEGImages").is_dir()), None)
        hint = f"; did you mean data.root={sub}?" if sub else " (data.root must be the VOC2012 folder)"
        raise TokensegError(f"{root / 'JPEGImages'}: image folder not found{hint}")
    if label_source not in LABEL_SOURCES:
        raise TokensegError(f"data.label_source for VOC must be one of {list(LABEL_SOURCES)}, got {label_source!r}")
    ids = read_split(root, split)
    name = f"{root.name}:{Path(split).stem if split.endswith('.txt') else split}"
    meta: dict = {"format": "voc", "root": str(root), "split": split, "split_file": str(split_file(root, split)),
                  "image_dir": str(root / "JPEGImages")}

    # which source
    lab_path = Path(labels_file) if labels_file else None
    if label_source == "file" and lab_path is None:
        lab_path = root / "labels.json"
        if not lab_path.is_file():
            raise TokensegError(f"data.label_source=file: give data.labels_file (no {lab_path})")
    source = label_source
    if source == "auto":
        if lab_path is None and (root / "labels.json").is_file():
            lab_path = root / "labels.json"
        source = "file" if lab_path is not None else ("xml" if (root / "Annotations").is_dir() else "masks")
    if source == "xml" and not (root / "Annotations").is_dir():
        raise TokensegError(f"{root / 'Annotations'}: folder not found (data.label_source=xml)")

    table = None
    if source == "file":
        table = read_labels_table(lab_path)
        names = list(class_names or table.classes or VOC_CLASSES)
        label_desc = table.source
        meta["labels_file"] = str(lab_path)
    else:
        names = list(class_names or VOC_CLASSES)
        label_desc = "xml:Annotations" if source == "xml" else "masks"

    problems = Problems(name)
    image_paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    mask_paths = [voc_mask_path(root, i, mask_dir, aug_mask_dir) for i in ids]
    labels: list[list[int]] = []
    if table is not None:
        known = resolve_labels(table, names, [i for i in ids if i in table.labels])
    if source == "masks":
        from_masks = dict(zip(ids, labels_from_masks(mask_paths, len(names), workers)))
    for image_id, img, mp in zip(ids, image_paths, mask_paths):
        lab: list[int] = []
        if not img.is_file():
            problems.add(image_id, img, "image file not found", "missing_image")
        try:
            if table is not None:
                if image_id in known:
                    lab = known[image_id]
                else:
                    problems.add(image_id, lab_path, f"no labels for image {image_id!r} of split {split!r}",
                                 "no_labels")
            elif source == "xml":
                lab = labels_from_xml(root / "Annotations" / f"{image_id}.xml", names)
            else:
                if mp is None:
                    problems.add(image_id, root / mask_dir / f"{image_id}.png",
                                 "mask not found (labels are read from masks)", "no_labels")
                else:
                    got = from_masks[image_id]
                    if isinstance(got, TokensegError):
                        raise got
                    lab = got
        except TokensegError as exc:
            problems.add(image_id, None, str(exc), "bad_annotation")
        labels.append(lab)
    if skip_bad:
        good = [k for k, i in enumerate(ids) if i not in problems]
        drop_bad_images([ids[k] for k in good], [image_paths[k] for k in good], problems, workers,
                        scan_cache_file(cache_dir, root / "JPEGImages") if cache_dir else None)
    drop = problems.resolve(skip_bad)
    used: dict[str, int] = {}
    for mp in mask_paths:
        if mp is not None:
            used[mp.parent.name] = used.get(mp.parent.name, 0) + 1
    if source == "masks":
        label_desc = "masks:" + "+".join(used) if used else "masks"
    meta["mask_dirs"] = used
    meta["skipped"] = problems.items if drop else []
    keep = [k for k, i in enumerate(ids) if i not in drop]
    if not keep:
        raise UnusableSplit(f"{name}: no usable images left", problems.items, root / "JPEGImages")
    return WSSSDataset(
        name=name, class_names=names, ids=[ids[k] for k in keep], image_paths=[image_paths[k] for k in keep],
        labels=[labels[k] for k in keep], mask_paths=[mask_paths[k] for k in keep], label_source=label_desc,
        meta=meta)
