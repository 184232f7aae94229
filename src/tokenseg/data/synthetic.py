"""The built-in synthetic WSSS dataset, written to disk in the PASCAL VOC layout.

Each of the K object classes has its own shape *and* texture (colours are random per object, so
colour alone says nothing). Images hold 1–3 classes with one or two instances each, drawn in random
order (later objects occlude earlier ones), over one of K background kinds with distractor clutter;
``object_scale`` multiplies the objects' radius (1.0: the original sizes). Class ``k`` sits on its
"home" background kind with probability ``cooccurrence``: a classifier can partly solve the task by
looking at the background, which is the co-occurrence bias that makes class localisation a real
problem in WSSS. Everything is deterministic from ``SyntheticConfig.seed``.

The folder has ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs), ``ImageSets/Segmentation/
{train,val}.txt``, ``labels.json`` (image-level labels) and ``class_names.txt``, and is read back
through the same VOC reader real datasets use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from ..core.progress import progress_bar as tqdm

from ..config import SyntheticConfig
from ..core.errors import TokensegError
from ..core.masks import save_palette_png
from ..core.files import write_json_atomic

CLASS_NAMES = ["disc", "block", "wedge", "cross", "ring", "diamond", "star", "bar"]
STAMP = "tokenseg_synthetic.json"
GENERATOR_VERSION = 1


def _stamp(cfg: SyntheticConfig) -> dict:
    """The parameters a dataset folder is named after and checked against. ``object_scale`` is left out
    at its default 1.0, so datasets made before the knob existed keep their folder and stamp."""
    params = asdict(cfg)
    if params.get("object_scale") == 1.0:
        del params["object_scale"]
    return {"generator_version": GENERATOR_VERSION, **params}


def default_root(cfg: SyntheticConfig, cache: Path) -> Path:
    digest = hashlib.sha1(json.dumps(_stamp(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"synthetic-{digest}"


def ensure_synthetic(cfg: SyntheticConfig, cache_or_root: Path, exact: bool = False,
                     progress: bool = True) -> Path:
    """Generate the dataset once (into a temp folder, renamed when complete) and return its root.

    ``exact``: ``cache_or_root`` is the dataset root itself, otherwise a cache folder that gets a
    sub-folder named after the parameters' hash."""
    root = Path(cache_or_root) if exact else default_root(cfg, Path(cache_or_root))
    stamp_path = root / STAMP
    if stamp_path.is_file():
        if json.loads(stamp_path.read_text()) != _stamp(cfg):
            raise TokensegError(f"{root}: holds a synthetic dataset made with other parameters")
        return root
    if root.exists() and any(root.iterdir()):
        raise TokensegError(f"{root}: exists and is not a tokenseg synthetic dataset")
    if not 1 <= cfg.num_classes <= len(CLASS_NAMES):
        raise TokensegError(f"data.synthetic.num_classes must be in 1..{len(CLASS_NAMES)}")
    if cfg.image_size < 32:
        raise TokensegError("data.synthetic.image_size must be at least 32")
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.{os.getpid()}.", dir=root.parent))
    try:
        _write_dataset(cfg, tmp, progress)
        write_json_atomic(tmp / STAMP, _stamp(cfg))
        try:
            os.replace(tmp, root)  # also replaces an empty folder
        except OSError:
            if not stamp_path.is_file():  # not another process (a DDP rank) finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


_BUILD_RE = re.compile(r"^\.synthetic-[0-9a-f]{10}\.(?:(\d+)\.)?[A-Za-z0-9_]{8}$")


def remove_stale_builds(cache: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Delete the half-built ``.synthetic-<hash>.<pid>.XXXXXXXX`` folders of generations that were killed
    (their process has ended; folders of the older form without a PID once a day old). Only those folders,
    only in ``cache``."""
    from ..core.locks import pid_alive

    removed = []
    with contextlib.suppress(OSError):
        for e in os.scandir(cache):
            m = _BUILD_RE.match(e.name)
            if not m or not e.is_dir(follow_symlinks=False):
                continue
            pid = m.group(1)
            dead = (not pid_alive(int(pid))) if pid else time.time() - e.stat().st_mtime > max_age_s
            if dead:
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
    return removed


def _write_dataset(cfg: SyntheticConfig, root: Path, progress: bool) -> None:
    names = CLASS_NAMES[: cfg.num_classes]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[str]] = {}
    splits = {"train": cfg.train_images, "val": cfg.val_images}
    total = sum(splits.values())
    bar = tqdm(total=total, desc="synthetic dataset", unit="img", disable=not progress, leave=False)
    n = 0
    for split, count in splits.items():
        ids = []
        for i in range(count):
            image_id = f"{split}_{i:05d}"
            rng = np.random.default_rng([cfg.seed, n])
            img, mask, _ = render_image(rng, cfg)
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
            save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
            present = sorted(set(np.unique(mask).tolist()) - {0, 255})
            labels[image_id] = [names[c - 1] for c in present]
            ids.append(image_id)
            n += 1
            bar.update()
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    bar.close()
    write_json_atomic(root / "labels.json", {"classes": names, "source": "synthetic-masks", "labels": labels})
    (root / "class_names.txt").write_text("\n".join(names) + "\n")


# ---------------------------------------------------------------------------------- rendering
def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Boolean mask of shape ``kind`` centred at 0 with radius ``r`` (coords already centred)."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * xx + s * yy) / r, (-s * xx + c * yy) / r
    if kind == 0:  # disc / ellipse
        return u ** 2 + (v * 1.25) ** 2 <= 1.0
    if kind == 1:  # block
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if kind == 2:  # wedge (triangle)
        return (v <= 0.7) & (v >= 1.8 * np.abs(u) - 0.9)
    if kind == 3:  # cross
        return ((np.abs(u) <= 0.28) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.28) & (np.abs(u) <= 0.95))
    if kind == 4:  # ring
        rr = u ** 2 + v ** 2
        return (rr <= 1.0) & (rr >= 0.36)
    if kind == 5:  # diamond
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == 6:  # star: radius modulated by angle
        th = np.arctan2(v, u)
        return np.hypot(u, v) <= 0.55 + 0.4 * np.cos(5 * th)
    # bar: long thin rectangle
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3)


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Texture pattern in [0, 1] for class ``kind``."""
    w = 2 * np.pi / period
    if kind == 0:  # horizontal stripes
        return (np.sin(w * yy + phase) > 0).astype(np.float32)
    if kind == 1:  # checkerboard
        return ((np.floor(xx / (period / 2) + phase) + np.floor(yy / (period / 2))) % 2).astype(np.float32)
    if kind == 2:  # dots
        fx = np.mod(xx + phase * period, period) - period / 2
        fy = np.mod(yy, period) - period / 2
        return (fx ** 2 + fy ** 2 <= (period * 0.3) ** 2).astype(np.float32)
    if kind == 3:  # diagonal stripes
        return (np.sin(w * (xx + yy) * 0.7071 + phase) > 0).astype(np.float32)
    if kind == 4:  # concentric rings
        return (np.sin(w * np.hypot(xx, yy) + phase) > 0).astype(np.float32)
    if kind == 5:  # vertical stripes
        return (np.sin(w * xx + phase) > 0).astype(np.float32)
    if kind == 6:  # cross-hatch
        return ((np.sin(w * xx + phase) > 0.6) | (np.sin(w * yy) > 0.6)).astype(np.float32)
    return (np.sin(w * (xx - yy) * 0.7071 + phase) > 0).astype(np.float32)  # anti-diagonal


def _background(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 215, size=3)
    other = rng.uniform(40, 215, size=3)
    k = kind % 5
    if k == 0:  # smooth linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif k == 1:  # blotches: upsampled coarse noise
        coarse = rng.uniform(0, 1, size=(5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255
    elif k == 2:  # fine grid lines
        p = rng.uniform(0.06, 0.1)
        t = ((np.mod(xx, p) < p * 0.18) | (np.mod(yy, p) < p * 0.18)).astype(np.float32) * 0.6
    elif k == 3:  # broad waves
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(1, 2.5) + np.sin(2 * np.pi * yy) * 0.3))
    else:  # speckle
        t = rng.uniform(0, 1, size=(size, size)).astype(np.float32) * 0.5
    return base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]


def render_image(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """One (H, W, 3) uint8 image, its (H, W) uint8 mask (0 background, k+1 class k, 255 ignore) and
    what was drawn ({"background": kind, "classes": [...]}, the first class decides the home kind)."""
    K, S = cfg.num_classes, cfg.image_size
    n_cls = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])) if K >= 3 else int(rng.integers(1, K + 1))
    classes = rng.choice(K, size=min(n_cls, K), replace=False)
    home = int(classes[0]) if rng.random() < cfg.cooccurrence else int(rng.integers(0, K))
    img = _background(home, rng, S)
    mask = np.zeros((S, S), dtype=np.uint8)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)

    # distractor clutter: untextured blobs and lines that belong to the background
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, S, 2)
        colour = rng.uniform(0, 255, 3)
        if rng.random() < 0.5:
            r = rng.uniform(0.03, 0.07) * S
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            a = rng.uniform(0, np.pi)
            d = np.abs(np.cos(a) * (yy - cy) - np.sin(a) * (xx - cx))
            along = np.abs(np.sin(a) * (yy - cy) + np.cos(a) * (xx - cx))
            blob = (d <= 0.012 * S + 0.5) & (along <= rng.uniform(0.1, 0.3) * S)
        img[blob] = colour

    objects = [int(c) for c in classes for _ in range(int(rng.integers(1, 3)))]
    rng.shuffle(objects)
    for c in objects:
        r = rng.uniform(0.11, 0.22) * S * cfg.object_scale  # × 1.0 leaves the radius bit for bit
        cy, cx = rng.uniform(0.1 * S, 0.9 * S, 2)
        shape = _shape_mask(c, yy - cy, xx - cx, r, rng.uniform(0, 2 * np.pi))
        tex = _texture(c, yy - cy, xx - cx, period=rng.uniform(0.055, 0.075) * S, phase=rng.uniform(0, 2 * np.pi))
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.abs(c1 - c2).sum() < 150:
            c2 = rng.uniform(0, 255, 3)
        colour = c1[None, None] * tex[..., None] + c2[None, None] * (1 - tex[..., None])
        img[shape] = colour[shape]
        mask[shape] = c + 1
    # classes smaller than a few pixels after occlusion are dropped from the mask (and the labels)
    for c in range(1, K + 1):
        if 0 < (mask == c).sum() < 0.004 * S * S:
            mask[mask == c] = 255  # a sliver left by occlusion: ignored, and not an image-level label
    img = img + rng.normal(0, 6, img.shape)
    info = {"background": home, "classes": [int(c) for c in classes]}
    return np.clip(img, 0, 255).astype(np.uint8), mask, info
