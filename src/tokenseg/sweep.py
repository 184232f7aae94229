"""``tokenseg sweep``: a grid over any config keys, for every method — the chain per grid point, resumable.

``tokenseg sweep CONFIG otpl.top_k=1,3,5 otpl.ppc_weight=0,0.2 train.epochs=4 --out DIR`` runs, for
every point of the grid (here 3 × 2), train → maps (``eval.split``) → evaluate through
:mod:`tokenseg.pipeline`, each point in its own folder ``DIR/<key>=<value>[,...]``; with ``--stage
masks`` also pseudo masks from the point's best seeds (its best background threshold) and their mIoU.
A ``key=value`` without a top-level comma is a fixed override of every point (``maps.scales=[1.0,0.5]``
is one list value, not an axis).

Resumable: a finished point (``sweep_point.json``) is not redone; an interrupted one resumes (training
from its checkpoint, maps from the files written); a folder whose ``config.yaml`` differs from the
point's config is refused (another ``--out``, or delete the folder). The table goes to
``DIR/sweep.json`` and is printed; ``DIR/sweep.png`` plots seed mIoU against the (first) swept value.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Sequence

import yaml

from .config import Config, load_config, parse_override
from .io import TokensegError, write_json_atomic

__all__ = ["split_values", "parse_axes", "grid", "point_name", "run_point", "run_sweep", "format_table",
           "plot_sweep", "POINT_FILE", "TABLE_FILE", "PLOT_FILE"]

POINT_FILE = "sweep_point.json"
TABLE_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
STAGES = ("seeds", "masks")


# ------------------------------------------------------------------------------------------ the grid
def split_values(raw: str) -> list[str]:
    """Split ``raw`` at commas outside brackets, braces, parentheses and quotes (YAML lists and
    mappings stay one value)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_axes(overrides: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``key=v1,v2,...`` → an axis ``{key: [v1, v2, ...]}``; ``key=value`` → a fixed override.
    Axes keep the command line's order (the first is the plot's x axis)."""
    axes: dict[str, list[str]] = {}
    fixed: list[str] = []
    seen: set[str] = set()
    for text in overrides:
        if "=" not in text:
            raise TokensegError(f"sweep: {text!r} must look like section.key=v1,v2,... or section.key=value")
        key, raw = text.split("=", 1)
        key = key.strip()
        if key in seen:
            raise TokensegError(f"sweep: {key} is given twice")
        seen.add(key)
        if key == "output_dir":
            raise TokensegError("sweep: every point gets its own output_dir under --out; do not set output_dir")
        values = split_values(raw)
        if len(values) > 1:
            if any(v == "" for v in values):
                raise TokensegError(f"sweep: {text!r} has an empty value")
            if len(set(values)) != len(values):
                raise TokensegError(f"sweep: {key} repeats a value ({raw})")
            axes[key] = values
        else:
            fixed.append(f"{key}={raw}")
    return axes, fixed


def grid(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination, the last axis varying fastest."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_name(point: dict[str, str]) -> str:
    """A folder name for a grid point, e.g. ``otpl.top_k=5,otpl.ppc_weight=0.2`` (unsafe characters → _)."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text)[:200]


def _value(raw: str):
    """The YAML value of an axis entry (numbers for the plot)."""
    return parse_override(f"x={raw}")[1]


# ------------------------------------------------------------------------------------------ one point
def _config_diff(stored: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_folder(folder: Path, cfg: Config) -> None:
    """Refuse to resume a point whose folder was made with another config."""
    path = folder / "config.yaml"
    if not path.is_file():
        return
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return
    diff = _config_diff(stored, yaml.safe_load(cfg.to_yaml()))
    if diff:
        raise TokensegError(f"sweep: {folder} was made with other settings ({', '.join(diff[:6])}"
                            f"{', ...' if len(diff) > 6 else ''}); use another --out or delete the folder")


def _seed_summary(res: dict) -> dict:
    keep = ("miou", "threshold", "alpha", "fp", "fn", "background")
    return {k: res.get(k) for k in keep if k in res}


def run_point(cfg: Config, stage: str = "seeds", progress: bool = True, previous: dict | None = None) -> dict:
    """The chain for one grid point (``cfg.output_dir`` is the point's folder): train (resuming; skipped
    for training-free methods) → maps of ``eval.split`` → evaluate, and for ``stage="masks"`` pseudo
    masks from the best kind at its best threshold → mask mIoU. ``previous``: a finished seeds result to
    extend with masks."""
    from . import pipeline
    from .methods import get_method

    t0 = time.time()
    folder = Path(cfg.output_dir)
    if previous is not None and "seeds" in previous:
        result = dict(previous)
    else:
        ckpt = None
        if get_method(cfg.model.method).trainable:
            ckpt = pipeline.train_step(cfg, resume=True, progress=progress)
        pipeline.maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
        seeds = pipeline.evaluate_step(cfg, progress=progress, verbose=False)
        best = max(seeds, key=lambda k: seeds[k]["miou"])
        result = {"output_dir": str(folder), "seeds": {k: _seed_summary(v) for k, v in seeds.items()},
                  "best": {"kind": best, "miou": seeds[best]["miou"]}, "seconds": 0.0}
    if stage == "masks" and result.get("masks") is None:
        result["masks"] = _masks(cfg, result, progress)
    result["seconds"] = round(float(result.get("seconds") or 0.0) + time.time() - t0, 1)
    return result


def _masks(cfg: Config, result: dict, progress: bool) -> dict:
    """Pseudo masks of ``eval.split`` from the best seeds, at their best threshold [I] (``pseudo.*``
    otherwise as configured), scored against the ground truth."""
    from .data import build_dataset
    from .pipeline import seeds_dir
    from .refine.pseudo import evaluate_masks, make_pseudo_masks

    kind = result["best"]["kind"]
    best = result["seeds"][kind]
    pcfg = copy.deepcopy(cfg)
    pcfg.pseudo.split = cfg.eval.split
    pcfg.pseudo.kind = kind
    if best.get("threshold") is not None and pcfg.pseudo.background == "constant":
        pcfg.pseudo.threshold = float(best["threshold"])
    out = Path(cfg.output_dir) / "pseudo"
    make_pseudo_masks(pcfg, seeds_dir(cfg, cfg.eval.split) / kind, out, progress=progress)
    res = evaluate_masks(out, build_dataset(cfg.data, cfg.eval.split))
    return {"kind": kind, "threshold": pcfg.pseudo.threshold, "miou": res["miou"]}


# ------------------------------------------------------------------------------------------ the sweep
def run_sweep(config: str, axes: dict[str, list[str]], fixed: Sequence[str] = (), out: str | Path | None = None,
              stage: str = "seeds", progress: bool = True) -> dict:
    """Python API of ``tokenseg sweep``; returns the table (also written to ``<out>/sweep.json``)."""
    if stage not in STAGES:
        raise TokensegError(f"sweep: --stage must be one of {list(STAGES)}, got {stage!r}")
    if not axes:
        raise TokensegError("sweep: give at least one key with several values, e.g. otpl.top_k=1,3,5")
    base = load_config(config, list(fixed))  # fixed overrides are checked once, before any run
    keys = list(axes)
    out = Path(out) if out else Path(base.output_dir) / ("sweep-" + "-".join(k.split(".")[-1] for k in keys))
    points = grid(axes)
    cfgs = [load_config(config, [*fixed, *(f"{k}={v}" for k, v in p.items()), f"output_dir={out / point_name(p)}"])
            for p in points]  # every point's config is valid before the first one trains
    rows = []
    for n, (point, cfg) in enumerate(zip(points, cfgs), 1):
        folder = Path(cfg.output_dir)
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        done_path = folder / POINT_FILE
        check_folder(folder, cfg)
        previous = json.loads(done_path.read_text(encoding="utf-8")) if done_path.is_file() else None
        if previous is not None and (stage == "seeds" or previous.get("masks") is not None):
            if progress:
                print(f"sweep [{n}/{len(points)}] {label}: done ({folder})")
            result = previous
        else:
            if progress:
                print(f"sweep [{n}/{len(points)}] {label}: {'masks' if previous else 'running'} in {folder}")
            result = run_point(cfg, stage, progress, previous)
            result["point"] = dict(point)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(done_path, result)
        rows.append({**result, "point": dict(point)})
    table = {"config": config, "fixed": list(fixed), "axes": axes, "stage": stage, "split": base.eval.split,
             "out": str(out), "rows": rows}
    write_json_atomic(out / TABLE_FILE, table)
    table["plot"] = str(plot_sweep(table, out / PLOT_FILE))
    write_json_atomic(out / TABLE_FILE, table)
    print(format_table(table))
    print(f"table: {out / TABLE_FILE}  plot: {out / PLOT_FILE}")
    return table


def format_table(table: dict) -> str:
    """One row per point: the swept values, every seed kind's mIoU, the best, and the mask mIoU."""
    keys = list(table["axes"])
    kinds = list(dict.fromkeys(k for r in table["rows"] for k in r["seeds"]))
    masks = any(r.get("masks") for r in table["rows"])
    head = [*keys, *kinds, "best", *(["masks"] if masks else [])]
    lines = []
    for r in table["rows"]:
        cells = [str(r["point"][k]) for k in keys]
        cells += [f"{r['seeds'][k]['miou']:.2f}" if k in r["seeds"] else "-" for k in kinds]
        cells.append(f"{r['best']['miou']:.2f}")
        if masks:
            cells.append(f"{r['masks']['miou']:.2f}" if r.get("masks") else "-")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    title = f"seed mIoU (%) on {table.get('split', 'the eval split')}, best background per row"
    return "\n".join([title, fmt.format(*head), rule,
                      *(fmt.format(*c) for c in lines)])


def plot_sweep(table: dict, path: str | Path) -> Path:
    """Seed mIoU against the first swept value: one line per seed kind (one axis), or per combination
    of the other axes with each point's best kind (several axes); non-numeric values are plotted at
    their position 0, 1, ... (named in the x label)."""
    from .plot import line_plot

    keys = list(table["axes"])
    first = keys[0]
    raw = table["axes"][first]
    vals = [_value(v) for v in raw]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
    xpos = {r: (float(v) if numeric else float(i)) for i, (r, v) in enumerate(zip(raw, vals))}
    series: dict[str, tuple[list[float], list[float]]] = {}
    rows = table["rows"]
    if len(keys) == 1:
        kinds = list(dict.fromkeys(k for r in rows for k in r["seeds"]))
        for kind in kinds:
            pts = sorted((xpos[r["point"][first]], r["seeds"][kind]["miou"]) for r in rows if kind in r["seeds"])
            series[kind] = ([p[0] for p in pts], [p[1] for p in pts])
        if any(r.get("masks") for r in rows):
            pts = sorted((xpos[r["point"][first]], r["masks"]["miou"]) for r in rows if r.get("masks"))
            series["pseudo masks"] = ([p[0] for p in pts], [p[1] for p in pts])
    else:
        for r in rows:
            name = ", ".join(f"{k.split('.')[-1]}={r['point'][k]}" for k in keys[1:])
            xs, ys = series.setdefault(name, ([], []))
            xs.append(xpos[r["point"][first]])
            ys.append(r["best"]["miou"])
        series = {k: tuple(map(list, zip(*sorted(zip(*v))))) for k, v in series.items()}
    xlabel = first if numeric else f"{first} ({', '.join(f'{i}={v}' for i, v in enumerate(raw))})"
    line_plot(path, series, xlabel=xlabel, ylabel="seed mIoU (%)", title=f"{table['config']}: sweep of {first}")
    return Path(path)
