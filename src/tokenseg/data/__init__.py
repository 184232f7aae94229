"""Dataset readers behind one interface (:class:`WSSSDataset`).

``data.format``: ``voc`` (PASCAL VOC 2012 + SBD), ``coco`` (MS COCO 2014 instances), ``folder`` (your
images + a CSV/JSON of labels), ``openimages`` (OpenImages30k in the wsolevaluation layout) or
``synthetic``. See the reader modules for each layout, and
:func:`check_dataset` for the report ``tokenseg data check`` prints.
"""
from __future__ import annotations

from .base import COCO_CLASSES, VOC_CLASSES, WSSSDataset, load_rgb
from .build import build_dataset, cache_root, class_names_for
from .check import check_dataset, format_report
from .coco import load_coco
from .folder import load_folder
from .labels import read_class_names, read_labels_table
from .label_files import import_cls_labels_npy, write_labels_file
from .openimages import OpenImagesDataset, load_openimages
from .voc import load_voc

__all__ = [
    "WSSSDataset", "load_rgb", "build_dataset", "cache_root", "class_names_for",
    "load_voc", "load_coco", "load_folder", "load_openimages", "OpenImagesDataset", "check_dataset",
    "format_report",
    "write_labels_file", "read_labels_table", "read_class_names", "import_cls_labels_npy",
    "VOC_CLASSES", "COCO_CLASSES",
]
