"""Segmentation metrics: confusion matrices for a whole background-threshold grid in one pass.

Seeds hold min–max normalised maps for the present classes only. With a constant background score
``t``, a pixel is labelled ``argmax([t, maps...])``: its best foreground class ``a`` if ``max > t``,
else background (ties go to background, as ``argmax`` picks the first). So for a sorted grid of
thresholds the prediction at threshold ``j`` is ``a`` while ``j < k`` and background afterwards, where
``k`` = number of thresholds strictly below the pixel's max. One ``bincount`` over
``(gt, a, k)`` therefore holds every threshold's confusion matrix; a cumulative sum over ``k`` reads
them out. This replaces the authors' 60 passes over the files (METHODS.md §13.1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .masks import IGNORE_INDEX


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n: int) -> np.ndarray:
    """(n, n) int64 matrix, rows = ground truth, columns = prediction; gt == 255 ignored."""
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    keep = gt != IGNORE_INDEX
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.max() >= n or pred.max() >= n or pred.min() < 0):
        raise ValueError(f"labels outside 0..{n - 1}")
    return np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)


def scores_from_confusion(conf: np.ndarray, classes: str = "present") -> dict:
    """IoU per class, mIoU, and the FP/FN rates of MCTformer's Fig. 9 from an (n, n) confusion.

    ``classes`` says which classes the means run over: ``all`` (every class; one never seen counts as
    IoU 0, as MCTformer's ``evaluation.py`` with its ``+1e-10``), ``present`` (classes with ground-truth
    or predicted pixels) or ``gt`` (classes with ground-truth pixels, as CLIP-ES). Excluded classes are NaN."""
    conf = conf.astype(np.float64)
    n = conf.shape[0]  # an extra last column: pixels predicted "ignore" (wrong wherever the gt is labelled)
    tp = np.diag(conf[:, :n])
    gt_count = conf.sum(1)  # T
    pred_count = conf[:, :n].sum(0)  # P
    union = gt_count + pred_count - tp
    if classes == "all":
        keep = np.ones_like(union, dtype=bool)
    elif classes == "gt":
        keep = gt_count > 0
    elif classes == "present":
        keep = union > 0
    else:
        raise ValueError(f"unknown class selection {classes!r}")
    denom = union + 1e-10 if classes == "all" else np.where(union > 0, union, 1.0)
    iou = np.where(keep, tp / denom, np.nan)
    fp = np.where(keep, (pred_count - tp) / denom, np.nan)
    fn = np.where(keep, (gt_count - tp) / denom, np.nan)

    def mean(v: np.ndarray) -> float:
        return float(np.nanmean(v)) if np.isfinite(v).any() else 0.0

    return {"miou": mean(iou), "iou": iou, "fp": mean(fp), "fn": mean(fn),
            "pixel_acc": float(tp.sum() / max(conf.sum(), 1.0)), "miou_rule": miou_rule(classes, conf)}


def miou_rule(classes: str, conf: np.ndarray) -> str:
    """The words printed beside an mIoU: which classes its mean runs over (``eval.miou_classes``), so two
    commands' numbers can be compared."""
    n = conf.shape[0]
    gt = conf.sum(1) > 0
    if classes == "all":
        missing = int(n - gt.sum())
        return (f"mean over all {n} classes incl. background" +
                (f"; {missing} without ground truth count as 0" if missing else "") + " (eval.miou_classes=all)")
    if classes == "gt":
        return f"mean over the {int(gt.sum())} of {n} classes present in the ground truth (eval.miou_classes=gt)"
    seen = int((gt | (conf[:, :n].sum(0) > 0)).sum())
    return f"mean over the {seen} of {n} classes in the ground truth or the prediction (eval.miou_classes=present)"


@dataclass
class ThresholdSweep:
    """Accumulates confusion matrices for every background threshold at once."""

    num_classes: int  # including background
    thresholds: np.ndarray

    def __post_init__(self) -> None:
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        if np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be strictly increasing")
        T = len(self.thresholds)
        n = self.num_classes
        self._hist = np.zeros(n * n * (T + 1), dtype=np.int64)

    def update(self, fg_max: np.ndarray, fg_arg: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: ``fg_max``/``fg_arg`` are the best foreground score and its label
        (1..C, i.e. foreground index + 1) per pixel; ``gt`` the (H, W) ground truth."""
        gt = np.asarray(gt).reshape(-1).astype(np.int64)
        keep = gt != IGNORE_INDEX
        gt = gt[keep]
        a = np.asarray(fg_arg).reshape(-1)[keep].astype(np.int64)
        m = np.asarray(fg_max, dtype=np.float32).reshape(-1)[keep]
        # compare in float32, the precision maps are stored and argmax-ed in
        k = np.searchsorted(self.thresholds.astype(np.float32), m, side="left")  # thresholds strictly below m
        n, T1 = self.num_classes, len(self.thresholds) + 1
        if gt.size and gt.max() >= n:
            raise ValueError(f"ground truth value {int(gt.max())} exceeds {n - 1} classes")
        self._hist += np.bincount((gt * n + a) * T1 + k, minlength=n * n * T1)

    def confusions(self) -> np.ndarray:
        """(T, n, n) confusion matrix for each threshold."""
        n, T = self.num_classes, len(self.thresholds)
        h = self._hist.reshape(n, n, T + 1)
        # pixels with k > j keep their foreground label at threshold j; the rest become background.
        above = np.cumsum(h[:, :, ::-1], axis=2)[:, :, ::-1]  # above[..., j] = Σ_{k >= j}
        conf = np.zeros((T, n, n), dtype=np.int64)
        for j in range(T):
            fg = above[:, :, j + 1]
            conf[j] = fg
            conf[j, :, 0] += h.sum(2).sum(1) - fg.sum(1)
        return conf


def threshold_grid(t_min: float, t_max: float, step: float) -> np.ndarray:
    n = int(round((t_max - t_min) / step)) + 1
    return np.round(t_min + step * np.arange(n), 6)


def seed_prediction(maps: np.ndarray, classes: np.ndarray, shape: tuple[int, int]):
    """Per-pixel best foreground score and label (foreground index + 1) from a seed's maps."""
    if len(classes) == 0:
        return np.zeros(shape, np.float32), np.zeros(shape, np.int64)
    maps = np.asarray(maps, dtype=np.float32)
    idx = maps.argmax(0)
    return maps.max(0), np.asarray(classes, np.int64)[idx] + 1


def pick_best(curve: list[float], early_stop: bool) -> int:
    """Index of the best mIoU; with ``early_stop`` the authors' ``--curve`` rule: walk the grid while each
    threshold improves on the best so far (``>``) and stop at the first one that does not."""
    if early_stop:
        best, best_value = 0, curve[0] if curve else 0.0
        for j in range(1, len(curve)):
            if curve[j] > best_value:
                best, best_value = j, curve[j]
            else:
                break
        return best
    return int(np.argmax(curve))
