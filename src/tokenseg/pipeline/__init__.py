"""The whole chain as Python functions: train → maps → evaluate (``tokenseg run``) and the demo."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import Config, load_config
from ..data import WSSSDataset, build_dataset
from ..evaluate import evaluate_seeds, format_result, save_result
from ..core.seeds import load_seed, seed_folders
from ..core.scores import seed_scores
from ..core.viz import colour_mask, gallery, overlay


def kind_title(kind: str, method: str | None = None) -> str:
    """How reports name a map kind: the title ``method``'s recipe gives it, else any method's, else the
    kind itself (each :class:`~tokenseg.methods.MapRecipe` declares its kinds' titles)."""
    from ..methods import available_methods, get_method

    known = available_methods()
    for name in ([method] if method in known else []) + known:
        title = get_method(name).recipe.titles.get(kind)
        if title:
            return title
    return kind


def seeds_dir(cfg: Config, split: str) -> Path:
    return Path(cfg.output_dir) / "seeds" / split


def train_step(cfg: Config, resume: bool = True, progress: bool = True, overwrite: bool = False) -> Path:
    from ..engine import train

    return train(cfg, resume=resume, progress=progress, overwrite=overwrite)


def trained_checkpoint(cfg: Config, progress: bool = True) -> Path | None:
    """Train (resuming) and return the checkpoint the later stages read: the best-val one under
    ``train.keep_best`` (MMCST's selection), else the last; ``None`` for a training-free method."""
    from ..checkpoint import run_checkpoint
    from ..methods import get_method

    if not get_method(cfg.model.method).trainable:
        return None
    train_step(cfg, resume=True, progress=progress)
    return run_checkpoint(cfg)


def maps_step(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
              out_dir: str | Path | None = None, progress: bool = True, export_npy: bool = False,
              overwrite: bool = False) -> Path:
    from ..maps import run_maps

    return run_maps(cfg, checkpoint=checkpoint, split=split, out_dir=out_dir, progress=progress,
                    export_npy=export_npy, overwrite=overwrite)


def evaluate_step(cfg: Config, seeds: str | Path | None = None, split: str | None = None,
                  progress: bool = True, verbose: bool = True, allow_pickle: bool = False) -> dict[str, dict]:
    """Evaluate every seed kind found under ``seeds`` (default: the run's seeds of ``eval.split``).

    A folder holding ``.npz``/``.npy`` files directly is evaluated as one kind."""
    from ..core.errors import TokensegError

    split = split or cfg.eval.split
    ds = with_masks(build_dataset(cfg.data, split, "config key eval.split or the --split option"), progress)
    root = Path(seeds) if seeds else seeds_dir(cfg, split)
    folders = seed_folders(root)
    if not folders:
        raise TokensegError(f"{root}: no seed files for split {split!r} (config key eval.split or --split); "
                            f"run `tokenseg maps {cfg.name} ... --split {split}` first")
    from ..data.guard import refuse_inside_dataset

    results = {}
    for kind, folder in folders.items():
        res = evaluate_seeds(folder, ds, cfg.eval, progress=progress, allow_pickle=allow_pickle)
        side = folder.parent / f"eval_{kind}.json" if folder != root else root / "eval.json"
        try:
            refuse_inside_dataset(side, [cfg, ds])
        except TokensegError:  # seeds kept inside a dataset: scored, but nothing is written there
            side = None
        if side is not None:
            save_result(side, res)
        results[kind] = res
        if verbose:  # every class's IoU; the compact table is results_table
            print(format_result(f"{kind_title(kind, cfg.model.method)} [{split}]", res))
    return results


def has_masks(ds: WSSSDataset) -> bool:
    return ds.mask_paths is not None and any(p is not None for p in ds.mask_paths)


def with_masks(ds: WSSSDataset, progress: bool | None = True) -> WSSSDataset:
    """The images of ``ds`` that have a ground-truth mask (a folder of photos may have masks for some: boxes
    give labels only); an error when none has one."""
    from ..core.errors import TokensegError

    if not has_masks(ds):
        raise TokensegError(f"{ds.name}: no image has a ground-truth mask, so there is nothing to score seeds "
                            f"against (masks/<id>.png in a folder dataset); the seeds themselves are written")
    keep = [k for k, p in zip(ds.ids, ds.mask_paths) if p is not None]
    if len(keep) < len(ds):
        if progress is not None:  # a note, not a progress line: --quiet keeps it
            print(f"evaluate: {len(keep)} of the {len(ds)} images of {ds.name} have a ground-truth mask; "
                  f"scoring those")
        ds = ds.subset(keep)
    return ds


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
        t = ("-" if res.get("threshold") is None else f"{res['threshold']:.2f}") if res.get("alpha") is None \
            else f"a={res['alpha']:g}"
        lines.append(f"{kind_title(kind):<32} {res['miou']:6.2f} {t:>5} {res['fp']:6.1f} {res['fn']:6.1f}")
    if baseline is not None:
        lines.append(f"{'(background everywhere)':<32} {baseline:6.2f}")
    rules = {res["miou_rule"] for res in results.values() if res.get("miou_rule")}
    if len(rules) == 1:
        lines.append(f"mIoU: {rules.pop()}")
    return "\n".join(lines)


def write_gallery(cfg: Config, ds: WSSSDataset, results: dict[str, dict], path: Path, n: int = 8) -> Path:
    """Input, ground truth, each map kind's heat map of one class per image (the class with the most
    ground-truth pixels, named under each heat map) and the best kind's argmax, with a colour legend of
    the classes the mask columns show."""
    from ..core.viz import class_legend

    kinds = list(results)
    best = max(kinds, key=lambda k: results[k]["miou"])
    root = seeds_dir(cfg, cfg.eval.split)
    rows, captions, shown = [], [], set()
    for i in range(min(n, len(ds))):
        img = np.asarray(ds.load_image(i))
        has_gt = ds.mask_paths is not None and ds.mask_paths[i] is not None
        gt = ds.load_mask(i) if has_gt else None
        counts = np.bincount(gt.ravel(), minlength=256)[1:ds.num_classes + 1] if has_gt else np.zeros(1)
        focus = int(counts.argmax()) if counts.any() else (ds.labels[i][0] if ds.labels[i] else -1)
        why = "most gt pixels" if counts.any() else "first label"
        label = f"{ds.class_names[focus]} ({why})" if focus >= 0 else "no class"
        row = [img, colour_mask(gt) if has_gt else np.full_like(img, 255)]
        cap = ["", ""]
        for k in kinds:
            s = load_seed(root / k / f"{ds.ids[i]}.npz")
            hit = np.flatnonzero(np.asarray(s.classes) == focus)
            m = s.maps[hit[0]].astype(np.float32) if len(hit) else np.zeros(img.shape[:2], np.float32)
            row.append(overlay(img, m))
            cap.append(label)
        s = load_seed(root / best / f"{ds.ids[i]}.npz")
        r = results[best]
        scores, mask_labels = seed_scores(s, img.shape[:2], r.get("background") or "constant",
                                          r.get("threshold") or 0.5, r.get("alpha") or 1.0)
        am = mask_labels[scores.argmax(0)].astype(np.uint8)
        row.append(colour_mask(am))
        cap.append("")
        shown |= set(np.unique(am).tolist()) | (set(np.unique(gt).tolist()) if has_gt else set())
        rows.append(row)
        captions.append(cap)
    r = results[best]
    rule = (f"background t = {r['threshold']:.2f}" if r.get("threshold") is not None else
            f"background (1 - max)^{r['alpha']:g}" if r.get("alpha") is not None else "background channel")
    titles = (["input", "ground truth"] + [kind_title(k, cfg.model.method) for k in kinds]
              + [f"argmax {kind_title(best, cfg.model.method)}, {rule}"])
    notes = [f"Heat maps show one class per row: the class with the most ground-truth pixels in that image "
             f"(without a mask, its first image-level label), named under each map. The last column is the "
             f"argmax over [background score, class maps] of the best kind ({kind_title(best, cfg.model.method)}), "
             f"with the {rule} that scored best on split {cfg.eval.split!r}."]
    gallery(rows, titles, path, captions=captions, legend=class_legend(shown, ds.class_names),
            colorbar="heat maps (per-class normalised):", notes=notes)
    return path


def run(cfg: Config, progress: bool = True) -> dict[str, dict]:
    """``tokenseg run``: train (resuming; skipped for a training-free method), generate seeds for
    ``maps.split`` (and ``eval.split``), evaluate them."""
    ckpt = trained_checkpoint(cfg, progress)
    maps_step(cfg, checkpoint=ckpt, progress=progress)
    if cfg.eval.split != cfg.maps.split:
        maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
    if not has_masks(build_dataset(cfg.data, cfg.eval.split)):
        print(f"no ground-truth masks in split {cfg.eval.split!r} (config key eval.split): seeds written to "
              f"{seeds_dir(cfg, cfg.eval.split)}, not scored")
        return {}
    return evaluate_step(cfg, progress=progress)


REFERENCE_DEMO = "demo"  # the reference demo preset: every other method's demo is printed next to it


def demo_preset(method: str | None) -> str:
    """The demo preset of ``method``: the reference demo for its own method (or no method), else
    ``demo-<method>``."""
    from ..config import available_presets
    from ..core.errors import TokensegError

    reference = load_config(REFERENCE_DEMO).model.method
    preset = REFERENCE_DEMO if method in (None, reference) else f"demo-{method}"
    if preset not in available_presets():
        demos = sorted(p.removeprefix("demo-") for p in available_presets() if p.startswith("demo-"))
        raise TokensegError(f"no demo for method {method!r}; demos: {reference}, {', '.join(demos)}")
    return preset


def demo(output_dir: str | Path | None = None, overrides=(), progress: bool = True, gallery_images: int = 8,
         chain: bool = True, method: str | None = None) -> dict:
    """``tokenseg demo [--method M]``: synthetic data → the method from scratch → seeds → Tab. 7-style
    table + gallery; with ``chain``, then train seeds → pseudo masks → a small segmentation net (Tab. 1/3
    in miniature). For another method than MCTformer+, its table is printed next to MCTformer+'s on the
    same split (MCTformer+'s seeds are made once, next to the method's folder, and reused)."""
    t0 = time.time()
    preset = demo_preset(method)
    output_dir = output_dir or f"runs/{preset}"
    cfg = load_config(preset, [f"output_dir={output_dir}", *overrides])
    out = Path(cfg.output_dir)
    print(f"tokenseg demo ({cfg.model.method}): writing to {out}")
    ds_val = build_dataset(cfg.data, cfg.eval.split)  # generates the synthetic set on first use
    ckpt = trained_checkpoint(cfg, progress)
    maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
    results = evaluate_step(cfg, progress=progress, verbose=False)
    baseline = background_only_miou(ds_val)
    print(f"\nSeed mIoU on the synthetic val split ({len(ds_val)} images, best background model):")
    print(results_table(results, baseline))
    gpath = write_gallery(cfg, ds_val, results, out / "gallery.png", n=gallery_images)
    seeds_seconds = round(time.time() - t0, 1)
    summary = {"method": cfg.model.method, "seeds": results, "background_only_miou": baseline,
               "seeds_seconds": seeds_seconds, "checkpoint": str(ckpt or ""), "gallery": str(gpath)}
    print(f"gallery: {gpath}  (seeds table after {seeds_seconds} s)")
    if preset != REFERENCE_DEMO:
        summary["reference"] = _demo_reference(reference_folder(out), overrides_for_data(overrides), progress)
        reference = load_config(REFERENCE_DEMO).model.method
        own = own_kind(cfg.model.method, results)
        summary["own_kind"] = own
        print(f"\nNext to {reference} on the same split ({cfg.model.method}: its own seeds, {own}, before patch "
              f"affinity, then its best kind; {reference}: its best kind):")
        print(compare_table({f"{cfg.model.method} (own)": results, cfg.model.method: results,
                             reference: summary["reference"]}, kinds={f"{cfg.model.method} (own)": own}))
        print(DEMO_SCOPE)
    if chain:
        summary["chain"] = _demo_chain(cfg, ckpt, results, progress)
    summary["seconds"] = round(time.time() - t0, 1)
    save_result(out / "demo_results.json", summary)
    print(f"results: {out / 'demo_results.json'}  ({summary['seconds']} s)")
    return summary


def overrides_for_data(overrides) -> list[str]:
    """The overrides that change the data (kept for the reference run of a comparison)."""
    return [o for o in overrides if o.startswith("data.")]


def reference_folder(out: Path) -> Path:
    """Where MCTformer+'s reference demo of a method's demo in ``out`` lives: beside it (``runs/demo``
    next to ``runs/demo-cti``, shared by every method's demo), or inside ``out`` when the method's own
    folder is named like the reference's (``--out x/demo``), so the two runs never share a folder."""
    beside = out.parent / REFERENCE_DEMO
    return out / REFERENCE_DEMO if beside.resolve() == out.resolve() else beside


def _demo_reference(folder: Path, overrides, progress: bool) -> dict[str, dict]:
    """MCTformer+'s demo seeds on the val split: read from ``folder`` or made there once."""
    cfg = load_config("demo", [f"output_dir={folder}", *overrides])
    done = folder / "demo_results.json"
    if done.is_file():
        import json

        return json.loads(done.read_text(encoding="utf-8"))["seeds"]
    print(f"(MCTformer+ reference: training it once in {folder}; later demos reuse it)")
    ckpt = trained_checkpoint(cfg, progress)
    maps_step(cfg, checkpoint=ckpt, split=cfg.eval.split, progress=progress)
    return evaluate_step(cfg, progress=progress, verbose=False)


DEMO_SCOPE = ("What this shows: each method's own maps against MCTformer+'s, trained from scratch in minutes on "
              "toy shapes (same data, split and time budget). What it cannot: the papers' setting (ImageNet "
              "weights, VOC/COCO photos, hours on GPUs) — a gap here need not hold there, nor the reverse.")


def own_kind(method: str, results: dict[str, dict]) -> str:
    """The method's own seed kind before patch affinity: its recipe's first default kind without the
    ``_affinity`` refinement (POT ``pot``, OTPL ``otpl``, CTI and MMCST ``fused``), if it was made;
    else the best kind made."""
    from ..methods import get_method

    kind = get_method(method).recipe.default_kinds[0].removesuffix("_affinity")
    return kind if kind in results else max(results, key=lambda k: results[k]["miou"])


def compare_table(by_method: dict[str, dict[str, dict]], kinds: dict[str, str] | None = None) -> str:
    """One row per method: its best seed kind (or the one ``kinds`` names for it), mIoU, background
    threshold / model, FP, FN."""
    lines = [f"{'method':<18} {'seeds':<30} {'mIoU':>6} {'bg':>6} {'FP':>6} {'FN':>6}", "-" * 76]
    for name, results in by_method.items():
        kind = (kinds or {}).get(name) or max(results, key=lambda k: results[k]["miou"])
        r = results[kind]
        bg = (f"{r['threshold']:.2f}" if r.get("threshold") is not None else
              f"a={r['alpha']:g}" if r.get("alpha") is not None else r.get("background", "-"))
        lines.append(f"{name:<18} {kind_title(kind, name):<30} {r['miou']:6.2f} {bg:>6} {r['fp']:6.1f} "
                     f"{r['fn']:6.1f}")
    return "\n".join(lines)


def _demo_chain(cfg: Config, ckpt: Path, val_results: dict[str, dict], progress: bool) -> dict:
    """Seeds of the best kind on the train split → pseudo masks (its best val threshold) → DeepLab."""
    from .chain import run_post_chain

    best = max(val_results, key=lambda k: val_results[k]["miou"])
    train_split = cfg.data.train_split
    cfg.maps.kinds = [best]
    maps_step(cfg, checkpoint=ckpt, split=train_split, progress=progress)
    seeds_train = evaluate_step(cfg, split=train_split, progress=progress, verbose=False)[best]
    cfg.pseudo.kind = best
    chosen = val_results[best]  # the background model the val split chose: a threshold, a power or the channel
    cfg.pseudo.background = chosen.get("background") or "constant"
    if chosen.get("threshold") is not None:
        cfg.pseudo.threshold = float(chosen["threshold"])
    if chosen.get("alpha") is not None:
        cfg.pseudo.alpha = float(chosen["alpha"])
    res = run_post_chain(cfg, seeds_dir(cfg, train_split) / best, Path(cfg.output_dir), progress=progress)
    rows = [("seeds (" + kind_title(best, cfg.model.method) + ")", train_split, seeds_train["miou"]),
            ("pseudo masks", train_split, res["mask_miou"]),
            ("segmentation network", cfg.data.val_split, res["seg_miou"])]
    print("\nFrom seeds to a segmentation model (mIoU, %):")
    for name, split, v in rows:
        print(f"  {name:<44} {split:<6} {'-' if v is None else f'{v:6.2f}'}")
    return {"kind": best, "background": cfg.pseudo.background, "threshold": chosen.get("threshold"),
            "alpha": chosen.get("alpha"), "seed_miou_train": seeds_train["miou"],
            "mask_miou_train": res["mask_miou"], "seg_miou_val": res["seg_miou"]}
