"""The whole chain as Python functions: train → maps → evaluate (``tokenseg run``) and the demo."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .config import Config, load_config
from .data import WSSSDataset, build_dataset
from .evaluate import evaluate_seeds, format_result, save_result
from .io import load_seed
from .viz import colour_mask, gallery, overlay, seed_argmax

KIND_TITLES = {
    "attention": "class-token attention",
    "attention_affinity": "attention + patch affinity",
    "patchcam": "PatchCAM",
    "fused": "fused (attention x PatchCAM)",
    "fused_affinity": "fused + patch affinity",
}


def seeds_dir(cfg: Config, split: str) -> Path:
    return Path(cfg.output_dir) / "seeds" / split


def train_step(cfg: Config, resume: bool = True, progress: bool = True) -> Path:
    from .engine import train

    return train(cfg, resume=resume, progress=progress)


def maps_step(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
              out_dir: str | Path | None = None, progress: bool = True, export_npy: bool = False) -> Path:
    from .maps import run_maps

    return run_maps(cfg, checkpoint=checkpoint, split=split, out_dir=out_dir, progress=progress,
                    export_npy=export_npy)


def evaluate_step(cfg: Config, seeds: str | Path | None = None, split: str | None = None,
                  progress: bool = True, verbose: bool = True, allow_pickle: bool = False) -> dict[str, dict]:
    """Evaluate every seed kind found under ``seeds`` (default: the run's seeds of ``eval.split``).

    A folder holding ``.npz``/``.npy`` files directly is evaluated as one kind."""
    split = split or cfg.eval.split
    ds = build_dataset(cfg.data, split)
    root = Path(seeds) if seeds else seeds_dir(cfg, split)
    if any(root.glob("*.np[yz]")):
        folders = {root.name: root}
    else:
        folders = {p.name: p for p in sorted(root.iterdir())
                   if p.is_dir() and any(p.glob("*.np[yz]"))} if root.is_dir() else {}  # not *_overlays/
    if not folders:
        from .io import TokensegError

        raise TokensegError(f"{root}: no seed files (run `tokenseg maps` first)")
    results = {}
    for kind, folder in folders.items():
        res = evaluate_seeds(folder, ds, cfg.eval, progress=progress, allow_pickle=allow_pickle)
        save_result(folder.parent / f"eval_{kind}.json" if folder != root else root / "eval.json", res)
        results[kind] = res
        if verbose:
            print(format_result(f"{KIND_TITLES.get(kind, kind)} [{split}]", res))
    return results


def background_only_miou(ds: WSSSDataset) -> float:
    """mIoU (%) of predicting background everywhere: IoU_bg / (C + 1)."""
    bg = total = 0
    for i in range(len(ds)):
        m = ds.load_mask(i)
        valid = m != 255
        bg += int(((m == 0) & valid).sum())
        total += int(valid.sum())
    return 100.0 * bg / max(total, 1) / (ds.num_classes + 1)


def results_table(results: dict[str, dict], baseline: float | None = None) -> str:
    lines = [f"{'seeds':<32} {'mIoU':>6} {'bg t':>5} {'FP':>6} {'FN':>6}", "-" * 58]
    for kind, res in results.items():
        t = "-" if res.get("threshold") is None else f"{res['threshold']:.2f}"
        lines.append(f"{KIND_TITLES.get(kind, kind):<32} {res['miou']:6.2f} {t:>5} {res['fp']:6.1f} {res['fn']:6.1f}")
    if baseline is not None:
        lines.append(f"{'(background everywhere)':<32} {baseline:6.2f}")
    return "\n".join(lines)


def write_gallery(cfg: Config, ds: WSSSDataset, results: dict[str, dict], path: Path, n: int = 8) -> Path:
    """Input, ground truth, each map kind (max over classes, overlaid) and the best kind's argmax."""
    kinds = list(results)
    best = max(kinds, key=lambda k: results[k]["miou"])
    root = seeds_dir(cfg, cfg.eval.split)
    rows = []
    for i in range(min(n, len(ds))):
        img = np.asarray(ds.load_image(i))
        row = [img, colour_mask(ds.load_mask(i))]
        for k in kinds:
            s = load_seed(root / k / f"{ds.ids[i]}.npz")
            m = s.maps.astype(np.float32).max(0) if len(s.classes) else np.zeros(img.shape[:2], np.float32)
            row.append(overlay(img, m))
        s = load_seed(root / best / f"{ds.ids[i]}.npz")
        row.append(colour_mask(seed_argmax(s.dense(ds.num_classes), results[best]["threshold"] or 0.5)))
        rows.append(row)
    titles = ["input", "ground truth"] + [KIND_TITLES.get(k, k) for k in kinds] + [f"argmax {best}"]
    gallery(rows, titles, path)
    return path


def run(cfg: Config, progress: bool = True) -> dict[str, dict]:
    """``tokenseg run``: train (resuming), generate seeds for ``maps.split``, evaluate them."""
    ckpt = train_step(cfg, resume=True, progress=progress)
    maps_step(cfg, checkpoint=ckpt, progress=progress)
    if cfg.eval.split != cfg.maps.split:
        maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
    return evaluate_step(cfg, progress=progress)


def demo(output_dir: str | Path = "runs/demo", overrides=(), progress: bool = True, gallery_images: int = 8,
         chain: bool = True) -> dict:
    """``tokenseg demo``: synthetic data → MCTformer+ from scratch → seeds → Tab. 7-style table + gallery;
    with ``chain``, then train seeds → pseudo masks → a small segmentation net (Tab. 1/3 in miniature)."""
    t0 = time.time()
    cfg = load_config("demo", [f"output_dir={output_dir}", *overrides])
    out = Path(cfg.output_dir)
    print(f"tokenseg demo: writing to {out}")
    ds_val = build_dataset(cfg.data, cfg.eval.split)  # generates the synthetic set on first use
    ckpt = train_step(cfg, resume=True, progress=progress)
    maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
    results = evaluate_step(cfg, progress=progress, verbose=False)
    baseline = background_only_miou(ds_val)
    table = results_table(results, baseline)
    print(f"\nSeed mIoU on the synthetic val split ({len(ds_val)} images, best background threshold):")
    print(table)
    gpath = write_gallery(cfg, ds_val, results, out / "gallery.png", n=gallery_images)
    seeds_seconds = round(time.time() - t0, 1)
    summary = {"seeds": results, "background_only_miou": baseline, "seeds_seconds": seeds_seconds,
               "checkpoint": str(ckpt), "gallery": str(gpath)}
    print(f"gallery: {gpath}  (seeds table after {seeds_seconds} s)")
    if chain:
        summary["chain"] = _demo_chain(cfg, ckpt, results, progress)
    summary["seconds"] = round(time.time() - t0, 1)
    save_result(out / "demo_results.json", summary)
    print(f"results: {out / 'demo_results.json'}  ({summary['seconds']} s)")
    return summary


def _demo_chain(cfg: Config, ckpt: Path, val_results: dict[str, dict], progress: bool) -> dict:
    """Seeds of the best kind on the train split → pseudo masks (its best val threshold) → DeepLab."""
    from .segment.chain import run_post_chain

    best = max(val_results, key=lambda k: val_results[k]["miou"])
    train_split = cfg.data.train_split
    cfg.maps.kinds = [best]
    maps_step(cfg, checkpoint=ckpt, split=train_split, progress=progress)
    seeds_train = evaluate_step(cfg, split=train_split, progress=progress, verbose=False)[best]
    cfg.pseudo.kind = best
    cfg.pseudo.threshold = float(val_results[best]["threshold"])
    res = run_post_chain(cfg, seeds_dir(cfg, train_split) / best, Path(cfg.output_dir), progress=progress)
    rows = [("seeds (" + KIND_TITLES.get(best, best) + ")", train_split, seeds_train["miou"]),
            ("pseudo masks", train_split, res["mask_miou"]),
            ("segmentation network", cfg.data.val_split, res["seg_miou"])]
    print("\nFrom seeds to a segmentation model (mIoU, %):")
    for name, split, v in rows:
        print(f"  {name:<44} {split:<6} {'-' if v is None else f'{v:6.2f}'}")
    return {"kind": best, "threshold": cfg.pseudo.threshold, "seed_miou_train": seeds_train["miou"],
            "mask_miou_train": res["mask_miou"], "seg_miou_val": res["seg_miou"]}
