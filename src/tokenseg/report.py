"""``tokenseg report RUN_DIR [RUN_DIR2 ...] --out DIR``: a static site to look at a run's seeds.

One ``index.html`` (CSS, JavaScript and the charts inline; no network) plus ``data.js`` (the numbers,
loaded by a ``<script>`` tag so the page opens from disk) and small thumbnails under
``tiles/<signature>/<n>/``. The report is built only from what runs already wrote: ``config.yaml``,
``seeds/<split>/<kind>/*.npz``, ``seeds/<split>/eval_<kind>.json`` (evaluated in memory where missing),
``maps_meta.json``, ``pseudo/*.png`` and ``predictions/*.png`` (e.g. ``segment evaluate --save-masks
RUN/predictions``). Each image's tiles end with its ``entry.json``: a rebuild reuses finished images
(an interrupted build resumes); another set of runs, split or thresholds gets another signature folder.
Nothing is written outside ``--out``.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .config import Config, load_config
from .data import WSSSDataset, build_dataset
from .core.errors import TokensegError
from .core.seeds import load_seed
from .core.masks import read_mask
from .core.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from .core.metrics import confusion_matrix, scores_from_confusion
from .core.seeds import seed_folders
from .pipeline import kind_title
from .core.plot import COLOURS, nice_ticks
from .core.progress import progress_bar
from .core.scores import find_seed_file, seed_scores
from .core.viz import colour_mask, overlay

__all__ = ["build_report", "load_run", "image_miou", "RunInfo", "META_FILE"]

META_FILE = "report_meta.json"
THUMB = 144  # longest side of a tile, pixels
PAGE_SIZE = 20
FORMAT = 2  # of entry.json: tiles of an older layout are made anew


@dataclass
class RunInfo:
    """What the report reads of one run folder."""

    name: str
    folder: Path
    cfg: Config
    split: str
    kinds: dict[str, Path]
    results: dict[str, dict]
    meta: dict
    pseudo: Path | None
    pred: Path | None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokensegError(f"{path}: cannot read ({exc})") from exc


def load_run(folder: str | Path, split: str | None = None, config: str | None = None,
             progress: bool = True) -> RunInfo:
    """Read a run folder: its config, the seed kinds of ``split`` (default ``eval.split``) and their
    evaluation (``eval_<kind>.json``, computed in memory when absent: the run folder is never written)."""
    from .evaluate import evaluate_seeds

    folder = Path(folder)
    if not folder.is_dir():
        raise TokensegError(f"{folder}: run folder not found")
    cfg_path = folder / "config.yaml"
    if config is None and not cfg_path.is_file():
        raise TokensegError(f"{folder}: no config.yaml (not a tokenseg run folder?); give its config with --config")
    cfg = load_config(config or str(cfg_path))
    split = split or cfg.eval.split
    root = folder / "seeds" / split
    kinds = seed_folders(root)
    if not kinds:
        there = sorted(p.name for p in (folder / "seeds").glob("*") if p.is_dir()) if (folder / "seeds").is_dir() else []
        raise TokensegError(f"{root}: no seeds for split {split!r} (--split; eval.split of {cfg_path.name} chose it)"
                            + (f"; seed folders there: {', '.join(there)}" if there else "; run `tokenseg maps` first"))
    ds = None
    results = {}
    for kind, path in kinds.items():
        saved = root / f"eval_{kind}.json" if path != root else root / "eval.json"
        if saved.is_file():
            results[kind] = _read_json(saved)
            continue
        if progress:
            print(f"report: {folder}: evaluating {kind} seeds (no {saved.name})")
        ds = ds or build_dataset(cfg.data, split)
        results[kind] = evaluate_seeds(path, ds, cfg.eval, progress=progress)
    meta = _read_json(root / "maps_meta.json") if (root / "maps_meta.json").is_file() else {}
    pseudo = folder / "pseudo" if (folder / "pseudo").is_dir() else None
    pred = next((p for p in (folder / "predictions", folder / "segment" / "predictions") if p.is_dir()), None)
    return RunInfo(folder.name or str(folder), folder, cfg, split, kinds, results, meta, pseudo, pred)


# ------------------------------------------------------------------------------------------ numbers
def image_miou(pred: np.ndarray, gt: np.ndarray, n: int) -> float | None:
    """mIoU (%) of one image: the mean IoU over the classes present in its ground truth or prediction
    (background included, 255 ignored); None without labelled pixels."""
    if not (gt != 255).any():
        return None
    return round(scores_from_confusion(confusion_matrix(pred, gt, n), "present")["miou"] * 100, 2)


def best_kind(run: RunInfo) -> str:
    return max(run.results, key=lambda k: run.results[k]["miou"])


def _setting(res: dict) -> str:
    if res.get("threshold") is not None:
        return f"t={res['threshold']:.2f}"
    if res.get("alpha") is not None:
        return f"α={res['alpha']:g}"
    return res.get("background") or "-"


def _argmax(seed, size: tuple[int, int], res: dict) -> np.ndarray:
    scores, labels = seed_scores(seed, size, res.get("background") or "constant",
                                 res.get("threshold") if res.get("threshold") is not None else 0.5,
                                 res.get("alpha") if res.get("alpha") is not None else 1.0)
    return labels[scores.argmax(0)].astype(np.uint8)


# ------------------------------------------------------------------------------------------ tiles
def _thumb_size(h: int, w: int) -> tuple[int, int]:
    s = THUMB / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def _jpeg(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=85)
    write_bytes_atomic(path, buf.getvalue())


def _png(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    write_bytes_atomic(path, buf.getvalue())


def _small(mask: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize(wh, Image.NEAREST))


def _run_tiles(r: int, run: RunInfo, image_id: str, small: np.ndarray, size: tuple[int, int],
               gt: np.ndarray | None, n: int, folder: Path) -> dict:
    """One run's tiles of one image: per kind a heat map per class of the seed and the argmax at the
    kind's chosen background; the pseudo mask and prediction where they exist; their mIoU (``gt``)."""
    wh = (small.shape[1], small.shape[0])
    out: dict = {"k": {}, "ck": {}}
    for kind, kfolder in run.kinds.items():
        found = find_seed_file(kfolder, image_id)
        if found is None:
            continue
        seed = load_seed(found)
        present = [int(c) for c in np.asarray(seed.classes)]
        for c, m in zip(present, np.asarray(seed.maps, np.float32)):
            heat = np.asarray(Image.fromarray(m).resize(wh, Image.BILINEAR), np.float32)
            _jpeg(folder / f"r{r}-{kind}-c{c}.jpg", overlay(small, heat))
        am = _argmax(seed, size, run.results[kind])
        _png(folder / f"r{r}-{kind}-am.png", colour_mask(_small(am, wh)))
        out["k"][kind] = image_miou(am, gt, n) if gt is not None else None
        out["ck"][kind] = present
    for key, mfolder in (("ps", run.pseudo), ("pr", run.pred)):
        p = mfolder / f"{image_id}.png" if mfolder is not None else None
        if p is not None and p.is_file():
            m = read_mask(p)
            _png(folder / f"r{r}-{key}.png", colour_mask(_small(m, wh)))
            out[key] = image_miou(m, gt, n) if gt is not None and m.shape == gt.shape else None
    return out


def _image_tiles(i: int, ds: WSSSDataset, runs: list[RunInfo], folder: Path) -> dict:
    """Write one image's tiles into ``folder`` and return its entry (per-run, per-kind mIoU)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_id = ds.ids[i]
    img = np.asarray(ds.load_image(i).convert("RGB"))
    wh = _thumb_size(*img.shape[:2])
    small = np.asarray(Image.fromarray(img).resize(wh, Image.BILINEAR))
    _jpeg(folder / "photo.jpg", small)
    has_gt = ds.mask_paths is not None and ds.mask_paths[i] is not None
    gt = ds.load_mask(i) if has_gt else None
    n = ds.num_classes + 1
    if has_gt:
        _png(folder / "gt.png", colour_mask(_small(gt, wh)))
        classes = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
    else:
        classes = sorted(int(c) for c in ds.labels[i])
    entry = {"id": image_id, "gt": has_gt, "cls": classes,
             "runs": [_run_tiles(r, run, image_id, small, img.shape[:2], gt, n, folder) for r, run in enumerate(runs)]}
    entry["wh"] = list(wh)
    write_json_atomic(folder / "entry.json", entry)  # last: its presence marks the image as done
    return entry


# ------------------------------------------------------------------------------------------ charts
def _svg_axes(x0: float, x1: float, y0: float, y1: float, box: tuple[int, int, int, int], xlabel: str,
              ylabel: str) -> tuple[list[str], callable, callable]:
    left, top, right, bottom = box

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top)

    parts = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" class="frame"/>']
    for v in nice_ticks(x0, x1):
        parts.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{bottom}" class="grid"/>'
                     f'<text x="{px(v):.1f}" y="{bottom + 14}" class="tick" text-anchor="middle">{v:g}</text>')
    for v in nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{right}" y2="{py(v):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{py(v) + 4:.1f}" class="tick" text-anchor="end">{v:g}</text>')
    parts.append(f'<text x="{(left + right) / 2}" y="{bottom + 30}" text-anchor="middle">{html.escape(xlabel)}</text>')
    parts.append(f'<text transform="translate(12,{(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(ylabel)}</text>')
    return parts, px, py


def _colour(k: int) -> str:
    return "#%02x%02x%02x" % COLOURS[k % len(COLOURS)]


def curve_svg(runs: list[RunInfo]) -> str:
    """mIoU against the background threshold (or α) of every run's every kind, the chosen point marked."""
    series = []
    for r, run in enumerate(runs):
        for k, (kind, res) in enumerate(run.results.items()):
            pts = [(p["threshold"] if p.get("threshold") is not None else p.get("alpha"), p["miou"])
                   for p in res.get("per_threshold", [])]
            pts = [(float(x), float(y)) for x, y in pts if x is not None]
            if pts:
                name = kind_title(kind) + (f" [{run.name}]" if len(runs) > 1 else "")
                series.append((name, pts, k, r, res))
    if not series:
        return '<p class="note">No threshold curve: these seeds use their own background channel.</p>'
    xs = [x for s in series for x, _ in s[1]]
    ys = [y for s in series for _, y in s[1]]
    power = all(s[4].get("alpha") is not None for s in series)
    W, H = 640, 290 + 16 * len(series)
    box = (48, 12, W - 12, 236)
    parts, px, py = _svg_axes(min(xs), max(xs), 0, max(ys) * 1.05 + 1, box,
                              "α of (1 − max)^α" if power else "background threshold", "seed mIoU (%)")
    for j, (name, pts, k, r, res) in enumerate(series):
        col = _colour(k)
        dash = ' stroke-dasharray="6 3"' if r else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"{dash}/>')
        bx = res["threshold"] if res.get("threshold") is not None else res.get("alpha")
        if bx is not None:
            parts.append(f'<circle cx="{px(float(bx)):.1f}" cy="{py(res["miou"]):.1f}" r="4" fill="{col}">'
                         f'<title>{html.escape(name)}: {res["miou"]:.2f} at {_setting(res)}</title></circle>')
        ly = 286 + 16 * j
        parts.append(f'<line x1="60" y1="{ly - 4}" x2="84" y2="{ly - 4}" stroke="{col}" stroke-width="2"{dash}/>'
                     f'<text x="90" y="{ly}">{html.escape(name)}: best {res["miou"]:.2f} at '
                     f'{html.escape(_setting(res))}</text>')
    return f'<svg class="chart" id="curve-chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}">{"".join(parts)}</svg>'


def class_iou_svg(runs: list[RunInfo]) -> str:
    """Per-class IoU of each run's best kind as horizontal bars, the class names on the left."""
    names = list(runs[0].results[best_kind(runs[0])]["iou"])
    bar, gap, left = 12, 6, 150
    W = 640
    H = 40 + len(names) * (len(runs) * bar + gap) + 18 * len(runs)
    right = W - 50
    parts = []
    for v in range(0, 101, 20):
        x = left + v / 100 * (right - left)
        parts.append(f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{H - 30 - 18 * len(runs)}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{H - 16 - 18 * len(runs)}" class="tick" text-anchor="middle">{v}</text>')
    y = 12
    for name in names:
        parts.append(f'<text x="{left - 6}" y="{y + bar * len(runs) / 2 + 4:.1f}" text-anchor="end" '
                     f'class="cname">{html.escape(name)}</text>')
        for r, run in enumerate(runs):
            v = run.results[best_kind(run)]["iou"].get(name)
            w = 0 if v is None else v / 100 * (right - left)
            label = "n/a" if v is None else f"{v:.1f}"
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{_colour(r)}">'
                         f'<title>{html.escape(name)} [{html.escape(run.name)}]: {label}</title></rect>'
                         f'<text x="{left + w + 3:.1f}" y="{y + bar - 3}" class="tick">{label}</text>')
            y += bar
        y += gap
    for r, run in enumerate(runs):
        ly = H - 8 - 18 * (len(runs) - 1 - r)
        parts.append(f'<rect x="{left}" y="{ly - 10}" width="12" height="10" fill="{_colour(r)}"/>'
                     f'<text x="{left + 18}" y="{ly}">{html.escape(run.name)}: '
                     f'{html.escape(kind_title(best_kind(run)))} (IoU %)</text>')
    return f'<svg class="chart" id="class-chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}">{"".join(parts)}</svg>'


# ------------------------------------------------------------------------------------------ tables
def _table(head: Sequence[str], rows: Sequence[Sequence[str]], id_: str = "") -> str:
    idattr = f' id="{id_}"' if id_ else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{idattr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def config_rows(run: RunInfo, n_images: int) -> list[tuple[str, str]]:
    cfg, meta = run.cfg, run.meta
    maps = meta.get("maps", {})
    bg = sorted({r.get("background") or "constant" for r in run.results.values()})
    rows = [("run folder", str(run.folder)), ("method", meta.get("method") or cfg.model.method),
            ("checkpoint", meta.get("checkpoint") or "(training-free)" if meta else str(run.folder / "checkpoint.pt")),
            ("split", f"{run.split} ({n_images} images)"),
            ("data", f"{cfg.data.format} {cfg.data.root or ''}".strip()),
            ("scales", ", ".join(f"{s:g}" for s in maps.get("scales", cfg.maps.scales))
             + (" + flip" if maps.get("flip", cfg.maps.flip) else "")),
            ("layers / fusion", f"{maps.get('layers', cfg.maps.layers)} / {maps.get('fusion', cfg.maps.fusion)}"),
            ("map normalisation", str(meta.get("normalise", "-"))),
            ("background model", ", ".join(bg) + f" (method default: {meta.get('background', '-')})"),
            ("exactness path", "maps.mode=" + str(maps.get("mode", cfg.maps.mode))
             + (" (the authors' own inference)" if maps.get("mode", cfg.maps.mode) == "authors" else
                " (tokenseg's batched engine)")),
            ("training", f"{cfg.train.epochs} epochs, seed {cfg.train.seed}"),
            ("mIoU over", f"eval.miou_classes={cfg.eval.miou_classes}")]
    return rows


def seed_rows(run: RunInfo) -> list[list[str]]:
    return [[kind_title(k), f"{r['miou']:.2f}", _setting(r), f"{r['fp']:.1f}", f"{r['fn']:.1f}"]
            for k, r in run.results.items()]


def class_diff_rows(runs: list[RunInfo]) -> list[list[str]]:
    names = list(runs[0].results[best_kind(runs[0])]["iou"])
    rows = []
    for name in names:
        vals = [run.results[best_kind(run)]["iou"].get(name) for run in runs]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in vals]
        d = "" if vals[0] is None or vals[-1] is None else f"{vals[-1] - vals[0]:+.2f}"
        rows.append([name, *cells, d])
    return rows


# ------------------------------------------------------------------------------------------ the site
def _stamp(path: str | None) -> int | None:
    """A file's modification time (a retrained checkpoint makes new tiles), None when absent."""
    try:
        return Path(path).stat().st_mtime_ns if path else None
    except OSError:
        return None


def _signature(runs: list[RunInfo], ids: list[str]) -> str:
    """What the tiles depend on: the runs, split, map settings, checkpoint, chosen thresholds, images."""
    key = {"format": FORMAT, "thumb": THUMB, "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
           "runs": [[str(r.folder.resolve()), r.split, r.meta.get("settings", {}), _stamp(r.meta.get("checkpoint")), {
               k: [v.get("background"), v.get("threshold"), v.get("alpha")] for k, v in r.results.items()},
               str(r.pseudo), str(r.pred)] for r in runs]}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _check_out(out: Path, runs: list[RunInfo], ds: WSSSDataset) -> None:
    from .data.guard import refuse_inside_dataset

    refuse_inside_dataset(out, [*(r.cfg for r in runs), ds], "report --out")
    if out.exists() and not out.is_dir():
        raise TokensegError(f"report --out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise TokensegError(f"report --out {out}: folder exists, is not empty and holds no tokenseg report "
                            f"({META_FILE}); choose another --out")


def _asset(name: str) -> str:
    return resources.files("tokenseg").joinpath("report_assets", name).read_text(encoding="utf-8")


def palette_legend(class_names: list[str]) -> list[dict]:
    pal = colour_mask(np.arange(len(class_names) + 1, dtype=np.uint8))
    return [{"name": n, "rgb": "#%02x%02x%02x" % tuple(int(c) for c in pal[v])}
            for v, n in enumerate(["background", *class_names])]


def build_report(run_dirs: Sequence[str | Path], out: str | Path, split: str | None = None,
                 config: str | None = None, limit: int | None = None, progress: bool = True) -> Path:
    """Python API of ``tokenseg report``; returns the path of ``index.html``."""
    if not run_dirs:
        raise TokensegError("report: give at least one run folder")
    out = Path(out)
    runs = [load_run(d, split, config, progress) for d in run_dirs]
    names = [r.name for r in runs]
    for k, r in enumerate(runs):  # two runs with one folder name (a/demo, b/demo): tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({k + 1})"
    if len({r.split for r in runs}) > 1:
        raise TokensegError("report: the runs' seeds are of different splits ("
                            + ", ".join(f"{r.folder}: {r.split}" for r in runs) + "); choose one with --split")
    ds = build_dataset(runs[0].cfg.data, runs[0].split)
    for r in runs[1:]:
        if list(r.results[best_kind(r)]["iou"]) != list(runs[0].results[best_kind(runs[0])]["iou"]):
            raise TokensegError(f"report: {r.folder} has other classes than {runs[0].folder}; compare runs of "
                                f"one dataset")
    _check_out(out, runs, ds)
    ids = list(ds.ids[:limit] if limit else ds.ids)
    sig = _signature(runs, ids)
    tiles = out / "tiles"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / META_FILE, {"tool": "tokenseg report", "runs": [str(r.folder) for r in runs],
                                        "split": runs[0].split, "signature": sig})
    if tiles.is_dir():  # tiles of another set of runs / thresholds: not shown any more
        for old in tiles.iterdir():
            if old.is_dir() and old.name != sig:
                shutil.rmtree(old)
    if progress:
        for r in runs:
            print(f"report: {r.folder} [{r.split}]: {len(r.kinds)} seed kinds ({', '.join(r.kinds)})"
                  + (", pseudo masks" if r.pseudo else "") + (", predictions" if r.pred else ""))
    entries, reused = [], 0
    bar = progress_bar(range(len(ids)), desc="report images", unit="img", disable=not progress)
    for i in bar:
        folder = tiles / sig / f"{i:06d}"
        done = folder / "entry.json"
        if done.is_file():
            entries.append(json.loads(done.read_text(encoding="utf-8")))
            reused += 1
        else:
            entries.append(_image_tiles(i, ds, runs, folder))
    data = {"tiles": f"tiles/{sig}", "page": PAGE_SIZE, "classes": list(ds.class_names),
            "palette": palette_legend(list(ds.class_names)),
            "titles": {k: kind_title(k) for r in runs for k in r.kinds},
            "runs": [{"name": r.name, "kinds": list(r.kinds), "best": best_kind(r),
                      "setting": {k: _setting(v) for k, v in r.results.items()}} for r in runs],
            "images": entries}
    write_text_atomic(out / "data.js", "window.TOKENSEG_REPORT = " + json.dumps(data, separators=(",", ":")) + ";\n")
    write_text_atomic(out / "index.html", render_page(runs, len(ids)))
    if progress:
        print(f"report: {len(ids)} images ({reused} reused from an earlier build): {out / 'index.html'}")
    return out / "index.html"


def render_page(runs: list[RunInfo], n_images: int) -> str:
    """index.html: summary, seed tables, charts, and the empty image browser that report.js fills."""
    title = "tokenseg report: " + " vs ".join(r.name for r in runs)
    sections = []
    for k, r in enumerate(runs):
        sections.append(f"<section class='run'><h2>{html.escape(r.name)}</h2>"
                        + _table(["setting", "value"], config_rows(r, n_images), f"config-{k}")
                        + "<h3>Seeds</h3>"
                        + _table(["seeds", "mIoU", "bg", "FP", "FN"], seed_rows(r), f"seeds-{k}")
                        + "</section>")
    diff = ""
    if len(runs) > 1:
        diff = ("<h2>Per-class IoU, best kind of each run</h2>"
                + _table(["class", *(r.name for r in runs), "Δ (last − first)"], class_diff_rows(runs), "class-diff"))
    body = (f"<h1>{html.escape(title)}</h1><div class='runs'>{''.join(sections)}</div>{diff}"
            f"<h2>Charts</h2><div class='charts' id='charts'>{curve_svg(runs)}{class_iou_svg(runs)}</div>"
            "<h2>Images</h2><div id='controls'></div><div id='legend'></div><div id='images'></div>"
            "<div id='pager'></div>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_asset('report.css')}</style></head>"
            f"<body>{body}<script src='data.js'></script><script>{_asset('report.js')}</script></body></html>\n")

