"""Seed and mask evaluation drivers: read files, accumulate confusions, print and save results."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import EvalConfig
from .data import WSSSDataset
from .core.errors import TokensegError
from .core.seeds import load_seed
from .core.files import write_json_atomic
from .core.progress import progress_bar
from .core.scores import require_seed_file
from .core.metrics import ThresholdSweep, pick_best, scores_from_confusion, seed_prediction, threshold_grid


def evaluate_seeds(seeds_dir: str | Path, ds: WSSSDataset, cfg: EvalConfig | None = None,
                   progress: bool = True, allow_pickle: bool = False) -> dict:
    """mIoU of seeds, in one pass over the files, for the background model ``eval.background``:

    * ``constant``: a background score ``t`` over the grid ``eval.t_min..t_max`` (MCTformer, CTI);
    * ``power``: ``(1 − max)^α`` for each α of ``eval.alphas`` (or ``eval.alpha``), the best kept (CLIP-ES);
    * ``channel``: the seed's own background map, plain argmax (POT, CTI's background token).

    Returns best mIoU (%), its threshold / α, per-class IoU, FP/FN rates and the whole curve. The
    authors' ``.npy`` seeds are read too (``allow_pickle``: unpickle anything, for trusted files)."""
    cfg = cfg or EvalConfig()
    seeds_dir = Path(seeds_dir)
    if not seeds_dir.is_dir():
        raise TokensegError(f"{seeds_dir}: seeds folder not found")
    n = ds.num_classes + 1
    mode = cfg.background
    if mode == "constant":
        settings = [float(t) for t in threshold_grid(cfg.t_min, cfg.t_max, cfg.t_step)]
        sweeps = [ThresholdSweep(n, np.asarray(settings))]
    else:
        settings = [float(a) for a in (cfg.alphas or [cfg.alpha])] if mode == "power" else [None]
        sweeps = [ThresholdSweep(n, np.array([0.5])) for _ in settings]
    for i in progress_bar(range(len(ds)), desc="evaluate", unit="img", disable=not progress, leave=False):
        gt = ds.load_mask(i)
        seed = load_seed(require_seed_file(seeds_dir, ds.ids[i]), allow_pickle=allow_pickle)
        if len(seed.classes) and seed.maps.shape[1:] != gt.shape:
            raise TokensegError(f"{ds.ids[i]}: seed size {seed.maps.shape[1:]} differs from mask size {gt.shape}")
        fg_max, fg_arg = seed_prediction(seed.maps, seed.classes, gt.shape)
        if mode == "constant":
            sweeps[0].update(fg_max, fg_arg, gt)
        elif mode == "power":
            for sweep, alpha in zip(sweeps, settings):
                # foreground wins where max > (1 - max)^alpha: a 0/1 score against threshold 0.5
                sweep.update(np.where(fg_max > (1.0 - fg_max) ** alpha, 1.0, 0.0), fg_arg, gt)
        else:
            if seed.background is None:
                raise TokensegError(f"{seeds_dir}: seed of {ds.ids[i]!r} has no background channel "
                                    f"(eval.background=channel needs seeds of a method that makes one)")
            bg = np.asarray(seed.background, np.float32)
            sweeps[0].update(np.where(fg_max > bg, 1.0, 0.0), fg_arg, gt)
    confs = np.concatenate([sw.confusions() for sw in sweeps])
    scores = [scores_from_confusion(c, cfg.miou_classes) for c in confs]
    curve = [s["miou"] * 100 for s in scores]
    best = pick_best(curve, cfg.early_stop and mode == "constant")
    s = scores[best]
    names = ["background"] + list(ds.class_names)
    return SeedScores({
        "miou": curve[best],
        "threshold": settings[best] if mode == "constant" else None,
        "alpha": settings[best] if mode == "power" else None,
        "background": mode,
        "fp": s["fp"] * 100, "fn": s["fn"] * 100,
        "iou": {name: None if np.isnan(v) else float(v) * 100 for name, v in zip(names, s["iou"])},
        "curve": {(f"{t:.2f}" if mode == "constant" else f"alpha={t}" if mode == "power" else "channel"): round(v, 3)
                  for t, v in zip(settings, curve)},
        "per_threshold": [{"threshold": t if mode == "constant" else None, "alpha": t if mode == "power" else None,
                           "miou": sc["miou"] * 100, "fp": sc["fp"] * 100, "fn": sc["fn"] * 100,
                           "iou": [None if np.isnan(v) else float(v) * 100 for v in sc["iou"]]}
                          for t, sc in zip(settings, scores)],
        "images": len(ds),
        "miou_rule": s["miou_rule"],
    }, title=f"seeds {seeds_dir.name} [{ds.name}]")


class SeedScores(dict):
    """What :func:`evaluate_seeds` returns: a plain dict (``res["miou"]``, ``res["iou"]``, the curve; JSON as
    is) that prints as a summary and a per-class table instead of its hundred entries."""

    def __init__(self, data: dict, title: str = "seeds") -> None:
        super().__init__(data)
        self.title = title

    def __str__(self) -> str:
        return format_result(self.title, self)

    def __repr__(self) -> str:
        return f"<{format_result(self.title, self, per_class=False)}>"

    def __reduce__(self):  # pickles / deep-copies as itself (dict's default would drop the title)
        return (SeedScores, (dict(self), self.title))


def format_result(title: str, res: dict, per_class: bool = True) -> str:
    lines = [f"{title}: mIoU {res['miou']:.2f}"
             + (f" at background threshold {res['threshold']:.2f}" if res.get("threshold") is not None else "")
             + f"  (FP {res['fp']:.1f}, FN {res['fn']:.1f}, {res.get('images', '?')} images)"]
    if res.get("miou_rule"):
        lines[0] += f"\n  ({res['miou_rule']})"
    if not per_class:
        return lines[0]
    width = max(len(k) for k in res["iou"])
    for name, v in res["iou"].items():
        lines.append(f"  {name:<{width}}  " + ("   n/a" if v is None or v != v else f"{v:6.2f}"))
    return "\n".join(lines)


def save_result(path: str | Path, res: dict) -> None:
    write_json_atomic(path, res)
