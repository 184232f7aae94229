"""COCO instances JSON (any tool's export) as a :class:`~.common.Source`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


from ...core.files import relative_name_problem
from ...core.errors import TokensegError
from ..scan import MAX_LISTED
from ..labels import did_you_mean
from .common import Item, Shape, Source, _check_names


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------

def _coco_files(src: Path, split: str = "") -> list[tuple[str, Path]]:
    if src.is_file():
        return [(split, src)]
    found = [(p.stem.replace("instances_", ""), p) for p in sorted((src / "annotations").glob("instances_*.json"))]
    if not found:
        found = [(p.parent.name, p) for p in sorted(src.glob("*/_annotations.coco.json"))]
    if not found:
        found = [(p.stem, p) for p in sorted(src.glob("*.json"))]
    if not found:
        raise TokensegError(f"{src}: no COCO JSON: expected a .json file, annotations/instances_<split>.json or "
                            f"<split>/_annotations.coco.json")
    if split:
        if len(found) > 1:
            raise TokensegError(f"{src}: --split names the split of one JSON file; this folder has "
                                f"{len(found)} ({', '.join(s for s, _ in found)})")
        found = [(split, found[0][1])]
    return found


def _coco_image_root(ann: Path, src: Path, split: str, first_file: str, images: str | Path | None) -> Path:
    from ..coco import coco_image_dir

    cands = ([Path(images)] if images else []) + [ann.parent, ann.parent / "images"]
    if src.is_dir():
        cands += [coco_image_dir(src, split), src / "images", src]
    cands += [ann.parent.parent / "images", ann.parent.parent]
    for c in cands:
        if first_file and (c / first_file).is_file():
            return c
    if images:
        return Path(images)
    raise TokensegError(f"{ann}: cannot find its images (e.g. {first_file!r}); looked in "
                        f"{', '.join(str(c) for c in dict.fromkeys(cands))}: give --images DIR")


def read_coco(src: str | Path, classes: Sequence[str] | None = None, split: str = "",
              images: str | Path | None = None, keep_empty: bool = False) -> Source:
    from ..coco import read_coco_instances

    src = Path(src)
    if not src.exists():
        raise TokensegError(f"{src}: no such file or folder")
    files = _coco_files(src, split)
    names: list[str] | None = None
    items: list[Item] = []
    problems: list[str] = []
    notes: list[str] = []
    image_dirs: list[Path] = []
    seen: dict[str, str] = {}
    n_boxes = n_area = 0
    for sname, ann in files:
        index = read_coco_instances(ann)
        if names is None:
            names = index["classes"]
        elif index["classes"] != names:
            raise TokensegError(f"{ann}: its categories differ from {files[0][1]}'s; import the files one by one")
        first = next((im["file_name"] for im in index["images"]), "")
        root = _coco_image_root(ann, src, sname, first, images)
        image_dirs.append(root)
        prefix = f"{sname}/" if len(files) > 1 and sname else ""
        empty = 0
        for im in index["images"]:
            fname = im["file_name"].replace("\\", "/")
            bad = relative_name_problem(fname)
            if bad:
                problems.append(f"{ann}: image {im['coco_id']} file_name {fname!r} {bad}")
                continue
            if not im["anns"] and not keep_empty:
                empty += 1
                continue
            image_id = prefix + str(Path(fname).with_suffix("").as_posix())
            if image_id in seen:
                problems.append(f"{ann}: image {im['coco_id']} ({fname}) has the same id {image_id!r} as an image of "
                                f"{seen[image_id]}")
                continue
            seen[image_id] = str(ann)
            item = Item(image_id, root / fname, Path(fname).suffix.lower(), sname, (im["width"], im["height"]),
                        where=str(ann))
            for value, crowd, seg, area in im["anns"]:
                has_area = bool(seg) and not (isinstance(seg, list) and not any(len(p) >= 6 for p in seg))
                if isinstance(seg, list):
                    seg = [p for p in seg if len(p) >= 6]
                item.shapes.append(Shape(value, seg if has_area else None, area, bool(crowd)))
                n_area += has_area
                n_boxes += not has_area
                item.classes.add(value - 1)
            items.append(item)
        if empty:
            notes.append(f"{ann.name}: {empty} image(s) without annotations left out (--keep-empty keeps them "
                         f"as background)")
    assert names is not None
    if classes:
        order = list(classes)
        unknown = [n for n in names if n not in order]
        if unknown:
            hint = "; ".join(f"{n!r}" + (f" (did you mean {did_you_mean(n, order)!r}?)" if did_you_mean(n, order)
                                         else "") for n in unknown[:MAX_LISTED])
            raise TokensegError(f"--classes lists {len(order)} classes, but the COCO categories also have: {hint}")
        remap = {k + 1: order.index(n) + 1 for k, n in enumerate(names)}
        for it in items:
            for s in it.shapes:
                s.value = remap[s.value]
            it.classes = {remap[c + 1] - 1 for c in it.classes}
        names = order
    used = {c for it in items for c in it.classes}
    unused = [n for k, n in enumerate(names) if k not in used]
    if unused:
        notes.append(f"{len(unused)} class(es) have no annotation: {', '.join(unused[:10])}"
                     f"{' ...' if len(unused) > 10 else ''} (--classes FILE chooses the classes)")
    if n_boxes:
        notes.append(f"{n_boxes} annotation(s) without a segmentation (boxes): their images get labels, no mask")
    return Source("coco", _check_names(names, str(files[0][1])), items, notes, problems, image_dirs, n_area > 0)
