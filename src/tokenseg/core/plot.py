"""Small line charts as PNG with PIL only (PR curves, threshold sweeps).

[I] Hand-drawn with PIL instead of matplotlib: matplotlib is not a dependency of tokenseg and a
chart with axes, ticks, labels and a legend is a few dozen lines.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from .errors import TokensegError
from .files import write_bytes_atomic

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
AXIS = (0, 0, 0)
GRID = (225, 225, 225)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About ``target`` round tick values (steps 1, 2, 2.5 or 5 × 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw - 1e-12 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _fmt(v: float, step: float) -> str:
    s = f"{step:.10g}"
    digits = len(s.split(".")[1]) if "." in s and "e" not in s else 0
    return f"{v:.{digits}f}"


def _limits(values: list[float], given: tuple[float, float] | None) -> tuple[float, float]:
    if given is not None:
        lo, hi = float(given[0]), float(given[1])
    else:
        finite = [v for v in values if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


MARKERS = ("circle", "square", "triangle", "diamond", "down", "cross")


def _marker(d: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colour) -> None:
    """A filled marker of ``shape`` centred on (x, y), white-edged so overlapping ones stay apart."""
    edge = (255, 255, 255)
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=edge)
    elif shape == "square":
        d.rectangle([x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85], fill=colour, outline=edge)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=colour, outline=edge)
    elif shape == "down":
        d.polygon([(x, y + r), (x + r, y - r * 0.8), (x - r, y - r * 0.8)], fill=colour, outline=edge)
    elif shape == "diamond":
        d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour, outline=edge)
    else:
        d.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3)
        d.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3)


def _dashed(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour, dash: int) -> None:
    """A polyline, solid (``dash`` 0) or dashed with ``dash``-pixel strokes."""
    if not dash:
        d.line(pts, fill=colour, width=2, joint="curve")
        return
    on, left = True, float(dash)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        seg = math.hypot(xb - xa, yb - ya)
        t = 0.0
        while t < seg:
            step = min(left, seg - t)
            if on:
                f0, f1 = t / seg, (t + step) / seg
                d.line([(xa + (xb - xa) * f0, ya + (yb - ya) * f0), (xa + (xb - xa) * f1, ya + (yb - ya) * f1)],
                       fill=colour, width=2)
            t += step
            left -= step
            if left <= 1e-9:
                on, left = not on, float(dash if not on else dash * 0.6)


def _legend_box(series, px, py, box, lw: float, lh: float) -> tuple[float, float, float, float]:
    """The legend's corner of the plot area that covers the fewest drawn points (line samples
    included); top right [I] on a tie: PR and sweep curves rarely pass there."""
    left, top, right, bottom = box
    pts = []
    for xs, ys in series.values():
        xy = [(px(float(x)), py(float(y))) for x, y in zip(xs, ys) if math.isfinite(float(x)) and math.isfinite(float(y))]
        for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
            pts += [(xa + (xb - xa) * t / 20, ya + (yb - ya) * t / 20) for t in range(20)]
        pts += xy
    corners = [(right - 8 - lw, top + 8), (left + 8, top + 8), (right - 8 - lw, bottom - 8 - lh),
               (left + 8, bottom - 8 - lh)]

    def covered(c) -> int:
        return sum(c[0] - 8 <= x <= c[0] + lw + 8 and c[1] - 8 <= y <= c[1] + lh + 8 for x, y in pts)

    x0, y0 = min(corners, key=covered)  # min keeps the first (top right) on a tie
    return x0, y0, x0 + lw, y0 + lh


def line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = "",
              ylabel: str = "", title: str = "", *, size: tuple[int, int] = (640, 480),
              xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
              markers: bool = False, errors: Mapping[str, Sequence[float]] | None = None,
              xticks: Sequence[float] | None = None, margin: float = 0.0, lines: bool = True) -> dict:
    """Write a line chart of ``series`` ({legend name: (xs, ys)}) to ``path`` (PNG, atomically).

    Non-finite points break a line. ``markers``: a distinct marker shape per series (and, for
    series after the sixth, dashed lines), shown in the legend too, so lines drawn on top of each other
    stay apart; ``errors`` ({name: ±values}) draws error bars; ``xticks`` puts the x ticks there (e.g. the
    integer values of a swept key); ``margin`` pads automatic limits by that fraction of their range;
    ``lines=False`` draws the points only. Returns the layout: ``box`` (left, top, right, bottom) of the
    plot area in pixels, the ``legend`` box, the ``xticks`` and the axis limits ``xlim``/``ylim``, so a point (x, y) is drawn at
    ``left + (x − x0)/(x1 − x0)·(right − left)``, ``bottom − (y − y0)/(y1 − y0)·(bottom − top)``."""
    W, H = int(size[0]), int(size[1])
    if W < 160 or H < 120:
        raise TokensegError(f"{path}: a chart needs at least 160×120 pixels, got {W}×{H}")
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise TokensegError(f"{path}: series {name!r} has {len(xs)} x values but {len(ys)} y values")
    errors = dict(errors or {})
    allx = [float(v) for xs, _ in series.values() for v in xs]
    ally = [float(v) for _, ys in series.values() for v in ys]
    for name, (_, ys) in series.items():  # the error bars' ends count for the limits too
        for y, e in zip(ys, errors.get(name, [])):
            ally += [float(y) - float(e), float(y) + float(e)]
    x0, x1 = _limits(allx, xlim)
    y0, y1 = _limits(ally, ylim)
    if margin:
        if xlim is None:
            x0, x1 = x0 - margin * (x1 - x0), x1 + margin * (x1 - x0)
        if ylim is None:
            y0, y1 = y0 - margin * (y1 - y0), y1 + margin * (y1 - y0)
    xt = [float(v) for v in xticks if x0 <= float(v) <= x1] if xticks else nice_ticks(x0, x1)
    yt = nice_ticks(y0, y1)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0

    fs = max(10, min(W, H) // 36)
    font, small = _font(fs + 2), _font(fs)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    ylabels = [_fmt(v, ystep) for v in yt]
    tick_w = max((d.textlength(s, font=small) for s in ylabels), default=0)
    left = int(8 + fs * 1.6 + tick_w + 8) if ylabel else int(8 + tick_w + 8)
    top = int(10 + (fs * 2.2 if title else 0))
    right = W - 16
    bottom = H - int(10 + fs * 1.4 + (fs * 1.6 if xlabel else 0))

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for v in xt:
        d.line([(px(v), top), (px(v), bottom)], fill=GRID)
    for v in yt:
        d.line([(left, py(v)), (right, py(v))], fill=GRID)
    def style(k: int) -> tuple[tuple[int, int, int], str, int, float]:
        """Colour, marker shape, dash length and marker radius of series ``k`` (earlier series get larger
        markers, so a later one drawn on the same point still shows inside it)."""
        dash = 0 if k < len(MARKERS) else 7
        return COLOURS[k % len(COLOURS)], MARKERS[k % len(MARKERS)], dash, max(3.0, 7.5 - 1.6 * k)

    for k, (name, (xs, ys)) in enumerate(series.items()):
        colour, shape, dash, r = style(k)
        for x, y, e in zip(xs, ys, errors.get(name, [])):
            x, y, e = float(x), float(y), float(e)
            if math.isfinite(x) and math.isfinite(y) and math.isfinite(e) and e > 0:
                d.line([(px(x), py(y - e)), (px(x), py(y + e))], fill=colour, width=2)
                for yy in (y - e, y + e):
                    d.line([(px(x) - 4, py(yy)), (px(x) + 4, py(yy))], fill=colour, width=2)
        run: list[tuple[float, float]] = []
        for x, y in list(zip(xs, ys)) + [(math.nan, math.nan)]:
            x, y = float(x), float(y)
            if math.isfinite(x) and math.isfinite(y):
                run.append((px(x), py(y)))
                continue
            if len(run) == 1 and not markers:
                d.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=colour)
            elif len(run) > 1 and lines:
                _dashed(d, run, colour, dash if markers else 0)
            if markers:
                for p in run:
                    _marker(d, shape, p[0], p[1], r, colour)
            run = []
    d.rectangle([left, top, right, bottom], outline=AXIS)
    for v, s in zip(xt, (_fmt(v, xstep) for v in xt)):
        d.line([(px(v), bottom), (px(v), bottom + 4)], fill=AXIS)
        d.text((px(v), bottom + 6), s, fill=AXIS, font=small, anchor="ma")
    for v, s in zip(yt, ylabels):
        d.line([(left - 4, py(v)), (left, py(v))], fill=AXIS)
        d.text((left - 6, py(v)), s, fill=AXIS, font=small, anchor="rm")
    if title:
        d.text(((left + right) / 2, 8), title, fill=AXIS, font=font, anchor="ma")
    if xlabel:
        d.text(((left + right) / 2, H - 6), xlabel, fill=AXIS, font=small, anchor="md")
    if ylabel:
        tw = int(d.textlength(ylabel, font=small)) + 4
        lab = Image.new("RGB", (tw, fs + 6), (255, 255, 255))
        ImageDraw.Draw(lab).text((2, 1), ylabel, fill=AXIS, font=small)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (6, int((top + bottom) / 2 - lab.height / 2)))
    legend_box = None
    if series:
        names = list(series)
        lw = max(d.textlength(n, font=small) for n in names) + 30
        lh = (fs + 6) * len(names) + 6
        bx0, by0, bx1, by1 = legend_box = _legend_box(series, px, py, (left, top, right, bottom), lw, lh)
        d.rectangle([bx0, by0, bx1, by1], fill=(255, 255, 255), outline=(160, 160, 160))
        for k, n in enumerate(names):
            yy = by0 + 6 + k * (fs + 6) + fs / 2
            colour, shape, dash, _ = style(k)
            if markers:
                if lines:
                    _dashed(d, [(bx0 + 4, yy), (bx0 + 24, yy)], colour, dash)
                _marker(d, shape, bx0 + 14, yy, min(5.0, fs / 2.5), colour)
            else:
                d.line([(bx0 + 6, yy), (bx0 + 22, yy)], fill=colour, width=3)
            d.text((bx0 + 26, yy), n, fill=AXIS, font=small, anchor="lm")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return {"box": (left, top, right, bottom), "xlim": (x0, x1), "ylim": (y0, y1), "xticks": xt,
            "legend": legend_box}


__all__ = ["line_plot", "nice_ticks"]
