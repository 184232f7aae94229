"""WSOL mask evaluation: PxAP and pIoU over every score threshold in one pass (METHODS.md §13.4, §16.24).

Follows ``clovaai/wsolevaluation`` (``evaluation.MaskEvaluator``): each scoremap is min–max normalised
to [0, 1]; scores of ground-truth positive and negative pixels (ignore pixels excluded) are binned on the
right edges ``np.arange(0, 1, step)`` + ``[1, 2, 3]`` — bins [0, step), …, [1 − step, 1), [1, 2), [2, 3],
as ``np.histogram`` makes them — and reversed cumulative sums give tp, fp and fn for every threshold
``score >= t``, t ∈ {2, 1, 1 − step, …, 0}. Then

* PxAP = 100 · Σ precision[1:] · Δrecall over the points with tp + fp > 0 (their formula), and
* pIoU = 100 · max_t tp / (tp + fp + fn) over the same points ([I] METHODS.md: Zhu et al.'s peak IoU).

Their protocol evaluates at 224×224 (``_RESIZE_LENGTH``): masks resized nearest (OpenCV's index rule),
scoremaps at the input size 224. :func:`evaluate_wsol` does that by default and evaluates at mask
resolution with ``resize=None`` (for VOC-style datasets).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import INTERPOLATIONS
from .core.masks import IGNORE_INDEX, resize_nearest
from .core.errors import TokensegError
from .core.seeds import load_seed
from .core.scores import require_seed_file

WSOL_RESIZE = 224  # wsolevaluation's _RESIZE_LENGTH
def wsol_bin_edges(step: float = 0.001) -> np.ndarray:
    """Right edges of wsolevaluation's score bins: ``np.arange(0, 1, step)`` then 1, 2, 3 (float64)."""
    if not 0 < step < 1:
        raise ValueError(f"threshold step must be in (0, 1), got {step}")
    return np.append(np.arange(0, 1, step), [1.0, 2.0, 3.0])


def normalize_scoremaps(maps: np.ndarray) -> np.ndarray:
    """Min–max normalise each (H, W) map of a (K, H, W) stack to [0, 1] in float64 as wsolevaluation's
    ``normalize_scoremap``: a map with a NaN, or a constant map, becomes all zeros."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    if flat.shape[1] == 0:
        return flat.reshape(np.shape(maps))
    lo = flat.min(1, keepdims=True)  # NaN propagates through min / max
    hi = flat.max(1, keepdims=True)
    bad = np.isnan(lo) | np.isnan(hi) | (hi == lo)
    out = (flat - lo) / np.where(bad, 1.0, hi - lo)
    out[bad[:, 0]] = 0.0
    return out.reshape(np.shape(maps))


class WSOLSweep:
    """Histograms of scores on positive / negative pixels, for every threshold at once.

    ``update`` takes any batch of scoremaps (already in [0, 1]) with their targets (1 foreground,
    0 background, anything else — 255 — ignored: the uint8 mask wsolevaluation's ``get_mask`` makes).
    Scores are binned in float64 against the float64 edges, as ``np.histogram`` compares them.

    Two backends count the same bins: ``numpy`` (``np.histogram``, the very call their evaluator makes;
    the default on a CPU, where it is as fast as anything and uses no intra-op threads) and ``torch``
    (the default on a GPU: counts stay on the device until :meth:`compute`, no host sync per batch).
    """

    def __init__(self, step: float = 0.001, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        self.step = step
        self.edges_np = wsol_bin_edges(step)
        self.num_bins = nb = len(self.edges_np) - 1
        self.device = torch.device(device)
        if backend == "auto":
            backend = "numpy" if self.device.type == "cpu" else "torch"
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be auto, numpy or torch, got {backend!r}")
        self.backend = backend
        if backend == "numpy":
            self._pos = np.zeros(nb, dtype=np.int64)
            self._neg = np.zeros(nb, dtype=np.int64)
            return
        # lower / upper edge of each bin; the last bin [2, 3] is closed (np.histogram), so its upper test
        # is "s > 3", i.e. s >= the next float after 3
        up = self.edges_np[1:].copy()
        up[-1] = np.nextafter(up[-1], np.inf)
        self._lo = torch.as_tensor(self.edges_np[:-1], dtype=torch.float64, device=self.device)
        self._up = torch.as_tensor(up, dtype=torch.float64, device=self.device)
        lut = torch.full((256,), 2, dtype=torch.int64)  # target value -> 0 negative, 1 positive, 2 ignored
        lut[0], lut[1] = 0, 1
        self._lut = lut.to(self.device)
        # counts indexed by (class 0/1/2) · (nb + 2) + (bin + 1); bins −1 and nb are out of range
        self._hist = torch.zeros(3 * (nb + 2), dtype=torch.int64, device=self.device)

    def update(self, scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add pixels: ``scores`` and ``target`` (integer or bool) of the same size, any shape."""
        if self.backend == "numpy":
            self._update_numpy(scores, target)
        else:
            self._update_torch(scores, target)

    def _update_numpy(self, scores, target) -> None:
        s = (scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)).reshape(-1)
        t = (target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)).reshape(-1)
        if s.size != t.size:
            raise ValueError(f"scores ({s.size} pixels) and target ({t.size} pixels) differ in size")
        s = s.astype(np.float64, copy=False)
        t = t.astype(np.int64) if t.dtype == bool else t
        for want, hist in ((1, self._pos), (0, self._neg)):
            v = s[t == want]
            hist += np.histogram(v[~np.isnan(v)], bins=self.edges_np)[0]

    def _update_torch(self, scores, target) -> None:
        s = torch.as_tensor(scores, device=self.device).reshape(-1).to(torch.float64)
        t = torch.as_tensor(target, device=self.device).reshape(-1)
        if s.numel() != t.numel():
            raise ValueError(f"scores ({s.numel()} pixels) and target ({t.numel()} pixels) differ in size")
        nb = self.num_bins
        # bin b with lo[b] <= s < up[b]: the edges are k·step up to 1, so g = floor(s / step) is within
        # one bin of b, and one comparison each way against the real edges makes it exact (no
        # bucketize: a binary search per pixel, 3-4× slower)
        s = torch.nan_to_num(s, nan=-1.0)  # NaN is never counted (±inf fall outside the bins)
        g = torch.floor(s * (1.0 / self.step)).clamp_(0, nb - 1).to(torch.int64)
        b = g + (s >= self._up[g]).to(torch.int64)
        b -= (s < self._lo[g]).to(torch.int64)
        if t.dtype == torch.bool:
            cls = t.to(torch.int64)
        else:
            t = t.to(torch.int64)
            cls = self._lut[torch.where((t >= 0) & (t <= 255), t, torch.full_like(t, 255))]
        b += 1
        b += cls * (nb + 2)
        # index_add_ rather than bincount: no device-to-host sync (bincount needs the max)
        self._hist.index_add_(0, b, torch.ones_like(b))

    def merge(self, other: "WSOLSweep") -> None:
        """Add another sweep's counts (e.g. from another process)."""
        if other.num_bins != self.num_bins:
            raise ValueError("sweeps with different thresholds cannot be merged")
        pos, neg = other.histograms()
        if self.backend == "numpy":
            self._pos += pos
            self._neg += neg
        else:
            nb = self.num_bins
            h = self._hist.view(3, nb + 2)
            h[1, 1:nb + 1] += torch.as_tensor(pos, device=self.device)
            h[0, 1:nb + 1] += torch.as_tensor(neg, device=self.device)

    def histograms(self) -> tuple[np.ndarray, np.ndarray]:
        """(positive, negative) int64 counts per bin, ascending scores."""
        if self.backend == "numpy":
            return self._pos.copy(), self._neg.copy()
        nb = self.num_bins
        h = self._hist.cpu().numpy().reshape(3, nb + 2)[:, 1:nb + 1]
        return h[1].copy(), h[0].copy()

    def compute(self) -> dict:
        """PxAP and pIoU (in %), the pIoU threshold, and the whole curve.

        ``thresholds``, ``precision``, ``recall``, ``iou`` are arrays in the order of wsolevaluation's
        cumulative sums (t = 2, 1, 1 − step, …, 0; prediction = score >= t); precision is NaN where
        nothing is predicted."""
        pos, neg = (h.astype(np.float64) for h in self.histograms())
        num_pos = pos.sum()
        if num_pos <= 0:
            raise TokensegError("WSOL evaluation: no ground-truth foreground pixel in the evaluated set")
        tp = np.cumsum(pos[::-1])
        fp = np.cumsum(neg[::-1])
        fn = num_pos - tp
        predicted = tp + fp
        if not (predicted > 0).any():
            raise TokensegError("WSOL evaluation: no pixel is predicted at any threshold")
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = tp / num_pos
        iou = tp / (tp + fp + fn)
        nz = predicted[1:] > 0
        pxap = float(100.0 * (precision[1:] * np.diff(recall))[nz].sum())
        best = int(np.argmax(iou))
        thresholds = self.edges_np[:-1][::-1].copy()  # left edge of each bin, descending
        return {"pxap": pxap, "piou": float(100.0 * iou[best]), "best_threshold": float(thresholds[best]),
                "thresholds": thresholds, "precision": precision, "recall": recall, "iou": iou,
                "positive_pixels": int(num_pos), "negative_pixels": int(neg.sum())}


# ------------------------------------------------------------------------------------------------
# driver: seeds + dataset -> PxAP / pIoU
# ------------------------------------------------------------------------------------------------

def wsol_targets(ds, i: int, classes: Sequence[int], size: int | None) -> np.ndarray:
    """(K, h, w) uint8 targets (1 class pixels, 0 other, 255 ignore) of image ``i`` for ``classes``.

    A dataset with ``wsol_masks`` (OpenImages) builds them as wsolevaluation does (every instance
    mask resized on its own, OR-ed; ignore = ignore box minus foreground); any other dataset from
    ``load_mask`` (then resized nearest to size × size when ``size`` is given)."""
    if hasattr(ds, "wsol_masks"):
        fg, ign = ds.wsol_masks(i, size)
        if list(classes) != list(ds.labels[i]):
            raise TokensegError(f"image {ds.ids[i]!r}: WSOL masks exist for its label {ds.labels[i]} only")
        out = np.where(fg, 1, np.where(ign, IGNORE_INDEX, 0)).astype(np.uint8)
        return out[None]
    m = ds.load_mask(i)
    if size:
        m = resize_nearest(m, (size, size))
    cls = np.asarray(classes, dtype=np.int64).reshape(-1, 1, 1) + 1
    out = (m[None] == cls).astype(np.uint8)
    out[np.broadcast_to(m == IGNORE_INDEX, out.shape)] = IGNORE_INDEX
    return out


def _prefetch(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, at most ``ahead`` results in memory."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def evaluate_wsol(seeds_dir: str | Path, ds, resize: int | None = WSOL_RESIZE, *, step: float = 0.001,
                  interp: str = "bilinear", batch_size: int = 64, device: str | torch.device | None = None,
                  workers: int = 2, progress: bool = True, allow_pickle: bool = False) -> dict:
    """PxAP and pIoU of seed maps against ground-truth masks (wsolevaluation's mask protocol).

    For each image and each ground-truth class ``c`` of it, the seed map of ``c`` (zeros if the seed
    file has none: counted in ``missing_maps``) is resized to ``resize`` × ``resize`` (``interp``;
    bilinear and bicubic antialiased [I]: their CAMs are upsampled bicubically from the feature grid,
    ours are downsampled from the image size) or kept at mask resolution (``resize=None``), min–max
    normalised, and scored against the pixels of ``c`` (positives), all other non-ignored pixels
    (negatives). OpenImages is single-label: one scoremap per image, as in their code. On multi-label
    datasets (VOC, COCO) each (image, class) pair is one scoremap, so other classes' pixels are
    negatives of that map.

    Returns ``{"pxap", "piou", "best_threshold", "curve": {"0.237": {"precision", "recall", "iou"}}
    (in %, t = 0 … 1, precision None where nothing is predicted), "images", "scoremaps",
    "missing_maps", "resize", "interp", "step", "positive_pixels", "negative_pixels"}``.
    """
    seeds_dir = Path(seeds_dir)
    if not seeds_dir.is_dir():
        raise TokensegError(f"{seeds_dir}: seeds folder not found")
    if interp not in INTERPOLATIONS:
        raise TokensegError(f"WSOL interpolation must be one of {list(INTERPOLATIONS)}, got {interp!r}")
    if resize is not None and int(resize) <= 0:
        resize = None
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sweep = WSOLSweep(step, dev)
    todo = [i for i in range(len(ds)) if ds.labels[i]]

    def load(i: int):
        """Read + prepare one image in a worker thread: (normalised (K, h, w) float64, targets, missing)."""
        classes = sorted(set(int(c) for c in ds.labels[i]))
        seed = load_seed(require_seed_file(seeds_dir, ds.ids[i]), allow_pickle=allow_pickle)
        target = wsol_targets(ds, i, classes, resize)
        have = {int(c): k for k, c in enumerate(np.asarray(seed.classes).tolist())}
        shape = tuple(seed.maps.shape[1:]) if len(have) else None
        if resize is None and shape is not None and shape != target.shape[1:]:
            raise TokensegError(f"{ds.ids[i]}: seed size {shape} differs from mask size {target.shape[1:]}")
        shape = shape or target.shape[1:]
        maps = np.zeros((len(classes),) + shape, dtype=np.float64)
        missing = 0
        for k, c in enumerate(classes):
            if c in have:
                maps[k] = seed.maps[have[c]]
            else:
                missing += 1
        if resize is not None and shape != (resize, resize):
            kw = {"align_corners": False, "antialias": True} if interp in ("bilinear", "bicubic") else {}
            maps = F.interpolate(torch.from_numpy(maps)[None], size=(resize, resize), mode=interp, **kw)[0].numpy()
        return normalize_scoremaps(maps), target, missing

    from .core.progress import progress_bar

    n_maps = missing = pending = 0
    batch_s: list[np.ndarray] = []
    batch_t: list[np.ndarray] = []

    def flush() -> None:
        nonlocal pending
        if batch_s:
            s, t = np.concatenate(batch_s), np.concatenate(batch_t)
            if sweep.backend == "torch":
                sweep.update(torch.from_numpy(s).to(dev), torch.from_numpy(t).to(dev))
            else:
                sweep.update(s, t)
            batch_s.clear()
            batch_t.clear()
        pending = 0

    bar = progress_bar(total=len(todo), desc="wsol", unit="img", disable=not progress, leave=False)
    try:
        for scores, target, miss in _prefetch(load, todo, workers, ahead=4 * max(workers, 1)):
            batch_s.append(scores.reshape(-1))
            batch_t.append(np.ascontiguousarray(target).reshape(-1))
            n_maps += len(scores)
            missing += miss
            pending += len(scores)
            if pending >= batch_size:
                flush()
            bar.update(1)
        flush()
    finally:
        bar.close()
    if not n_maps:
        raise TokensegError(f"{ds.name}: no image with a ground-truth class to evaluate")
    res = sweep.compute()
    curve = {}
    for t, p, r, u in zip(res["thresholds"], res["precision"], res["recall"], res["iou"]):
        if t <= 1.0:
            curve[f"{t:.{_decimals(step)}f}"] = {
                "precision": None if not np.isfinite(p) else round(100.0 * float(p), 4),
                "recall": round(100.0 * float(r), 4), "iou": round(100.0 * float(u), 4)}
    return {"pxap": res["pxap"], "piou": res["piou"], "best_threshold": res["best_threshold"],
            "curve": dict(sorted(curve.items(), key=lambda kv: float(kv[0]))), "images": len(todo),
            "scoremaps": n_maps, "missing_maps": missing, "resize": resize, "interp": interp, "step": step,
            "positive_pixels": res["positive_pixels"], "negative_pixels": res["negative_pixels"]}


def _decimals(step: float) -> int:
    s = f"{step:.10f}".rstrip("0")
    return max(1, len(s.split(".")[1]) if "." in s else 1)


def format_wsol(title: str, res: dict) -> str:
    """One line for the console."""
    size = f"{res['resize']}×{res['resize']}" if res.get("resize") else "mask resolution"
    extra = f", {res['missing_maps']} missing class maps (scored as zeros)" if res.get("missing_maps") else ""
    return (f"{title}: PxAP {res['pxap']:.2f}  pIoU {res['piou']:.2f} at threshold {res['best_threshold']:g}"
            f"  ({res['images']} images, {res['scoremaps']} scoremaps, {size}{extra})")


def save_pr_curve(path: str | Path, result: dict | dict[str, dict], label: str | None = None) -> None:
    """The pixel precision–recall curve(s) of :func:`evaluate_wsol` as a PNG (recall on x, both in %).

    ``result``: one result, or ``{name: result}`` for one line per seed kind."""
    from .core.plot import line_plot

    results = {label or "": result} if "curve" in result else dict(result)
    series = {}
    for name, res in results.items():
        # descending thresholds: recall grows along the curve
        pts = [(v["recall"], v["precision"]) for _, v in sorted(res["curve"].items(), key=lambda kv: -float(kv[0]))
               if v["precision"] is not None]
        key = f"{name + ': ' if name else ''}PxAP {res['pxap']:.1f}, pIoU {res['piou']:.1f}"
        series[key] = ([p[0] for p in pts], [p[1] for p in pts])
    line_plot(path, series, xlabel="recall (%)", ylabel="precision (%)", title="pixel precision-recall (WSOL)",
              xlim=(0.0, 100.0), ylim=(0.0, 100.0))


def _seed_kinds(root: Path, first_id: str) -> dict[str, Path]:
    """``{kind: folder}``: ``root`` itself when it holds the seeds, else its sub-folders that do
    (found by the first image's file, so ids with sub-folders work too)."""
    def holds(folder: Path) -> bool:
        return any((folder / f"{first_id}{ext}").is_file() for ext in (".npz", ".npy"))

    if holds(root):
        return {root.name: root}
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and holds(p)}


def wsol_step(cfg, seeds: str | Path | None = None, split: str | None = None, resize: int | None = None, *,
              curve_png: str | Path | None = None, progress: bool = True, verbose: bool = True,
              allow_pickle: bool = False) -> dict[str, dict]:
    """``tokenseg evaluate CONFIG --wsol``: PxAP / pIoU of every seed kind under ``seeds`` (default: the
    run's seeds of ``eval.split``). ``resize``: the evaluation size (None: ``eval.wsol_size``, default
    224; 0: mask resolution); ``eval.wsol_interp`` and ``eval.wsol_step`` come from the config. Writes
    ``wsol_<kind>.json`` next to each kind's folder (``wsol.json`` inside a folder given directly) and,
    with ``curve_png``, one PR chart with a line per kind. Returns ``{kind: result}``."""
    from .data import build_dataset
    from .evaluate import save_result
    from .pipeline import kind_title, seeds_dir

    if resize is None:
        resize = int(cfg.eval.wsol_size)
    interp, step = cfg.eval.wsol_interp, float(cfg.eval.wsol_step)
    split = split or cfg.eval.split
    ds = build_dataset(cfg.data, split, "config key eval.split or the --split option")
    root = Path(seeds) if seeds else seeds_dir(cfg, split)
    if not len(ds):
        raise TokensegError(f"{ds.name}: no images")
    folders = _seed_kinds(root, ds.ids[0])
    if not folders:
        raise TokensegError(f"{root}: no seed files for {ds.name} (looked for {ds.ids[0]}.npz; run `tokenseg maps`)")
    results = {}
    for kind, folder in folders.items():
        res = evaluate_wsol(folder, ds, resize or None, step=step, interp=interp,
                            workers=max(1, cfg.data.num_workers), progress=progress, allow_pickle=allow_pickle)
        save_result(root / "wsol.json" if folder == root else folder.parent / f"wsol_{kind}.json", res)
        results[kind] = res
        if verbose:
            print(format_wsol(f"{kind_title(kind)} [{split}]", res))
    if curve_png:
        save_pr_curve(curve_png, results if len(results) > 1 else next(iter(results.values())))
    return results


__all__ = ["WSOLSweep", "evaluate_wsol", "wsol_step", "format_wsol", "save_pr_curve", "wsol_bin_edges",
           "wsol_targets", "normalize_scoremaps", "WSOL_RESIZE"]
