"""Seed and mask evaluation drivers: read files, accumulate confusions, print and save results."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import EvalConfig
from .data import WSSSDataset
from .io import TokensegError, load_seed, write_json_atomic
from .metrics import ThresholdSweep, pick_best, scores_from_confusion, seed_prediction, threshold_grid


def _seed_file(folder: Path, image_id: str) -> Path:
    for ext in (".npz", ".npy"):
        p = folder / f"{image_id}{ext}"
        if p.is_file():
            return p
    raise TokensegError(f"{folder}: no seed file for image {image_id!r} (.npz or .npy)")


def evaluate_seeds(seeds_dir: str | Path, ds: WSSSDataset, cfg: EvalConfig | None = None,
                   progress: bool = True, allow_pickle: bool = False) -> dict:
    """mIoU of seeds over a background-threshold grid in one pass (or with a (1-max)^α background).

    Returns best mIoU (%), its threshold, per-class IoU, FP/FN rates and the whole curve. The authors'
    ``.npy`` seeds are read too (``allow_pickle``: unpickle anything, for trusted non-standard files)."""
    cfg = cfg or EvalConfig()
    seeds_dir = Path(seeds_dir)
    if not seeds_dir.is_dir():
        raise TokensegError(f"{seeds_dir}: seeds folder not found")
    n = ds.num_classes + 1
    power = cfg.background == "power"
    thresholds = np.array([0.5]) if power else threshold_grid(cfg.t_min, cfg.t_max, cfg.t_step)
    sweep = ThresholdSweep(n, thresholds)
    for i in tqdm(range(len(ds)), desc="evaluate", unit="img", disable=not progress, leave=False):
        gt = ds.load_mask(i)
        seed = load_seed(_seed_file(seeds_dir, ds.ids[i]), allow_pickle=allow_pickle)
        if len(seed.classes) and seed.maps.shape[1:] != gt.shape:
            raise TokensegError(f"{ds.ids[i]}: seed size {seed.maps.shape[1:]} differs from mask size {gt.shape}")
        fg_max, fg_arg = seed_prediction(seed.maps, seed.classes, gt.shape)
        if power:
            # foreground wins where max > (1 - max)^alpha; encode as a score against threshold 0.5
            fg_max = np.where(fg_max > (1.0 - fg_max) ** cfg.alpha, 1.0, 0.0)
        sweep.update(fg_max, fg_arg, gt)
    confs = sweep.confusions()
    scores = [scores_from_confusion(c, cfg.miou_classes) for c in confs]
    curve = [s["miou"] * 100 for s in scores]
    best = pick_best(curve, cfg.early_stop)
    s = scores[best]
    return {
        "miou": curve[best],
        "threshold": None if power else float(thresholds[best]),
        "background": cfg.background,
        "fp": s["fp"] * 100, "fn": s["fn"] * 100,
        "iou": {name: float(v) * 100 for name, v in zip(["background"] + list(ds.class_names), s["iou"])},
        "curve": {f"{t:.2f}": round(v, 3) for t, v in zip(thresholds, curve)} if not power else {},
        "per_threshold": [{"threshold": None if power else float(t), "miou": sc["miou"] * 100,
                           "fp": sc["fp"] * 100, "fn": sc["fn"] * 100,
                           "iou": [None if np.isnan(v) else float(v) * 100 for v in sc["iou"]]}
                          for t, sc in zip(thresholds, scores)],
        "images": len(ds),
    }


def format_result(title: str, res: dict) -> str:
    lines = [f"{title}: mIoU {res['miou']:.2f}"
             + (f" at background threshold {res['threshold']:.2f}" if res.get("threshold") is not None else "")
             + f"  (FP {res['fp']:.1f}, FN {res['fn']:.1f}, {res.get('images', '?')} images)"]
    width = max(len(k) for k in res["iou"])
    for name, v in res["iou"].items():
        lines.append(f"  {name:<{width}}  " + ("   n/a" if v is None else f"{v:6.2f}"))
    return "\n".join(lines)


def save_result(path: str | Path, res: dict) -> None:
    write_json_atomic(path, res)
