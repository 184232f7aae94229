"""Pictures for people: heat-map overlays and a gallery (input, ground truth, maps, seed argmax)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import voc_palette, write_bytes_atomic


def heatmap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> (H, W, 3) uint8 'jet'-like colours (blue = 0, red = 1)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image.astype(np.float32) * (1 - alpha) + heatmap(values).astype(np.float32) * alpha).astype(np.uint8)


def colour_mask(mask: np.ndarray) -> np.ndarray:
    pal = voc_palette()
    pal[255] = (224, 224, 192)
    return pal[np.asarray(mask, dtype=np.uint8)]


def seed_argmax(dense_maps: np.ndarray, threshold: float) -> np.ndarray:
    """Label map argmax([t, maps...]) from (C, H, W) maps and a background threshold."""
    scores = np.concatenate([np.full((1,) + dense_maps.shape[1:], threshold, np.float32), dense_maps], 0)
    return scores.argmax(0).astype(np.uint8)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def gallery(rows: list[list[np.ndarray]], titles: list[str], path: str | Path, cell: int = 128) -> None:
    """Write a grid of RGB tiles (every row has one tile per title) with a title strip on top."""
    n_cols = len(titles)
    pad, head = 2, 14
    W = n_cols * (cell + pad) + pad
    H = head + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles):
        draw.text((pad + j * (cell + pad) + 2, 1), t[: cell // 6], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            im = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            canvas.paste(im, (pad + j * (cell + pad), head + pad + i * (cell + pad)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
