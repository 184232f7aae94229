"""Writing a :class:`~.common.Source` as the folder layout of ``data.format=folder``, resumably."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.files import (TEMP_PREFIX, atomic_write, display_name, remove_stale_temps, safe_output_path,
                           write_bytes_atomic, write_json_atomic, write_text_atomic)
from ...core.errors import TokensegError
from ...core.locks import output_lock
from ...core.masks import save_palette_png
from ..scan import MAX_LISTED
from ..guard import refuse_inside_dataset
from .coco_json import read_coco
from .common import (IMPORT_FORMATS, LINK_MODES, MARKER, MARKER_VERSION, _EXIF_TRANSPOSE, Item, Source, _class_file,
                     _image_size)
from .labelme import read_labelme
from .yolo import read_yolo


# ----------------------------------------------------------------------------------------------
# writing the folder dataset
# ----------------------------------------------------------------------------------------------

def _place_image(src: Path, dst: Path, mode: str) -> str:
    """Put ``src`` at ``dst`` atomically (a temp name, then rename); returns how: hard/copy/symlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("hard", "symlink"):
        tmp = dst.parent / f"{TEMP_PREFIX}{secrets.token_hex(4)}.tmp"  # short: a 250-byte name must work
        try:
            if mode == "hard":
                os.link(src, tmp)
            else:
                os.symlink(os.path.abspath(src), tmp)
            os.replace(tmp, dst)
            return mode
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if mode == "symlink":
                raise
    with open(src, "rb") as fin, atomic_write(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return "copy"


def _item_mask(item: Item, backend: str) -> tuple[np.ndarray | None, str]:
    """The item's semantic mask (None without one) and a problem ("" when fine)."""
    from PIL import Image

    from ..coco import semantic_mask

    up, stored, orient = _image_size(item)
    if not item.shapes and item.size is None:
        return np.zeros((up[1], up[0]), np.uint8), ""
    frame = up
    if item.size is not None and tuple(item.size) != up:
        if tuple(item.size) == stored and orient in _EXIF_TRANSPOSE:
            frame = stored  # annotated on the stored pixels, the image shows rotated: rotate the mask too
        else:
            return None, (f"{item.where}: the annotation is for a {item.size[0]}x{item.size[1]} image, but "
                          f"{display_name(item.image or 'the embedded image')} is {up[0]}x{up[1]}")
    W, H = frame
    anns = []
    for s in item.shapes:
        seg = s.seg
        if item.normalised:
            seg = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * (W, H)).reshape(-1).tolist() for p in seg]
        if isinstance(seg, np.ndarray) and frame != up:
            return None, f"{item.where}: a circle/mask shape on an EXIF-rotated image: cannot place it"
        anns.append((s.value, int(s.crowd), seg, s.area * (W * H if item.normalised else 1)))
    mask = semantic_mask(anns, H, W, backend)
    if frame != up:
        mask = np.asarray(Image.fromarray(mask).transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[orient])))
    return mask, ""


def _settings(source: Source, src: Path, options: dict) -> dict:
    return {"version": MARKER_VERSION, "format": source.format, "source": os.path.abspath(src),
            "classes": source.classes, "options": options}


def _prepare_destination(dst: Path, settings: dict, overwrite: bool) -> bool:
    """True when resuming an earlier import of the same source; raises for another non-empty folder."""
    marker = dst / MARKER
    entries = [e for e in dst.iterdir() if e.name not in (MARKER, ".tokenseg.lock")] if dst.is_dir() else []
    if not entries:
        return False
    previous = None
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
    if previous is not None and {k: v for k, v in previous.items() if k != "complete"} == settings:
        return not overwrite
    if overwrite:
        return False
    why = (f"it holds an import of {previous.get('source')} ({previous.get('format')}) with other settings"
           if previous else f"it is not empty ({len(entries)} entries, e.g. {entries[0].name})")
    raise TokensegError(f"{dst}: {why}; choose an empty (or new) folder, or pass --overwrite to write over it")


def import_dataset(fmt: str, src: str | Path, dst: str | Path, *, classes: str | Path | Sequence[str] | None = None,
                   link: str = "hard", overwrite: bool = False, split: str = "", images: str | Path | None = None,
                   keep_empty: bool = False, rasterizer: str = "auto", workers: int = 2,
                   progress: bool = True) -> dict:
    """``tokenseg data import``: read ``src`` in format ``fmt`` and write the folder dataset ``dst``
    (see the module doc). Returns a summary dict (counts, splits, notes, problems)."""
    from ..coco import RASTERIZERS, have_pycocotools

    if fmt not in IMPORT_FORMATS:
        raise TokensegError(f"--from must be one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    if link not in LINK_MODES:
        raise TokensegError(f"--link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    if rasterizer not in RASTERIZERS:
        raise TokensegError(f"--rasterizer must be one of {', '.join(RASTERIZERS)}, got {rasterizer!r}")
    backend = ("pycocotools" if have_pycocotools() else "numpy") if rasterizer == "auto" else rasterizer
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise TokensegError(f"{src}: no such file or folder")
    names = list(classes) if isinstance(classes, (list, tuple)) else _class_file(classes)
    if fmt == "yolo":
        source = read_yolo(src, names)
    elif fmt == "coco":
        source = read_coco(src, names, split, images, keep_empty)
    else:
        source = read_labelme(src, names)
    src_root = src if src.is_dir() else src.parent
    refuse_inside_dataset(dst, [src_root, *source.image_dirs], "data import --out")
    for sub in (dst / "images", dst / "masks"):
        s_real, sub_real = Path(os.path.realpath(src_root)), Path(os.path.realpath(sub))
        if s_real == sub_real or sub_real in s_real.parents:
            raise TokensegError(f"data import --out {dst}: would write into the source {src} ({sub} holds it)")
    options = {"link": link, "split": split, "images": str(images or ""), "keep_empty": keep_empty,
               "rasterizer": backend}
    settings = _settings(source, src, options)

    problems = list(source.problems)
    items = [it for it in source.items if it.where]
    ok_items: list[Item] = []
    seen: dict[str, str] = {}
    for it in items:
        if display_name(it.id) != it.id:
            problems.append(f"{display_name(it.where)}: file name {display_name(it.id)!r} is not valid UTF-8: "
                            f"rename it")
        elif it.id in seen:
            problems.append(f"{display_name(it.image or it.where)}: same image id {it.id!r} as {seen[it.id]} "
                            f"(two files with one name and different extensions?): rename one")
        else:
            seen[it.id] = display_name(it.image or it.where)
            ok_items.append(it)
    with output_lock(dst, "tokenseg data import"):
        resume = _prepare_destination(dst, settings, overwrite)
        for sub in ("images", "masks"):  # what a killed import left half-written
            remove_stale_temps(dst / sub)
        write_json_atomic(dst / MARKER, {**settings, "complete": False})

        def out_paths(it: Item) -> tuple[Path, Path]:
            return (safe_output_path(dst / "images", it.id + it.ext), safe_output_path(dst / "masks", it.id + ".png"))

        def one(it: Item) -> tuple[str, str, bool]:
            img_out, mask_out = out_paths(it)
            want_mask = source.segmentation and it.has_mask
            if resume and img_out.exists() and (not want_mask or mask_out.is_file()):
                return "kept", "", want_mask
            try:
                if want_mask:
                    mask, problem = _item_mask(it, backend)
                    if problem:
                        return "failed", problem, False
                    save_palette_png(mask_out, mask)
                elif mask_out.is_file():
                    mask_out.unlink()  # --overwrite of an import that had a mask for this image
                if it.image_bytes is not None:
                    write_bytes_atomic(img_out, it.image_bytes)
                    how = "embedded"
                else:
                    how = _place_image(it.image, img_out, link)
            except TokensegError as exc:
                return "failed", str(exc), False
            except Exception as exc:  # a broken image or segmentation: reported, the rest goes on
                return "failed", f"{display_name(it.where)}: {type(exc).__name__}: {exc}", False
            return how, "", want_mask

        from ...core.progress import progress_bar

        counts: dict[str, int] = {}
        done: list[tuple[Item, bool]] = []
        bar = progress_bar(total=len(ok_items), desc="import", unit="img", disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for it, (how, problem, masked) in zip(ok_items, pool.map(one, ok_items)):
                bar.update(1)
                counts[how] = counts.get(how, 0) + 1
                if problem:
                    problems.append(problem)
                else:
                    done.append((it, masked))
        bar.close()

        splits = sorted({it.split for it, _ in done})
        use_split = bool(done) and "" not in splits
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "labels", "split"] if use_split else ["image", "labels"])
        for it, _ in done:
            cells = [it.id + it.ext, ";".join(source.classes[c] for c in sorted(it.classes))]
            w.writerow(cells + [it.split] if use_split else cells)
        write_text_atomic(dst / "classes.txt", "\n".join(source.classes) + "\n")
        write_text_atomic(dst / "labels.csv", buf.getvalue())
        ours = {out_paths(it)[k] for it, _ in done for k in (0, 1)}
        strays = [p for sub in ("images", "masks") if (dst / sub).is_dir()
                  for p in (dst / sub).rglob("*") if p.is_file() and p not in ours and not p.name.startswith(".")]
        write_json_atomic(dst / MARKER, {**settings, "complete": not problems})
    per_split = {s: sum(1 for it, _ in done if it.split == s) for s in splits} if use_split else {}
    return {"destination": str(dst), "format": source.format, "images": len(done),
            "masks": sum(1 for _, m in done if m), "classes": source.classes, "splits": per_split,
            "placed": counts, "resumed": resume, "notes": source.notes, "problems": problems,
            "strays": [str(p) for p in strays[:MAX_LISTED]], "stray_count": len(strays)}


def format_summary(s: dict) -> str:
    """What ``tokenseg data import`` prints."""
    dst = s["destination"]
    how = {"hard": "hard-linked", "copy": "copied", "symlink": "symlinked", "embedded": "from imageData",
           "kept": "already there", "failed": "failed"}
    placed = ", ".join(f"{v} {how.get(k, k)}" for k, v in sorted(s["placed"].items()))
    lines = [f"wrote {dst}: {s['images']} images ({placed or 'none'}), {s['masks']} masks, "
             f"{len(s['classes'])} classes ({', '.join(s['classes'][:12])}{' ...' if len(s['classes']) > 12 else ''})"
             + (" [resumed]" if s["resumed"] else "")]
    if s["splits"]:
        lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    lines += [f"note: {n}" for n in s["notes"]]
    if s["stray_count"]:
        lines.append(f"note: {s['stray_count']} file(s) under {dst}/images or masks are not from this import "
                     f"(left in place), e.g. {s['strays'][0]}")
    if s["problems"]:
        lines.append(f"{len(s['problems'])} image(s) left out:")
        lines += [f"  - {p}" for p in s["problems"][:MAX_LISTED]]
        if len(s["problems"]) > MAX_LISTED:
            lines.append(f"  ... and {len(s['problems']) - MAX_LISTED} more")
        lines.append("fix them and run the same command again: it resumes")
    sp = s["splits"]
    train = next((k for k in sp if k.lower().startswith("train")), None)
    val = next((k for k in sp if k.lower().startswith(("val", "valid", "test", "dev")) and k != train), None)
    split_args = (f"data.train_split={train} data.val_split={val or train}" if train else
                  "data.train_split=all data.val_split=all")
    root = shlex.quote(f"data.root={dst}")
    lines.append(f"next: tokenseg data check photos-scratch {root} {split_args}")
    lines.append(f"then: tokenseg run photos-scratch {root} {split_args}   (from scratch, minutes on a CPU; "
                 f"real seeds need ImageNet weights: preset photos, README \"Your own images\")")
    return display_name("\n".join(lines))
