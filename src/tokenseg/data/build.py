"""The dataset a config names: ``build_dataset`` picks the reader of ``data.format`` and its options."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import DataConfig
from ..core.errors import TokensegError
from .base import WSSSDataset
from .coco import load_coco
from .folder import load_folder
from .openimages import load_openimages
from .voc import load_voc


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("TOKENSEG_CACHE", Path.home() / ".cache" / "tokenseg"))


def class_names_for(cfg: DataConfig) -> list[str] | None:
    """The class names of ``data.class_names_file``, or None when not set."""
    if not cfg.class_names_file:
        return None
    from .labels import read_class_names

    path = Path(cfg.class_names_file)
    if not path.is_absolute() and not path.exists() and cfg.root and (Path(cfg.root) / path).exists():
        path = Path(cfg.root) / path
    return read_class_names(path)


def build_dataset(cfg: DataConfig, split: str, chosen_by: str = "") -> WSSSDataset:
    """The dataset named by ``cfg`` (format + root), restricted to ``split``. ``chosen_by`` names the
    setting that picked the split (``"config key maps.split or --split"``): an error about the split
    says it, so the user knows what to change."""
    try:
        return _build_dataset(cfg, split)
    except TokensegError as exc:
        if chosen_by and exc.args and repr(split) in str(exc.args[0]):
            exc.args = (f"{exc.args[0]}\n  (split {split!r} chosen by {chosen_by})",) + exc.args[1:]
        raise


def _folder_hint(cfg: DataConfig) -> None:
    """A folder dataset read as another format: say ``data.format=folder`` instead of the format's own
    complaint about a missing layout."""
    root = Path(cfg.root) if cfg.root else None
    if root is None or not root.is_dir() or cfg.format == "folder":
        return
    own = {"voc": "JPEGImages", "coco": "annotations", "synthetic": "tokenseg_synthetic.json", "openimages": "train"}
    labels = [n for n in ("labels.csv", "labels.json") if (root / n).is_file()]
    if labels and not (root / own.get(cfg.format, "")).exists():
        raise TokensegError(f"{root} holds {labels[0]}, the layout of your own images, but data.format is "
                            f"{cfg.format!r}: add data.format=folder")


def _build_dataset(cfg: DataConfig, split: str) -> WSSSDataset:
    _folder_hint(cfg)
    if cfg.format == "synthetic":
        from .synthetic import ensure_synthetic
        root = Path(cfg.root) if cfg.root else ensure_synthetic(cfg.synthetic, cache_root(cfg))
        if cfg.root:
            ensure_synthetic(cfg.synthetic, root, exact=True)
        return load_voc(root, split)
    if not cfg.root:
        hint = {"voc": "VOCdevkit/VOC2012", "coco": "the folder holding train2014/ val2014/ annotations/",
                "folder": "your folder of images",
                "openimages": "wsolevaluation's dataset/OpenImages (train/ val/ test/ class folders)",
                }.get(cfg.format, "the dataset")
        raise TokensegError(f"data.root is empty: point it at {hint} (or set data.format)")
    common = dict(skip_bad=cfg.skip_bad, cache_dir=cache_root(cfg), workers=max(1, cfg.num_workers))
    if cfg.format == "voc":
        return load_voc(cfg.root, split, labels_file=cfg.labels_file or None, class_names=class_names_for(cfg),
                        mask_dir=cfg.mask_dir, aug_mask_dir=cfg.aug_mask_dir or None,
                        label_source=cfg.label_source, **common)
    if cfg.format == "coco":
        if cfg.label_source not in ("auto", "file", "annotations"):
            raise TokensegError(
                f"data.label_source for COCO must be auto, annotations or file, got {cfg.label_source!r}")
        if cfg.label_source == "file" and not cfg.labels_file:
            raise TokensegError("data.label_source=file: set data.labels_file")
        return load_coco(cfg.root, split, labels_file=cfg.labels_file or None, class_names=class_names_for(cfg),
                         keep_empty=cfg.keep_empty, rasterizer=cfg.coco_rasterizer, **common)
    if cfg.format == "folder":
        return load_folder(cfg.root, split, labels_file=cfg.labels_file or None, image_dir=cfg.image_dir,
                           mask_dir=cfg.mask_dir, class_names_file=cfg.class_names_file or None,
                           label_source=cfg.label_source, **common)
    if cfg.format == "openimages":
        if cfg.labels_file:
            raise TokensegError("data.labels_file is not used by data.format=openimages: the labels are the "
                                "metadata's class_labels.txt (data.metadata_root)")
        return load_openimages(cfg.root, split, metadata_root=_resolve(cfg, cfg.metadata_root),
                               mask_root=_resolve(cfg, cfg.mask_root),
                               class_names_file=_resolve(cfg, cfg.class_names_file), **common)
    raise TokensegError(f"data.format {cfg.format!r} is not supported; "
                        f"use one of: voc, coco, folder, openimages, synthetic")


def _resolve(cfg: DataConfig, name: str) -> Path | None:
    """A path from the config, tried as given and then under data.root."""
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute() and not path.exists() and cfg.root and (Path(cfg.root) / path).exists():
        path = Path(cfg.root) / path
    return path
