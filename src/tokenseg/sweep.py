"""``tokenseg sweep``: a grid over any config keys, for every method — the chain per grid point, resumable.

``tokenseg sweep CONFIG otpl.top_k=1,3,5 otpl.ppc_weight=0,0.2 train.epochs=4 --out DIR`` runs, for
every point of the grid (here 3 × 2), train → maps (``eval.split``) → evaluate through
:mod:`tokenseg.pipeline`, each point in its own folder ``DIR/<key>=<value>[,...]``; with ``--stage
masks`` also pseudo masks from the point's best seeds (its best background threshold) and their mIoU.
A ``key=value`` without a top-level comma is a fixed override of every point (``maps.scales=[1.0,0.5]``
is one list value, not an axis). Points that differ only in ``maps.*``, ``eval.*`` or ``pseudo.*`` keys
share one trained model: it is trained (or resumed) in the first such point's folder, the others make
their maps from its checkpoint.

Run-to-run variance: with ``train.seed=0,1,2`` among the axes, every point of the other axes also gets
each seed kind's mIoU over the seeds as mean ± std (n − 1), min and max, in the printed table, in
``sweep.json`` (``variance``) and in the plot (error bars).

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
from .core.errors import TokensegError
from .core.files import write_json_atomic

__all__ = ["split_values", "parse_axes", "grid", "point_name", "run_point", "run_sweep", "format_table",
           "plot_sweep", "plot_variance", "training_key", "variance", "POINT_FILE", "TABLE_FILE", "PLOT_FILE"]

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


# ------------------------------------------------------------------------------------------ training
NOT_TRAINING = ("maps", "eval", "pseudo")  # sections that do not change the classifier a point trains
SEED_KEY = "train.seed"


def training_key(cfg: Config) -> str:
    """The settings that make a point's trained model: the config without ``output_dir``, ``name`` and the
    :data:`NOT_TRAINING` sections. Points with one key share one training (the first one's folder)."""
    d = yaml.safe_load(cfg.to_yaml()) or {}
    for k in ("output_dir", "name", *NOT_TRAINING):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _stats(values: list[float]) -> dict:
    """mean, sample standard deviation (n − 1; 0 for one value), min, max and n."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def variance(table: dict) -> list[dict]:
    """Run-to-run variance over ``train.seed``: for every point of the other axes, each seed kind's
    (and the best kind's, the masks') mIoU over the seeds as mean ± std, min, max."""
    others = [k for k in table["axes"] if k != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for r in table["rows"]:
        groups.setdefault(tuple(r["point"][k] for k in others), []).append(r)
    out = []
    for values, rows in groups.items():
        kinds = list(dict.fromkeys(k for r in rows for k in r["seeds"]))
        entry = {"point": dict(zip(others, values)), "seeds": [r["point"][SEED_KEY] for r in rows],
                 "kinds": {k: _stats([r["seeds"][k]["miou"] for r in rows if k in r["seeds"]]) for k in kinds},
                 "best": _stats([r["best"]["miou"] for r in rows])}
        if all(r.get("masks") for r in rows):
            entry["masks"] = _stats([r["masks"]["miou"] for r in rows])
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------ one point
def _config_diff(stored: dict, current: dict, defaults: dict | None = None, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ. A key the stored config lacks while the current one holds its
    default (``defaults``) is no difference: the folder was written before that key existed."""
    keys = []
    defaults = defaults or {}
    for k in sorted(set(stored) | set(current)):
        a, b = stored.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(k) if isinstance(defaults.get(k), dict) else {}
            keys += _config_diff(a, b, sub, f"{prefix}{k}.")
        elif a != b and not (k not in stored and k in defaults and b == defaults[k]):
            keys.append(f"{prefix}{k}")
    return keys


def check_folder(folder: Path, cfg: Config) -> None:
    """Refuse to resume a point whose folder was made with another config (a key added to tokenseg since,
    at its default, is not another config)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return
    diff = _config_diff(stored, yaml.safe_load(cfg.to_yaml()), yaml.safe_load(Config().to_yaml()))
    if diff:
        raise TokensegError(f"sweep: {folder} was made with other settings ({', '.join(diff[:6])}"
                            f"{', ...' if len(diff) > 6 else ''}); use another --out or delete the folder")


def _seed_summary(res: dict) -> dict:
    keep = ("miou", "threshold", "alpha", "fp", "fn", "background")
    return {k: res.get(k) for k in keep if k in res}


def run_point(cfg: Config, stage: str = "seeds", progress: bool = True, previous: dict | None = None,
              train_cfg: Config | None = None) -> dict:
    """The chain for one grid point (``cfg.output_dir`` is the point's folder): train (resuming; skipped
    for training-free methods) → maps of ``eval.split`` → evaluate, and for ``stage="masks"`` pseudo
    masks from the best kind at its best threshold → mask mIoU. ``previous``: a finished seeds result to
    extend with masks. ``train_cfg``: the config of an earlier point with the same training settings,
    whose model (trained, or resumed, in its own folder) makes this point's maps."""
    from . import pipeline
    from .methods import get_method

    t0 = time.time()
    folder = Path(cfg.output_dir)
    if previous is not None and "seeds" in previous:
        result = dict(previous)
    else:
        ckpt = None
        if get_method(cfg.model.method).trainable:
            ckpt = pipeline.train_step(train_cfg or cfg, resume=True, progress=progress)
        if train_cfg is not None:  # the point's own settings, for check_folder and `tokenseg report`
            folder.mkdir(parents=True, exist_ok=True)
            cfg.save(folder / "config.yaml")
        pipeline.maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
        seeds = pipeline.evaluate_step(cfg, progress=progress, verbose=False)
        best = max(seeds, key=lambda k: seeds[k]["miou"])
        result = {"output_dir": str(folder), "seeds": {k: _seed_summary(v) for k, v in seeds.items()},
                  "best": {"kind": best, "miou": seeds[best]["miou"]}, "seconds": 0.0}
        if ckpt is not None and train_cfg is not None:
            result["trained_in"] = str(train_cfg.output_dir)
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
    res = evaluate_masks(out, build_dataset(cfg.data, cfg.eval.split), classes=cfg.eval.miou_classes)
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
    owners: dict[str, Config] = {}
    trainers = [owners.setdefault(training_key(c), c) for c in cfgs]  # the first point of each training config
    rows = []
    for n, (point, cfg, trainer) in enumerate(zip(points, cfgs, trainers), 1):
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
            shared = trainer is not cfg
            if progress:
                print(f"sweep [{n}/{len(points)}] {label}: {'masks' if previous else 'running'} in {folder}"
                      + (f" (the model of {Path(trainer.output_dir).name}: same training settings)" if shared else ""))
            result = run_point(cfg, stage, progress, previous, train_cfg=trainer if shared else None)
            result["point"] = dict(point)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(done_path, result)
        rows.append({**result, "point": dict(point)})
    table = {"config": config, "fixed": list(fixed), "axes": axes, "stage": stage, "split": base.eval.split,
             "out": str(out), "rows": rows, "trainings": len({id(t) for t in trainers})}
    if len(axes.get(SEED_KEY, [])) > 1:
        table["variance"] = variance(table)
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
    text = "\n".join([title, fmt.format(*head), rule, *(fmt.format(*c) for c in lines)])
    if table.get("variance"):
        text += "\n\n" + format_variance(table)
    return text


def format_variance(table: dict) -> str:
    """mean ± std [min, max] of each kind's mIoU over the seeds, one row per point of the other axes."""
    groups = table["variance"]
    keys = list(groups[0]["point"])
    kinds = list(dict.fromkeys(k for g in groups for k in g["kinds"]))
    cols = [*kinds, "best", *(["masks"] if any("masks" in g for g in groups) else [])]

    def cell(st: dict | None) -> str:
        return "-" if st is None else f"{st['mean']:.2f} ± {st['std']:.2f} [{st['min']:.2f}, {st['max']:.2f}]"

    lines = [[*(str(g["point"][k]) for k in keys),
              *(cell(g["kinds"].get(c) if c in kinds else g.get(c)) for c in cols)] for g in groups]
    head = [*keys, *cols]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    n = max(g["best"]["n"] for g in groups)
    title = (f"over {SEED_KEY} ({n} seeds: {', '.join(groups[0]['seeds'])}): mean ± std (n − 1) [min, max] "
             f"of the seed mIoU (%)")
    return "\n".join([title, fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1)),
                      *(fmt.format(*c) for c in lines)])


def _x_axis(table: dict, key: str) -> tuple[dict[str, float], str, list[float] | None]:
    """x position of each value of ``key``, the x label, and the ticks: the values themselves for integer
    (or non-numeric) keys with at most 12 values, integer ticks for longer integer axes, else automatic."""
    from .core.plot import nice_ticks

    raw = table["axes"][key]
    vals = [_value(v) for v in raw]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
    integer = numeric and all(float(v).is_integer() for v in vals)
    xpos = {r: (float(v) if numeric else float(i)) for i, (r, v) in enumerate(zip(raw, vals))}
    ticks = None
    if not numeric or (integer and len(vals) <= 12):
        ticks = sorted(xpos.values())
    elif integer:
        ticks = [t for t in nice_ticks(min(xpos.values()), max(xpos.values())) if float(t).is_integer()]
    label = key if numeric else f"{key} ({', '.join(f'{i}={v}' for i, v in enumerate(raw))})"
    return xpos, label, ticks


def _sorted_series(points: list[tuple[float, float, float]]) -> tuple[list[float], list[float], list[float]]:
    points = sorted(points)
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def name_overlaps(series: dict, errors: dict | None = None) -> tuple[dict, dict]:
    """Rename a series identical to an earlier one to ``name (= earlier)``: lines drawn on top of each
    other are told apart in the legend (their markers differ too)."""
    out, errs = {}, {}
    for name, (xs, ys) in series.items():
        same = next((n for n, (xa, ya) in out.items() if list(xa) == list(xs) and
                     all(abs(a - b) < 1e-9 for a, b in zip(ya, ys)) and len(ya) == len(ys)), None)
        new = f"{name} (= {same.split(' (= ')[0]})" if same else name
        out[new] = (xs, ys)
        if errors and name in errors:
            errs[new] = errors[name]
    return out, errs


def plot_sweep(table: dict, path: str | Path) -> Path:
    """Seed mIoU against the first swept value: one line per seed kind (one axis), or per combination
    of the other axes with each point's best kind (several axes); non-numeric values are plotted at
    their position 0, 1, ... (named in the x label). Markers per series, integer ticks for integer keys,
    a margin around the values. With ``train.seed`` swept, see :func:`plot_variance`."""
    from .core.plot import line_plot

    if table.get("variance"):
        return plot_variance(table, path)
    keys = list(table["axes"])
    first = keys[0]
    xpos, xlabel, xticks = _x_axis(table, first)
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
    series, _ = name_overlaps(series)
    line_plot(path, series, xlabel=xlabel, ylabel="seed mIoU (%)", title=f"{table['config']}: sweep of {first}",
              markers=True, xticks=xticks, margin=0.06)
    return Path(path)


def plot_variance(table: dict, path: str | Path) -> Path:
    """Mean seed mIoU over ``train.seed`` with ± std error bars: against the first other axis (a line per
    kind, or per combination of the further axes with the best kind), or, when the seed is the only
    axis, one point per seed kind."""
    from .core.plot import line_plot

    groups = table["variance"]
    others = [k for k in table["axes"] if k != SEED_KEY]
    n = max(g["best"]["n"] for g in groups)
    series: dict[str, tuple[list[float], list[float]]] = {}
    errors: dict[str, list[float]] = {}

    def add(name: str, pts: list[tuple[float, float, float]]) -> None:
        xs, ys, es = _sorted_series(pts)
        series[name], errors[name] = (xs, ys), es

    if not others:
        g = groups[0]
        cats = [*g["kinds"].items(), *([("pseudo masks", g["masks"])] if "masks" in g else [])]
        for i, (kind, st) in enumerate(cats):
            add(kind, [(float(i), st["mean"], st["std"])])
        xlabel = "seed kind (" + ", ".join(f"{i}={k}" for i, (k, _) in enumerate(cats)) + ")"
        xticks, lines, x0 = [float(i) for i in range(len(cats))], False, "seed kind"
    else:
        x0 = others[0]
        xpos, xlabel, xticks = _x_axis(table, x0)
        lines = True
        if len(others) == 1:
            kinds = list(dict.fromkeys(k for g in groups for k in g["kinds"]))
            for kind in kinds:
                add(kind, [(xpos[g["point"][x0]], g["kinds"][kind]["mean"], g["kinds"][kind]["std"])
                           for g in groups if kind in g["kinds"]])
            if all("masks" in g for g in groups):
                add("pseudo masks", [(xpos[g["point"][x0]], g["masks"]["mean"], g["masks"]["std"]) for g in groups])
        else:
            combos: dict[str, list] = {}
            for g in groups:
                name = ", ".join(f"{k.split('.')[-1]}={g['point'][k]}" for k in others[1:])
                combos.setdefault(name, []).append((xpos[g["point"][x0]], g["best"]["mean"], g["best"]["std"]))
            for name, pts in combos.items():
                add(name, pts)
    series, errors = name_overlaps(series, errors)
    line_plot(path, series, xlabel=xlabel, ylabel=f"seed mIoU (%), mean ± std over {n} seeds",
              title=f"{table['config']}: {x0}, {n} values of {SEED_KEY}", markers=True, errors=errors,
              xticks=xticks, margin=0.08, lines=lines)
    return Path(path)
