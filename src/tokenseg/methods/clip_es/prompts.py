"""CLIP-ES's prompts: class names with their synonyms, background words, the text features of both."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ...data.base import COCO_CLASSES, VOC_CLASSES
from ...core.errors import TokensegError
from ...models.clip import ClipModel



# --------------------------------------------------------------------------------------------
# Class names, synonyms, background words (CLIP-ES's clip_text.py, as data)
# --------------------------------------------------------------------------------------------

DEFAULT_TEMPLATE = "a clean origami {}."  # their sharpness-selected prompt, for classes and background

# the datasets' own names (tokenseg.data.base), as tuples for comparison with a dataset's class list
VOC_CLASS_NAMES = tuple(VOC_CLASSES)
COCO_CLASS_NAMES = tuple(COCO_CLASSES)
# "Synonym fusion": the name put into the prompt for a class, where it differs from the dataset's name.
VOC_SYNONYMS = {
    "bird": "bird avian",
    "chair": "chair seat",
    "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
}
# COCO's official names → their prompt names (VOC spellings for some; "sknowboard" is theirs, kept
# so that the text features, hence the seeds, are theirs).
COCO_SYNONYMS = {
    "person": "person with clothes,people,human", "motorcycle": "motorbike", "airplane": "aeroplane",
    "bird": "bird avian", "backpack": "backpack,bag", "umbrella": "umbrella,parasol",
    "handbag": "handbag,purse", "tie": "necktie", "snowboard": "sknowboard", "baseball glove": "glove",
    "spoon": "dessertspoon", "chair": "chair seat", "couch": "sofa", "potted plant": "pottedplant",
    "dining table": "diningtable", "tv": "tvmonitor screen", "remote": "remote control",
    "hair drier": "hairdrier,blowdrier",
}
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
    "street", "valley", "bridge", "sign",
)
COCO_BACKGROUND = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))
BOX_THRESHOLDS = {"voc": 0.4, "coco": 0.7}
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dataset_kind(class_names: Sequence[str], fmt: str | None = None) -> str:
    """'voc', 'coco' or 'custom': VOC/COCO get the authors' prompts, background words and box threshold."""
    names = tuple(class_names)
    if fmt == "coco" or names == COCO_CLASS_NAMES:
        return "coco"
    if names == VOC_CLASS_NAMES:
        return "voc"
    return "custom"


def prompt_names(class_names: Sequence[str], kind: str = "custom",
                 synonyms: Mapping[str, str | Sequence[str]] | None = None) -> list[str]:
    """The name written into the prompt for each class: the authors' synonyms for VOC/COCO (by class
    index, whatever the dataset calls them), then ``synonyms`` (a list is comma-joined, as theirs)."""
    names = [str(n) for n in class_names]
    if kind == "coco" and len(names) == len(COCO_CLASS_NAMES):
        out = [COCO_SYNONYMS.get(n, n) for n in COCO_CLASS_NAMES]
    elif kind == "voc" and len(names) == len(VOC_CLASS_NAMES):
        out = [VOC_SYNONYMS.get(n, n) for n in VOC_CLASS_NAMES]
    else:
        out = list(names)
    for i, n in enumerate(names):
        if synonyms and n in synonyms:
            s = synonyms[n]
            out[i] = s if isinstance(s, str) else ",".join(str(t) for t in s)
    unknown = sorted(set(synonyms or {}) - set(names))
    if unknown:
        raise TokensegError(f"clip_es.synonyms_file: classes {unknown[:5]} are not among the dataset's classes")
    return out


def background_words(kind: str = "custom", words: Sequence[str] | str | None = None) -> list[str]:
    """``words`` if given (a list, or a text file with one word per line), else the authors' set for
    COCO (23 words) or VOC (25, also the default for custom datasets [I])."""
    if words is None or (isinstance(words, (list, tuple)) and len(words) == 0):
        return list(COCO_BACKGROUND if kind == "coco" else VOC_BACKGROUND)
    if isinstance(words, (str, os.PathLike)):
        p = Path(words).expanduser()
        if not p.is_file():
            raise TokensegError(f"clip_es.background_words: file {p} not found")
        out = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    else:
        out = [str(w).strip() for w in words if str(w).strip()]
    if not out:
        raise TokensegError("clip_es.background_words: the list is empty")
    return out


def load_synonyms(path: str | os.PathLike) -> dict[str, str | list[str]]:
    """A synonyms file: JSON or YAML mapping class name → prompt name or list of synonyms."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokensegError(f"clip_es.synonyms_file: file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise TokensegError(f"{p}: cannot parse synonyms ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, (str, list)) for v in data.values()):
        raise TokensegError(f"{p}: synonyms must map each class name to a string or a list of strings")
    return {str(k): v for k, v in data.items()}


@dataclass
class ClipESText:
    """What the text side gives CLIP-ES: the class and background text features and the words used."""

    fg: torch.Tensor  # (C, E) one row per dataset class, in the dataset's order
    bg: torch.Tensor  # (K, E)
    prompts: list[str]  # the name written into the template for each class
    background: list[str]
    kind: str  # voc | coco | custom
    box_threshold: float  # the authors' for this kind (0.7 COCO, else 0.4)


def clip_es_text(model: ClipModel, class_names: Sequence[str], fmt: str | None = None,
                 template: str | Sequence[str] = DEFAULT_TEMPLATE,
                 synonyms: Mapping[str, str | Sequence[str]] | str | os.PathLike | None = None,
                 background: Sequence[str] | str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> ClipESText:
    """Text features for a dataset: VOC/COCO (recognised by their class lists, or ``fmt='coco'``) get
    the authors' synonyms and background words; any other dataset its own names (``synonyms``: a
    mapping or a JSON/YAML file) and the VOC background words unless ``background`` replaces them
    (a list or a file with one word per line). Cached per (weights, template, words)."""
    from ...models.clip_ops import text_features

    kind = dataset_kind(class_names, fmt)
    if isinstance(synonyms, (str, os.PathLike)):
        synonyms = load_synonyms(synonyms)
    prompts = prompt_names(class_names, kind, synonyms)
    words = background_words(kind, background)
    return ClipESText(fg=text_features(model, prompts, template, cache_dir),
                      bg=text_features(model, words, template, cache_dir), prompts=prompts, background=words,
                      kind=kind, box_threshold=BOX_THRESHOLDS.get(kind, BOX_THRESHOLDS["voc"]))
