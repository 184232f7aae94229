"""Seed evaluation over 60 background thresholds (t = 0.00 … 0.59): our one-pass sweep vs re-reading.

``ours``     :func:`tokenseg.evaluate.evaluate_seeds`: every seed file and mask is read once; one
             ``bincount`` per image fills the confusion matrices of all thresholds
             (:class:`tokenseg.core.metrics.ThresholdSweep`).
``authors``  the authors' approach re-implemented here: for every threshold, every ``.npy`` seed and
             every mask PNG is read again, a (C+1)×H×W score tensor with background = t is arg-maxed,
             and TP/P/T are counted with one pass per class; the image list is split over worker
             processes per threshold as their ``evaluation.py`` does (``--procs``, default = cores).

Synthetic VOC-sized data (500×375, 20 classes, 1–3 present per image, float32 ``.npy`` seeds and
float16 ``.npz`` seeds of the same maps). Both compute the same curve; the script checks that.

    python benchmarks/bench_eval.py            # 100 images, 3 repeats
    python benchmarks/bench_eval.py --quick    # 30 images, 1 repeat
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, table  # noqa: E402

NUM_CLS = 21  # with background
THRESHOLDS = [i / 100 for i in range(60)]


def make_data(root: Path, n: int, seed: int = 0):
    from tokenseg.data import VOC_CLASSES, WSSSDataset
    from tokenseg.core.seeds import SeedMaps, save_seed
    from tokenseg.core.masks import save_palette_png
    from tokenseg.methods.mctformer.authors import save_seed_npy

    rng = np.random.default_rng(seed)
    H, W = 375, 500
    yy, xx = np.mgrid[0:H, 0:W]
    ids, masks, labels = [], [], []
    for i in range(n):
        k = int(rng.integers(0, 3))  # + class i % 20, so every class occurs (their mean counts absent ones as 0)
        classes = np.unique(np.concatenate([[i % 20], rng.choice(20, size=k, replace=False)]))
        maps = []
        for _ in classes:
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            r = rng.uniform(40, 160)
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.15 * rng.random((H, W))
            maps.append(((m - m.min()) / (m.max() - m.min() + 1e-8)).astype(np.float32))
        maps = np.stack(maps)
        gt = np.where(maps.max(0) > rng.uniform(0.3, 0.6), classes[maps.argmax(0)] + 1, 0).astype(np.uint8)
        edge = np.zeros_like(gt, bool)
        edge[1:] |= gt[1:] != gt[:-1]
        edge[:, 1:] |= gt[:, 1:] != gt[:, :-1]
        gt[edge] = 255
        image_id = f"img_{i:05d}"
        save_palette_png(root / "gt" / f"{image_id}.png", gt)
        save_seed_npy(root / "npy" / f"{image_id}.npy", classes, maps)
        save_seed(root / "npz" / f"{image_id}.npz", SeedMaps(classes, maps, {}))
        ids.append(image_id)
        masks.append(root / "gt" / f"{image_id}.png")
        labels.append([int(c) for c in classes])
    ds = WSSSDataset("bench", list(VOC_CLASSES), ids, [root / "none.jpg"] * n, labels, masks)
    return ds


# ------------------------------------------------------------------------------ the authors' approach
def _compare(job):
    t, names, npy_dir, gt_dir = job
    TP, P, T = np.zeros(NUM_CLS), np.zeros(NUM_CLS), np.zeros(NUM_CLS)
    for name in names:
        d = np.load(os.path.join(npy_dir, name + ".npy"), allow_pickle=True).item()
        h, w = list(d.values())[0].shape
        tensor = np.zeros((NUM_CLS, h, w), np.float32)
        for key in d.keys():
            tensor[key + 1] = d[key]
        tensor[0, :, :] = t
        predict = np.argmax(tensor, axis=0).astype(np.uint8)
        gt = np.array(Image.open(os.path.join(gt_dir, name + ".png")))
        cal = gt < 255
        mask = (predict == gt) * cal
        for i in range(NUM_CLS):
            P[i] += np.sum((predict == i) * cal)
            T[i] += np.sum((gt == i) * cal)
            TP[i] += np.sum((gt == i) * mask)
    return TP, P, T


def authors_eval(root: Path, ids: list[str], procs: int) -> list[float]:
    curve = []
    chunks = [ids[i::procs] for i in range(procs)]
    pool = mp.get_context("fork").Pool(procs) if procs > 1 else None
    try:
        for t in THRESHOLDS:
            jobs = [(t, c, str(root / "npy"), str(root / "gt")) for c in chunks]
            parts = pool.map(_compare, jobs) if pool else [_compare(j) for j in jobs]
            TP, P, T = (sum(p[k] for p in parts) for k in range(3))
            iou = TP / (T + P - TP + 1e-10)
            curve.append(float(np.mean(iou)) * 100)
    finally:
        if pool:
            pool.close()
            pool.join()
    return curve


def ours_eval(root: Path, ds, kind: str) -> list[float]:
    from tokenseg.config import EvalConfig
    from tokenseg.evaluate import evaluate_seeds

    res = evaluate_seeds(root / kind, ds, EvalConfig(t_min=0.0, t_max=0.59, t_step=0.01), progress=False)
    return list(res["curve"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                    help="worker processes for the authors' per-threshold passes (theirs: 8)")
    ap.add_argument("--quick", action="store_true", help="30 images, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats = 30, 1
    print(f"bench_eval: {args.images} images 500×375, 20 classes, {len(THRESHOLDS)} thresholds; "
          f"authors' approach with {args.procs} processes")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        ds = make_data(root, args.images)
        times: dict[str, list[float]] = {"authors": [], "ours (.npz)": [], "ours (.npy)": []}
        curves = {}
        for _ in range(args.repeats):  # interleaved
            for name in times:
                t = time.perf_counter()
                if name == "authors":
                    curves[name] = authors_eval(root, ds.ids, args.procs)
                else:
                    curves[name] = ours_eval(root, ds, "npz" if "npz" in name else "npy")
                times[name].append(time.perf_counter() - t)
        ref = median(times["authors"])
        rows = [[name, f"{median(ts):.2f}", f"{args.images / median(ts):.1f}", f"{ref / median(ts):.1f}×"]
                for name, ts in times.items()]
        print(table(["variant", "seconds", "images/s", "speed-up"], rows))
        d_npy = max(abs(a - b) for a, b in zip(curves["authors"], curves["ours (.npy)"]))
        d_npz = max(abs(a - b) for a, b in zip(curves["authors"], curves["ours (.npz)"]))
        best = int(np.argmax(curves["authors"]))
        print(f"curves agree: max |ΔmIoU| {d_npy:.2e} (same .npy files), {d_npz:.3f} (float16 .npz); "
              f"best mIoU {curves['authors'][best]:.2f} at t = {THRESHOLDS[best]:.2f}")


if __name__ == "__main__":
    main()
