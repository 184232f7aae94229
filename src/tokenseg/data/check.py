"""``tokenseg data check``: what a user reads before spending a GPU-day on a dataset.

Per split: image count, images per class, images without a foreground class, masks found and where,
image sizes and modes, EXIF rotations, images with transparency (composited on the ImageNet mean
grey), images smaller than one patch or so large that maps will be slow and huge; and every problem:
missing or unreadable images, labels without images (and the folder they were looked for in), images
without labels, unreadable masks, mask values above the class count, masks whose size differs from
their image. Nothing is written into the dataset.
"""
from __future__ import annotations

import copy
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Config, DataConfig
from ..core.masks import IGNORE_INDEX, read_mask
from ..core.errors import TokensegError
from ..core.files import display_name
from .base import TRANSPARENT_FILL, WSSSDataset
from .scan import UnusableSplit, collecting, scan_cache_file, scan_images

LIST_LIMIT = 50  # longest list of ids/files kept per kind in the report
# [I] Above these, one image's maps (C x H x W floats per kind, attention over (H/p)(W/p) tokens) take
# minutes and GBs: 4096 px is twice a 12 MP photo's longer side, 16 MP a little more than such a photo.
LARGE_SIDE = 4096
LARGE_PIXELS = 16_000_000


def patch_size_of(backbone: str, default: int = 16) -> int:
    m = re.search(r"patch(\d+)", backbone or "")
    return int(m.group(1)) if m else default


def default_splits(cfg: Config | DataConfig) -> list[str]:
    """The splits a pipeline run reads: train, val, and the maps/eval split."""
    data = cfg.data if isinstance(cfg, Config) else cfg
    out = [data.train_split, data.val_split]
    if isinstance(cfg, Config):
        out += [cfg.maps.split, cfg.eval.split]
    return list(dict.fromkeys(s for s in out if s))


def split_sources(cfg: Config | DataConfig) -> dict[str, str]:
    """``{split: "config key data.train_split, maps.split"}``: which settings read each default split."""
    keys = {"data.train_split": (cfg.data if isinstance(cfg, Config) else cfg).train_split,
            "data.val_split": (cfg.data if isinstance(cfg, Config) else cfg).val_split}
    if isinstance(cfg, Config):
        keys.update({"maps.split": cfg.maps.split, "eval.split": cfg.eval.split})
    out: dict[str, list[str]] = {}
    for key, split in keys.items():
        out.setdefault(split, []).append(key)
    return {s: "config key " + ", ".join(k) for s, k in out.items() if s}


def _check_mask(path: str, num_classes: int, size: tuple[int, int] | None) -> str:
    try:
        mask = read_mask(path)
    except TokensegError as exc:
        return str(exc)
    vals = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = vals[(vals != IGNORE_INDEX) & (vals > num_classes)]
    if len(bad):
        return (f"{path}: mask values {bad.tolist()[:8]} exceed the class count {num_classes} "
                f"(allowed: 0 background, 1..{num_classes}, 255 ignore)")
    if size is not None and size[0] and (mask.shape[1], mask.shape[0]) != size:
        return f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}"
    return ""


def check_split(data: DataConfig, split: str, *, decode: bool = True, workers: int = 2,
                patch_size: int = 16, progress: bool = False, mask_cache: dict | None = None,
                chosen_by: str = "") -> dict:
    from .build import build_dataset, cache_root

    rep: dict = {"split": split, "loaded": False, "error": "", "images": 0, "problems": []}
    dcfg = copy.deepcopy(data)
    dcfg.skip_bad = True  # collect every problem instead of stopping at the first
    try:
        with collecting():
            ds = build_dataset(dcfg, split, chosen_by)
    except UnusableSplit as exc:  # keep its problems: every label may lack its image
        rep["error"] = str(exc)
        rep["problems"] = exc.problems
        rep["image_dir"] = exc.image_dir
        return rep
    except TokensegError as exc:
        rep["error"] = str(exc)
        return rep
    rep["loaded"] = True
    rep["name"] = ds.name
    rep["label_source"] = ds.label_source
    rep["class_names"] = list(ds.class_names)
    rep["problems"] = list(ds.meta.get("skipped", []))
    rep["images"] = len(ds)
    rep["listed"] = len(ds) + len({p["id"] for p in rep["problems"]})
    counts = np.zeros(ds.num_classes, dtype=np.int64)
    for lab in ds.labels:
        counts[lab] += 1
    rep["per_class"] = {n: int(c) for n, c in zip(ds.class_names, counts)}
    nofg = [i for i, lab in zip(ds.ids, ds.labels) if not lab]
    rep["no_foreground"] = len(nofg)
    rep["no_foreground_ids"] = nofg[:LIST_LIMIT]
    hist = np.bincount([len(lab) for lab in ds.labels], minlength=1)
    rep["classes_per_image"] = {str(k): int(v) for k, v in enumerate(hist) if v}
    unl = ds.meta.get("unlabelled_images", [])
    rep["unlabelled_images"] = len(unl)
    rep["unlabelled_image_ids"] = list(unl[:LIST_LIMIT])

    # images
    image_dir = ds.meta.get("image_dir") or str(Path(ds.image_paths[0]).parent)
    rep["image_dir"] = str(image_dir)
    cache_file = scan_cache_file(cache_root(data), image_dir) if decode else None
    infos = scan_images(ds.image_paths, decode=decode, workers=workers, cache_file=cache_file, progress=progress)
    rep["unreadable_images"] = [{"id": i, "file": str(p), "error": info["error"]}
                                for i, p, info in zip(ds.ids, ds.image_paths, infos) if info["error"]]
    ok = [(i, info) for i, info in zip(ds.ids, infos) if not info["error"]]
    rep["usable"] = len(ok)
    if ok:
        w = np.array([info["width"] for _, info in ok])
        h = np.array([info["height"] for _, info in ok])
        side = np.minimum(w, h)
        rep["image_sizes"] = {
            "min_side": int(side.min()), "max_side": int(np.maximum(w, h).max()),
            "median_width": int(np.median(w)), "median_height": int(np.median(h)),
            "smallest": [int(w[side.argmin()]), int(h[side.argmin()])], "largest_area": [
                int(w[(w * h).argmax()]), int(h[(w * h).argmax()])]}
        modes: dict[str, int] = {}
        for _, info in ok:
            modes[info["mode"]] = modes.get(info["mode"], 0) + 1
        rep["modes"] = dict(sorted(modes.items(), key=lambda kv: -kv[1]))
        rep["exif_rotated"] = sum(1 for _, info in ok if info["orientation"] not in (0, 1))
        small = [{"id": i, "width": info["width"], "height": info["height"]}
                 for i, info in ok if min(info["width"], info["height"]) < patch_size]
        rep["small_images"] = small[:LIST_LIMIT]
        rep["small_image_count"] = len(small)
        large = [{"id": i, "width": info["width"], "height": info["height"]} for i, info in ok
                 if max(info["width"], info["height"]) > LARGE_SIDE or info["width"] * info["height"] > LARGE_PIXELS]
        rep["large_images"] = large[:LIST_LIMIT]
        rep["large_image_count"] = len(large)
        transparent = [i for i, info in ok if info.get("alpha") == "transparent"]
        rep["transparent_images"] = transparent[:LIST_LIMIT]
        rep["transparent_image_count"] = len(transparent)
        rep["alpha_unknown_count"] = sum(1 for _, info in ok if info.get("alpha") == "unknown")
    rep["patch_size"] = patch_size
    rep["decoded"] = decode

    # masks
    sizes = {str(p): (info["width"], info["height"]) if not info["error"] else None
             for p, info in zip(ds.image_paths, infos)}
    # a reader that composes its masks (OpenImages: instance masks resized to the image) checks their size
    # itself; comparing its first instance mask file with the image would report a false mismatch
    own_masks = type(ds).load_mask is not WSSSDataset.load_mask
    masks = [(i, str(m), None if own_masks else sizes.get(str(p)))
             for i, m, p in zip(ds.ids, ds.mask_paths or [None] * len(ds), ds.image_paths) if m is not None]
    rep["with_mask"] = len(masks)
    rep["without_mask"] = len(ds) - len(masks)
    dirs: dict[str, int] = {}
    for _, m, _s in masks:
        d = Path(m).parent.name
        dirs[d] = dirs.get(d, 0) + 1
    rep["mask_dirs"] = dirs
    if masks:
        seen = {} if mask_cache is None else mask_cache  # splits overlap (VOC train is in train_aug)
        todo = [t for t in masks if (t[1], ds.num_classes, t[2]) not in seen]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for t, e in zip(todo, pool.map(lambda t: _check_mask(t[1], ds.num_classes, t[2]), todo, chunksize=32)):
                seen[(t[1], ds.num_classes, t[2])] = e
        errs = [seen[(t[1], ds.num_classes, t[2])] for t in masks]
        rep["mask_problems"] = [{"id": i, "file": m, "problem": e} for (i, m, _s), e in zip(masks, errs) if e]
    else:
        rep["mask_problems"] = []
    return rep


def check_dataset(cfg: Config | DataConfig, splits: Sequence[str] | None = None, *, decode: bool = True,
                  skip_bad: bool | None = None, workers: int | None = None, progress: bool = False) -> dict:
    """Check every split a run will read (or ``splits``); returns a JSON-able report with
    ``errors``/``warnings`` lists and ``ok`` (no errors). With ``skip_bad`` (default: ``data.skip_bad``)
    missing/unreadable images are warnings: a run will skip them."""
    data = cfg.data if isinstance(cfg, Config) else cfg
    patch = 16
    if isinstance(cfg, Config):
        patch = int(cfg.model.backbone_kwargs.get("patch_size") or patch_size_of(cfg.model.backbone))
    skip = data.skip_bad if skip_bad is None else skip_bad
    nworkers = workers or max(1, data.num_workers)
    given = bool(splits)
    splits = list(splits) if splits else default_splits(cfg)
    report: dict = {"format": data.format, "root": data.root, "splits": {}, "skip_bad": skip}
    # message -> splits it was seen in (VOC train is inside train_aug: report each file once)
    errors: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    skippable: set[str] = set()

    def note(where: dict, split: str, msg: str) -> None:
        where.setdefault(msg, [])
        if split not in where[msg]:
            where[msg].append(split)

    mask_cache: dict = {}
    sources = {} if given else split_sources(cfg)
    for split in splits:
        rep = check_split(data, split, decode=decode, workers=nworkers, patch_size=patch, progress=progress,
                          mask_cache=mask_cache, chosen_by=sources.get(split, "--split"))
        report["splits"][split] = rep
        if rep["error"]:
            note(errors, split, rep["error"])
            continue
        report.setdefault("class_names", rep["class_names"])
        per_image = [_describe(p) for p in rep["problems"]]
        per_image += [f"{u['file']}: {u['error']}" for u in rep["unreadable_images"]]
        for msg in per_image:
            note(warnings if skip else errors, split, msg)
            if not skip:
                skippable.add(msg)
        for m in rep["mask_problems"]:
            note(errors, split, m["problem"])
        if rep.get("large_image_count"):
            shown = ", ".join(f"{d['id']!r} ({d['width']}x{d['height']})" for d in rep["large_images"][:5])
            note(warnings, split, f"{rep['large_image_count']} image(s) larger than {LARGE_SIDE} px on a side or "
                                  f"{LARGE_PIXELS // 1_000_000} MP: maps will be slow and huge on them (minutes and "
                                  f"GBs per image); shrink them or cap the map size (maps.max_side): {shown}"
                                  f"{' ...' if rep['large_image_count'] > 5 else ''}")
        if rep.get("transparent_image_count"):
            shown = ", ".join(repr(i) for i in rep["transparent_images"][:5])
            note(warnings, split, f"{rep['transparent_image_count']} image(s) have transparent pixels: they are "
                                  f"composited on the ImageNet mean grey {TRANSPARENT_FILL}, e.g. {shown}"
                                  f"{' ...' if rep['transparent_image_count'] > 5 else ''}")
        if rep.get("small_image_count"):
            note(warnings, split, f"{rep['small_image_count']} image(s) smaller than one {patch}-pixel patch "
                                  f"(they are upsampled), e.g. {rep['small_images'][0]['id']!r}")
        empty = [n for n, c in rep["per_class"].items() if c == 0]
        if empty and split == data.train_split:
            note(warnings, split, f"no image of class(es) {', '.join(empty[:10])}"
                                  f"{' ...' if len(empty) > 10 else ''}")
        if rep["unlabelled_images"]:
            note(warnings, split, f"{rep['unlabelled_images']} image(s) in the folder have no labels and are "
                                  f"left out, e.g. {rep['unlabelled_image_ids'][0]!r}")

    def flat(d: dict[str, list[str]]) -> list[str]:
        return [f"split {', '.join(repr(s) for s in sp)}: {msg}" for msg, sp in d.items()]

    missing = sorted({p["id"] for r in report["splits"].values() for p in r.get("problems", [])
                      if p["kind"] == "missing_image"})
    nolab = sorted({p["id"] for r in report["splits"].values() for p in r.get("problems", [])
                    if p["kind"] == "no_labels"})
    nolab_images = sorted({i for r in report["splits"].values() for i in r.get("unlabelled_image_ids", [])})
    report["labels_without_images"] = missing
    report["image_dirs"] = sorted({r["image_dir"] for r in report["splits"].values() if r.get("image_dir")})
    report["images_without_labels"] = sorted(set(nolab) | set(nolab_images))
    report["errors"] = flat(errors)
    report["skippable_errors"] = len(skippable)
    report["warnings"] = flat(warnings)
    report["ok"] = not errors
    return report


def _describe(p: dict) -> str:
    return f"{p['file']}: {p['problem']}" if p.get("file") else f"image {p['id']!r}: {p['problem']}"


def _wrap(items: list[str], width: int = 96, indent: str = "    ") -> str:
    lines, cur = [], indent
    for it in items:
        if len(cur) + len(it) + 2 > width and cur.strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += it + "  "
    if cur.strip():
        lines.append(cur.rstrip())
    return "\n".join(lines)


def format_report(report: dict, max_items: int = 20) -> str:
    """The report as text for a terminal."""
    out = [f"tokenseg data check: {report['format']} dataset at {report['root'] or '(synthetic cache)'}"]
    names = report.get("class_names")
    if names:
        out.append(f"{len(names)} classes: {', '.join(names[:40])}{' ...' if len(names) > 40 else ''}")
    for split, r in report["splits"].items():
        out.append("")
        if r["error"]:
            out.append(f"split {split}: CANNOT READ")
            out.append(f"  {r['error']}")
            continue
        usable = r.get("usable", r["images"])
        count = f"{usable} images" if usable == r["listed"] else f"{r['listed']} images listed, {usable} usable"
        out.append(f"split {split}: {count}; labels from {r['label_source']}")
        out.append(f"  images per class (min {min(r['per_class'].values())}, max {max(r['per_class'].values())}):")
        out.append(_wrap([f"{n} {c}" for n, c in r["per_class"].items()]))
        cpi = ", ".join(f"{k}: {v}" for k, v in r["classes_per_image"].items())
        out.append(f"  foreground classes per image: {cpi}; images with no foreground label: {r['no_foreground']}")
        if r.get("image_sizes"):
            s = r["image_sizes"]
            out.append(f"  image sizes: median {s['median_width']}x{s['median_height']}, shortest side "
                       f"{s['min_side']}, longest side {s['max_side']}; smaller than a {r['patch_size']}-px patch: "
                       f"{r.get('small_image_count', 0)}")
            out.append(f"  larger than {LARGE_SIDE} px or {LARGE_PIXELS // 1_000_000} MP: {r.get('large_image_count', 0)}")
            modes = ", ".join(f"{k} {v}" for k, v in r["modes"].items())
            transp = (f"with transparency: {r.get('transparent_image_count', 0)}" if r["decoded"] else
                      f"with an alpha channel: {r.get('alpha_unknown_count', 0)}")
            out.append(f"  modes: {modes}; EXIF-rotated: {r['exif_rotated']}; {transp} (composited on grey "
                       f"{TRANSPARENT_FILL}){'' if r['decoded'] else ' (headers only: --fast)'}")
        md = ", ".join(f"{k} {v}" for k, v in r["mask_dirs"].items()) or "none"
        out.append(f"  masks: {r['with_mask']} ({md}); without mask: {r['without_mask']}")
        nprob = len(r["problems"]) + len(r["unreadable_images"]) + len(r["mask_problems"])
        out.append(f"  problems: {nprob or 'none'}")
    out.append("")
    lwi = report["labels_without_images"]
    looked = "; ".join(report.get("image_dirs", []))
    out.append(f"labels without images: {len(lwi)}"
               + (f" (looked in {looked}; e.g. {', '.join(lwi[:5])})" if lwi and looked else
                  f" (e.g. {', '.join(lwi[:5])})" if lwi else ""))
    out.append(f"images without labels: {len(report['images_without_labels'])}"
               + (f" (e.g. {', '.join(report['images_without_labels'][:5])})" if report["images_without_labels"] else ""))
    for title, items in (("ERRORS", report["errors"]), ("WARNINGS", report["warnings"])):
        if items:
            out.append("")
            out.append(f"{title} ({len(items)}):")
            out += [f"  - {it}" for it in items[:max_items]]
            if len(items) > max_items:
                out.append(f"  ... and {len(items) - max_items} more (use --json FILE for the full list)")
    out.append("")
    if report["ok"]:
        out.append(f"RESULT: OK ({len(report['warnings'])} warning(s))")
    else:
        n = report.get("skippable_errors", 0)
        out.append(f"RESULT: {len(report['errors'])} error(s) to fix before training"
                   + (f"; --skip-bad (data.skip_bad=true) would skip the {n} bad or missing image(s) among them"
                      if n else ""))
    return display_name("\n".join(out))  # file names that are not UTF-8 shown as \xNN, not a crash
