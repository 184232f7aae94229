"""OpenImages30k in the ``clovaai/wsolevaluation`` layout (``data.format=openimages``).

Layout (what their ``prepare_openimages.sh`` unzips; ``data.root`` = ``dataset/OpenImages``)::

    <root>/train/<mid>/<image>.jpg                       29,819 images, 100 classes (folders = MIDs)
    <root>/val/<mid>/<image>.jpg, <image>_ignore.png, <image>_m<mid>_<inst>.png    2,500 images + masks
    <root>/test/<mid>/...                                                          5,000 images + masks
    <metadata>/<split>/image_ids.txt      one image path (relative to the root) per line
    <metadata>/<split>/class_labels.txt   <image path>,<class index>
    <metadata>/<split>/localization.txt   <image path>,<instance mask path>,<ignore mask path>
                                          one line per instance mask; the ignore path on the first only

The metadata lives in their repository (``metadata/OpenImages``; ``data.metadata_root``); by default it is
looked for under ``<root>/metadata[/OpenImages]`` and, for a checkout of their repository, at
``<root>/../../metadata/OpenImages``. Masks are read under ``mask_root`` (default: the root).

Image id = the file stem (the OpenImages image id, unique over all splits). Single-label images:
``labels[i] == [class]``. Class names: the class folder MIDs (``01226z``; the same in every split), or
the class index where the folders do not name a class uniquely; a class-names file may give a list in
index order or OpenImages' ``class-descriptions`` CSV (``/m/01226z,Football``). The class count is
taken over every split's ``class_labels.txt`` found next to this split's, so train and test agree.

``load_mask(i)`` is the usual semantic mask (0 background, c + 1 the union of the instance masks,
255 the ignore region) at image size; :meth:`OpenImagesDataset.wsol_masks` gives foreground and
ignore exactly as wsolevaluation's ``get_mask`` builds them (each mask resized to 224×224 on its own).
Nothing is written into the dataset or metadata folders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..core.errors import TokensegError
from .base import WSSSDataset
from .scan import Problems, drop_bad_images, exif_orientation, scan_cache_file

SPLITS = ("train", "val", "test")
METADATA_FILES = ("image_ids.txt", "class_labels.txt", "localization.txt")
# the transposes ImageOps.exif_transpose applies (load_rgb), so masks follow the image
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


# ------------------------------------------------------------------------------------------------
# metadata files
# ------------------------------------------------------------------------------------------------

def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines (their reader strips only '\\n'; we also drop '\\r')."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TokensegError(f"{path}: metadata file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensegError(f"{path}: cannot read metadata file ({exc})") from exc
    return [(n, ln.rstrip("\r")) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]


def read_image_ids(path: Path) -> list[str]:
    """The image paths of ``image_ids.txt``, in order; a path listed twice is an error."""
    seen: dict[str, int] = {}
    out = []
    for n, s in _lines(path):
        if "," in s:
            raise TokensegError(f"{path}:{n}: expected one image path per line, got {s!r}")
        if s in seen:
            raise TokensegError(f"{path}:{n}: image {s!r} listed twice (first on line {seen[s]})")
        seen[s] = n
        out.append(s)
    return out


def read_class_labels(path: Path, strict: bool = True) -> dict[str, tuple[int, int]]:
    """``{image path: (class index, line number)}`` of ``class_labels.txt``. With ``strict=False``
    bad lines are skipped (used for the other splits, read only for the class count and names)."""
    out: dict[str, tuple[int, int]] = {}
    for n, s in _lines(path):
        parts = s.split(",")
        err = ""
        if len(parts) != 2 or not parts[0]:
            err = f"expected '<image path>,<class index>', got {s!r}"
        else:
            try:
                c = int(parts[1])
                if c < 0:
                    err = f"class index {c} is negative"
            except ValueError:
                err = f"class {parts[1]!r} is not an integer class index"
        if err:
            if strict:
                raise TokensegError(f"{path}:{n}: {err}")
            continue
        if parts[0] in out and strict:
            raise TokensegError(f"{path}:{n}: image {parts[0]!r} has a second label (first on line "
                                f"{out[parts[0]][1]}); OpenImages30k images are single-label")
        out.setdefault(parts[0], (c, n))
    return out


def read_localization(path: Path) -> dict[str, tuple[list[str], str | None]]:
    """``{image path: ([instance mask paths], ignore mask path or None)}`` of ``localization.txt``."""
    out: dict[str, tuple[list[str], str | None]] = {}
    for n, s in _lines(path):
        parts = s.split(",")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise TokensegError(f"{path}:{n}: expected '<image path>,<mask path>,<ignore mask path>' "
                                f"(the ignore path may be empty after an image's first line), got {s!r}")
        image, mask, ignore = parts
        if image in out:
            masks, first_ignore = out[image]
            if ignore and ignore != first_ignore:
                raise TokensegError(f"{path}:{n}: image {image!r} gets a second ignore mask {ignore!r}; "
                                    f"an image's ignore mask goes on its first line only")
            masks.append(mask)
        else:
            # [I] an empty ignore path on the first line means no ignore region (their code would fail)
            out[image] = ([mask], ignore or None)
    return out


def find_metadata_dir(root: Path, split: str, metadata_root: str | Path | None = None) -> Path:
    """The folder holding ``split``'s ``image_ids.txt`` (see the module doc for where it is looked for)."""
    if split not in SPLITS:
        raise TokensegError(f"OpenImages split must be one of {list(SPLITS)}, got {split!r}")
    if metadata_root:
        bases = [Path(metadata_root)]
    else:
        bases = [root / "metadata", root.parent.parent / "metadata"]
    tried = []
    for base in bases:
        for cand in (base / split, base / "OpenImages" / split):
            tried.append(cand)
            if (cand / "image_ids.txt").is_file():
                return cand
    where = ", ".join(str(t) for t in tried)
    raise TokensegError(f"OpenImages metadata for split {split!r} not found (no image_ids.txt in {where}); "
                        f"set data.metadata_root to wsolevaluation's metadata/OpenImages folder")


# ------------------------------------------------------------------------------------------------
# class names
# ------------------------------------------------------------------------------------------------

def _class_folder(image_path: str) -> str | None:
    parts = image_path.split("/")
    return parts[-2] if len(parts) >= 2 else None


def _mid_key(mid: str) -> str:
    return mid.strip().rstrip("/").split("/")[-1]


def read_openimages_class_names(path: str | Path) -> list[str] | dict[str, str]:
    """A class-names file: OpenImages' ``class-descriptions`` CSV (``/m/01226z,Football``) → a
    ``{mid: name}`` dict, or a plain list in class-index order (one name per line, or JSON)."""
    from .labels import read_class_names

    path = Path(path)
    if path.suffix.lower() != ".json":
        try:
            rows = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        except FileNotFoundError:
            raise TokensegError(f"{path}: class names file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokensegError(f"{path}: cannot read class names file ({exc})") from exc
        rows = [r for r in rows if r and not r.startswith("#")]
        if rows and all("," in r for r in rows):
            mapping = {}
            for r in rows:
                mid, name = r.split(",", 1)
                mapping[_mid_key(mid)] = name.strip().strip('"')
            return mapping
    return read_class_names(path)


def _class_names(folders: dict[int, set[str]], num_classes: int,
                 given: Sequence[str] | dict[str, str] | None) -> list[str]:
    mids: list[str | None] = [None] * num_classes
    owners: dict[str, set[int]] = {}
    for c, fs in folders.items():
        for f in fs:
            owners.setdefault(f, set()).add(c)
    for c in range(num_classes):
        fs = folders.get(c, set())
        if len(fs) == 1:
            (f,) = fs
            if owners[f] == {c}:
                mids[c] = f
    if isinstance(given, dict):
        return [given.get(m, m) if m is not None else str(c) for c, m in enumerate(mids)]
    if given is not None:
        return list(given)
    return [m if m is not None else str(c) for c, m in enumerate(mids)]


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------

def _image_geometry(path: Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of the stored pixels, from the header."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orient = exif_orientation(img)
    except FileNotFoundError:
        raise TokensegError(f"{path}: image file not found") from None
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return w, h, orient


def read_binary_mask(path: Path, orientation: int = 1) -> np.ndarray:
    """A mask file read as grayscale (what ``cv2.imread(..., IMREAD_GRAYSCALE)`` gives for 8-bit
    PNGs) → bool ``gray > 0``, turned like its image's EXIF orientation (tokenseg loads images turned)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                gray = Image.fromarray((np.asarray(img) > 0).astype(np.uint8))
            else:
                gray = img.convert("L")
    except FileNotFoundError:
        raise TokensegError(f"{path}: mask file not found") from None
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read mask ({type(exc).__name__}: {exc})") from exc
    if orientation in _EXIF_TRANSPOSE:
        gray = gray.transpose(_EXIF_TRANSPOSE[orientation])
    return np.asarray(gray) > 0


@dataclass
class OpenImagesDataset(WSSSDataset):
    """:class:`WSSSDataset` whose masks are composed from instance and ignore masks on the fly.

    ``mask_paths[i]`` is the image's first instance mask (so code that asks whether masks exist sees
    them); :meth:`load_mask` composes all of them."""

    instance_masks: list[list[Path]] = field(default_factory=list)
    ignore_masks: list[Path | None] = field(default_factory=list)
    metadata_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.ids)
        if len(self.instance_masks) != n or len(self.ignore_masks) != n or len(self.metadata_paths) != n:
            raise ValueError("instance_masks, ignore_masks and metadata_paths need one entry per id")

    def wsol_masks(self, i: int, size: int | None = 224) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, ignore) bool masks of image ``i`` as wsolevaluation's ``get_mask`` builds them:
        each instance mask and the ignore mask resized nearest (OpenCV's rule) to ``size`` × ``size``,
        instances OR-ed, ignore = ignore box minus foreground. ``size=None``: at the image size (masks
        of another size resized nearest to it [I])."""
        from ..core.masks import resize_nearest

        if not self.instance_masks[i]:
            raise TokensegError(f"image {self.ids[i]!r} has no ground-truth mask: no line in "
                                f"{self.meta.get('localization_file', 'localization.txt')} ({self.name})")
        w, h, orient = _image_geometry(self.image_paths[i])
        if orient in (5, 6, 7, 8):
            w, h = h, w
        shape = (size, size) if size else (h, w)
        fg = np.zeros(shape, dtype=bool)
        for p in self.instance_masks[i]:
            fg |= resize_nearest(read_binary_mask(p, orient), shape)
        ign = np.zeros(shape, dtype=bool)
        if self.ignore_masks[i] is not None:
            ign = resize_nearest(read_binary_mask(self.ignore_masks[i], orient), shape) & ~fg
        return fg, ign

    def load_mask(self, i: int) -> np.ndarray:
        fg, ign = self.wsol_masks(i, None)
        out = np.zeros(fg.shape, dtype=np.uint8)
        out[ign] = 255
        out[fg] = self.labels[i][0] + 1
        return out

    def subset(self, ids: Sequence[str]) -> "OpenImagesDataset":
        idx = [self.index_of(k) for k in ids]
        return OpenImagesDataset(
            name=self.name, class_names=list(self.class_names), ids=[self.ids[i] for i in idx],
            image_paths=[self.image_paths[i] for i in idx], labels=[list(self.labels[i]) for i in idx],
            mask_paths=None if self.mask_paths is None else [self.mask_paths[i] for i in idx],
            label_source=self.label_source, meta=dict(self.meta),
            instance_masks=[list(self.instance_masks[i]) for i in idx],
            ignore_masks=[self.ignore_masks[i] for i in idx], metadata_paths=[self.metadata_paths[i] for i in idx])


# ------------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------------

def load_openimages(root: str | Path, split: str, metadata_root: str | Path | None = None, *,
                    mask_root: str | Path | None = None, class_names_file: str | Path | None = None,
                    class_names: Sequence[str] | None = None, skip_bad: bool = False,
                    cache_dir: str | Path | None = None, workers: int = 2) -> OpenImagesDataset:
    """Read ``split`` (train | val | test) of OpenImages30k (see the module doc for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise TokensegError(f"data.root: {root} is not a folder (wsolevaluation's dataset/OpenImages)")
    mroot = Path(mask_root) if mask_root else root
    mdir = find_metadata_dir(root, split, metadata_root)
    ids_file, labels_file, loc_file = (mdir / f for f in METADATA_FILES)
    paths = read_image_ids(ids_file)
    if not paths:
        raise TokensegError(f"{ids_file}: no image listed")
    labels_here = read_class_labels(labels_file)
    loc = read_localization(loc_file) if loc_file.is_file() else {}

    # class count and names over every split next to this one, so the splits agree
    folders: dict[int, set[str]] = {}
    max_label = -1
    for s in SPLITS:
        f = mdir.parent / s / "class_labels.txt"
        table = labels_here if s == split else (read_class_labels(f, strict=False) if f.is_file() else {})
        for p, (c, _) in table.items():
            max_label = max(max_label, c)
            fo = _class_folder(p)
            if fo is not None:
                folders.setdefault(c, set()).add(fo)
    given: Sequence[str] | dict[str, str] | None = list(class_names) if class_names else None
    names_src = ""
    if given is None and class_names_file:
        names_src = str(class_names_file)
        given = read_openimages_class_names(class_names_file)
    if isinstance(given, list):
        for p, (c, n) in labels_here.items():
            if c >= len(given):
                raise TokensegError(f"{labels_file}:{n}: class index {c} is outside 0..{len(given) - 1} "
                                    f"({len(given)} class names in {names_src or 'class_names'})")
        num_classes = len(given)
    else:
        num_classes = max_label + 1
    names = _class_names(folders, num_classes, given)

    problems = Problems(f"openimages:{split}")
    seen_stems: dict[str, str] = {}
    ids, image_paths, labels, inst, ign, metas = [], [], [], [], [], []
    for p in paths:
        stem = Path(p).stem
        if stem in seen_stems:
            raise TokensegError(f"{ids_file}: images {seen_stems[stem]!r} and {p!r} share the image id {stem!r}")
        seen_stems[stem] = p
        path = root / p
        if not path.is_file():
            problems.add(stem, path, f"image file not found (listed in {ids_file})", "missing_image")
        lab: list[int] = []
        if p in labels_here:
            lab = [labels_here[p][0]]
        else:
            problems.add(stem, labels_file, f"no class label for {p!r} (listed in {ids_file})", "no_labels")
        masks, ignore = loc.get(p, ([], None))
        mpaths = [mroot / m for m in masks]
        ipath = mroot / ignore if ignore else None
        for mp in mpaths + ([ipath] if ipath is not None else []):
            if not mp.is_file():
                problems.add(stem, mp, f"mask file not found (listed in {loc_file})", "missing_mask")
                break
        ids.append(stem)
        image_paths.append(path)
        labels.append(lab)
        inst.append(mpaths)
        ign.append(ipath)
        metas.append(p)
    if skip_bad:
        good = [k for k, i in enumerate(ids) if i not in problems]
        drop_bad_images([ids[k] for k in good], [image_paths[k] for k in good], problems, workers,
                        scan_cache_file(cache_dir, root) if cache_dir else None)
    drop = problems.resolve(skip_bad)
    keep = [k for k, i in enumerate(ids) if i not in drop]
    if not keep:
        raise TokensegError(f"{root}: split {split!r} has no usable images")
    any_masks = any(inst[k] for k in keep)
    meta = {"format": "openimages", "root": str(root), "split": split, "metadata_dir": str(mdir),
            "mask_root": str(mroot), "image_dir": str(root), "localization_file": str(loc_file),
            "class_names_file": names_src, "skipped": problems.items if drop else []}
    return OpenImagesDataset(
        name=f"openimages:{split}", class_names=names, ids=[ids[k] for k in keep],
        image_paths=[image_paths[k] for k in keep], labels=[labels[k] for k in keep],
        mask_paths=[inst[k][0] if inst[k] else None for k in keep] if any_masks else None,
        label_source=f"file:{labels_file}", meta=meta, instance_masks=[inst[k] for k in keep],
        ignore_masks=[ign[k] for k in keep], metadata_paths=[metas[k] for k in keep])


__all__ = ["load_openimages", "OpenImagesDataset", "find_metadata_dir", "read_image_ids", "read_class_labels",
           "read_localization", "read_openimages_class_names", "read_binary_mask"]
