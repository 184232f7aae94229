"""Pictures for people: heat-map overlays and a gallery (input, ground truth, maps, seed argmax)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .masks import voc_palette
from .files import write_bytes_atomic


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


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _font(size: int = 11):
    """Pillow's built-in font at ``size`` (a scalable one with FreeType, Pillow >= 10.1), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: the fixed 6x11 bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a word wider than that is
    broken between characters), so a column title is shown whole instead of cut."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = f"{cur} {word}" if cur else word
        if draw.textlength(cand, font=font) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = ""
        for ch in word:  # a single word too wide: break it
            if cur and draw.textlength(cur + ch, font=font) > width:
                lines.append(cur)
                cur = ""
            cur += ch
    if cur:
        lines.append(cur)
    return lines or [""]


def gallery(rows: list[list[np.ndarray]], titles: list[str], path: str | Path, cell: int = 128,
            captions: list[list[str]] | None = None, legend: list[tuple[str, tuple[int, int, int]]] | None = None,
            font_size: int = 11, colorbar: str = "", notes: Sequence[str] = ()) -> dict:
    """Write a grid of RGB tiles (one per title in every row) as a PNG.

    Column titles are word-wrapped to the column width (never cut); ``captions[i][j]`` is drawn under
    tile (i, j) (e.g. the class a heat map shows; "" for none); ``legend`` lists (name, colour) swatches
    drawn under the grid (the classes of the ground-truth and argmax columns); ``colorbar``: a label for
    the heat maps' colour scale, drawn as a 0..1 bar under the legend; ``notes``: lines of text at the
    bottom (e.g. how a row's class was chosen). Returns the layout
    (wrapped titles, caption and swatch boxes) for tests and callers that annotate further."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    asc, desc = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 2)
    line_h = asc + desc + 1
    pad, text_w = 4, cell - 4
    title_lines = [wrap_text(t, text_w, probe, font) for t in titles]
    head = pad + line_h * max((len(t) for t in title_lines), default=1) + pad
    cap_lines = [[wrap_text(c, text_w, probe, font) if c else [] for c in row] for row in (captions or [])]
    cap_h = [line_h * max((len(c) for c in row), default=0) + (2 if any(row) else 0) for row in cap_lines]
    cap_h += [0] * (len(rows) - len(cap_h))
    n_cols = len(titles)
    W = n_cols * (cell + pad) + pad
    items, legend_h = _legend_layout(legend or [], W, probe, font, line_h, pad)
    row_y = []
    y = head
    for i in range(len(rows)):
        row_y.append(y)
        y += cell + cap_h[i] + pad
    grid_bottom = y
    bar_h = (line_h * 2 + 2 * pad) if colorbar else 0
    note_lines = [ln for note in notes for ln in wrap_text(note, W - 2 * pad, probe, font)]
    H = grid_bottom + legend_h + bar_h + line_h * len(note_lines) + (pad if note_lines else 0)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(title_lines):
        for k, line in enumerate(lines):
            draw.text((pad + j * (cell + pad) + 2, pad + k * line_h), line, fill=(0, 0, 0), font=font)
    caption_boxes = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            im = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            x0 = pad + j * (cell + pad)
            canvas.paste(im, (x0, row_y[i]))
            if i < len(cap_lines) and j < len(cap_lines[i]) and cap_lines[i][j]:
                for k, line in enumerate(cap_lines[i][j]):
                    draw.text((x0 + 2, row_y[i] + cell + 1 + k * line_h), line, fill=(40, 40, 40), font=font)
                caption_boxes.append({"row": i, "col": j, "lines": cap_lines[i][j]})
    swatches = _draw_legend(draw, items, grid_bottom + pad, line_h, pad, font)
    bar_box = None
    y = grid_bottom + legend_h
    if colorbar:
        label_w = int(probe.textlength(colorbar, font=font)) + 2 * pad
        x0, x1 = pad + label_w, min(W - 3 * pad, pad + label_w + 3 * cell)
        draw.text((pad, y + pad), colorbar, fill=(0, 0, 0), font=font)
        ramp = heatmap(np.tile(np.linspace(0, 1, max(x1 - x0, 2))[None], (line_h - 2, 1)))
        canvas.paste(Image.fromarray(ramp), (x0, y + pad + 1))
        bar_box = (x0, y + pad + 1, x0 + ramp.shape[1], y + pad + line_h - 1)
        for v in (0.0, 0.5, 1.0):
            tx = x0 + v * (ramp.shape[1] - 1)
            text = f"{v:g}"
            draw.text((tx - probe.textlength(text, font=font) / 2, y + pad + line_h), text, fill=(0, 0, 0), font=font)
        y += bar_h
    for k, line in enumerate(note_lines):
        draw.text((pad, y + k * line_h), line, fill=(40, 40, 40), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return {"size": (W, H), "cell": cell, "title_lines": title_lines, "captions": caption_boxes,
            "legend": swatches, "text_width": text_w, "colorbar": bar_box, "notes": note_lines}


def _legend_layout(legend, width: int, probe, font, line_h: int, pad: int) -> tuple[list, int]:
    """Swatch positions (name, colour, x, y) flowing left to right after a "colours:" label, wrapping at
    ``width``; and the height they take."""
    if not legend:
        return [], 0
    sw = max(8, line_h - 3)
    first = pad + probe.textlength("colours:", font=font) + 2 * pad
    x, y, items = first, 0, []
    for name, rgb in legend:
        w_item = sw + 3 + probe.textlength(name, font=font) + 2 * pad
        if x + w_item > width - pad and x > first:
            x, y = first, y + line_h + 2
        items.append((name, tuple(int(v) for v in rgb), int(x), y))
        x += w_item
    return items, y + line_h + 2 * pad


def _draw_legend(draw, items: list, top: int, line_h: int, pad: int, font) -> list[dict]:
    swatches = []
    if not items:
        return swatches
    sw = max(8, line_h - 3)
    draw.text((pad, top), "colours:", fill=(0, 0, 0), font=font)
    for name, rgb, x, yy in items:
        box = (x, top + yy + 1, x + sw, top + yy + 1 + sw)
        draw.rectangle(box, fill=rgb, outline=(0, 0, 0))
        draw.text((x + sw + 3, top + yy), name, fill=(0, 0, 0), font=font)
        swatches.append({"name": name, "colour": rgb, "box": box})
    return swatches


def with_legend(image: np.ndarray, legend: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """``image`` with a white band under it naming each colour of a mask overlay (swatch + class name),
    the text sized to the image (readable on a 4000-px photo as on a 300-px one)."""
    H, W = image.shape[:2]
    font = _font(max(11, round(max(W, H) / 60)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    asc, desc = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_h, pad = asc + desc + 1, max(4, (asc + desc) // 3)
    items, band = _legend_layout(legend, W, probe, font, line_h, pad)
    canvas = Image.new("RGB", (W, H + band), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)), (0, 0))
    _draw_legend(ImageDraw.Draw(canvas), items, H + pad, line_h, pad, font)
    return np.asarray(canvas)


def class_legend(values, class_names: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of mask values (0 background, c + 1 class c, 255 ignore) in the palette of
    :func:`colour_mask`, in value order."""
    pal = voc_palette()
    pal[255] = (224, 224, 192)
    out = []
    for v in sorted({int(v) for v in values}):
        name = "background" if v == 0 else "ignore" if v == 255 else (
            class_names[v - 1] if v - 1 < len(class_names) else str(v))
        out.append((name, tuple(int(c) for c in pal[v])))
    return out
