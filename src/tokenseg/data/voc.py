"""PASCAL VOC layout reader (also the layout the synthetic generator writes)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import TokensegError
from .base import WSSSDataset

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]


def read_split(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Segmentation/{split}.txt`` (first column)."""
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise TokensegError(f"{path}: split file not found (data.root={root}, split={split!r})")
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            # train_aug lists may be "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
            ids.append(Path(parts[0]).stem)
    return ids


def read_labels_json(path: Path) -> tuple[list[str] | None, dict[str, list[str]], str]:
    """tokenseg labels file: {"classes": [...], "source": str, "labels": {image_id: [class names]}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read labels file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise TokensegError(f"{path}: labels file must be a JSON object with a 'labels' mapping")
    return data.get("classes"), data["labels"], str(data.get("source", "file"))


def load_voc(root: str | Path, split: str, labels_file: str | Path | None = None,
             class_names: list[str] | None = None, mask_dir: str = "SegmentationClass") -> WSSSDataset:
    """Read a split of a VOC-layout dataset. Labels come from ``labels_file`` (default:
    ``<root>/labels.json`` if present). Masks are ``<root>/<mask_dir>/<id>.png`` where present."""
    root = Path(root)
    if not root.is_dir():
        raise TokensegError(f"data.root: {root} is not a folder")
    ids = read_split(root, split)
    labels_path = Path(labels_file) if labels_file else root / "labels.json"
    if not labels_path.is_file():
        raise TokensegError(f"{labels_path}: image-level labels file not found")
    file_classes, by_id, source = read_labels_json(labels_path)
    names = list(class_names or file_classes or VOC_CLASSES)
    index = {n: i for i, n in enumerate(names)}
    labels, image_paths, mask_paths = [], [], []
    for image_id in ids:
        if image_id not in by_id:
            raise TokensegError(f"{labels_path}: no labels for image {image_id!r} of split {split!r}")
        lab = []
        for name in by_id[image_id]:
            if name not in index:
                raise TokensegError(f"{labels_path}: image {image_id!r} has unknown class {name!r}")
            lab.append(index[name])
        labels.append(sorted(set(lab)))
        image_paths.append(root / "JPEGImages" / f"{image_id}.jpg")
        mp = root / mask_dir / f"{image_id}.png"
        mask_paths.append(mp if mp.is_file() else None)
    return WSSSDataset(name=f"{root.name}:{split}", class_names=names, ids=ids, image_paths=image_paths,
                       labels=labels, mask_paths=mask_paths, label_source=source)
