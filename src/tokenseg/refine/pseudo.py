"""Seeds -> pseudo masks (``tokenseg pseudo``), and mask evaluation.

Per image (METHODS.md §6, §7, §10.6):

1. scores = [background, seed maps of the present classes] at image resolution, the background being
   a constant ``threshold`` (MCTformer/PSA) or ``(1 − max_c map_c)^alpha`` (CLIP-ES, PSA labels);
2. optional refinement by an affinity random walk: ``refine=attention`` (the classifier's own
   patch-to-patch attention, training-free) or ``refine=affinitynet`` (PSA's learned affinities; the
   walk then uses the constant background ``rw_bg``); ``refine=irn`` replaces steps 1-4 with IRN's
   own chain (:mod:`tokenseg.refine.irn`: IR labels, IRNet, boundary random walk);
3. probabilities = scores normalised per pixel; optional DenseCRF;
4. label = argmax (0 background, c+1 class c); with ``confidence`` > 0, pixels whose probability is
   below it become 255 (CLIP-ES's confidence-guided ignore);
5. a VOC-palette PNG ``<out>/<image_id>.png``, written atomically; existing files are skipped, so an
   interrupted run resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from ..core.progress import progress_bar as tqdm

from ..config import Config, PseudoConfig
from ..core.masks import IGNORE_INDEX, read_mask, save_palette_png
from ..core.seeds import SeedMaps, load_seed
from ..core.errors import TokensegError
from ..core.locks import job_lock
from ..core.files import safe_output_path, write_json_atomic
from ..data.base import image_hw
from ..data.guard import refuse_inside_dataset
from ..data.transforms import normalise_images
from ..core.device import barrier, init_distributed, resolve_device
from ..core.metrics import confusion_matrix, scores_from_confusion
from ..core.crf import CRFParams, crf_params_from_config, dense_crf, resolve_backend
from .randomwalk import walk_maps
from ..core.scores import find_seed_file, label_from_probs, normalise_scores, seed_scores
from .workers import watch_parent, worker_pool

# ----------------------------------------------------------------------------- per-image steps


def pseudo_mask(seed: SeedMaps, size: tuple[int, int], pc: PseudoConfig, image: np.ndarray | None = None,
                affinity: tuple[torch.Tensor, tuple[int, int]] | None = None,
                crf: CRFParams | None = None, backend: str = "auto") -> np.ndarray:
    """One image's pseudo mask from its seed (see the module docstring).

    ``affinity``: (W, grid) for a random walk (attention p2p (M, M) dense, or AffinityNet sparse);
    ``image``: (H, W, 3) uint8, needed for the CRF."""
    if affinity is not None and pc.refine == "affinitynet":
        scores, labels = seed_scores(seed, size, "constant", pc.rw_bg)
    else:
        scores, labels = seed_scores(seed, size, pc.background, pc.threshold, pc.alpha)
    if affinity is not None and len(labels) > 1:
        aff, grid = affinity
        if pc.refine == "affinitynet":
            scores = walk_maps(scores, aff, grid, pc.rw_beta, 2 ** pc.rw_logt, symmetric=True)
        else:
            scores = walk_maps(scores, aff, grid, pc.attn_beta, pc.attn_t)
    probs = normalise_scores(scores)
    if pc.crf and len(labels) > 1:
        if image is None:
            raise ValueError("the CRF needs the image")
        probs = dense_crf(crf_image(image, pc.crf_image), probs, crf or crf_params_from_config(pc), backend,
                          pc.crf_exact_pixels)
    return label_from_probs(probs, labels, pc.confidence)


CLIP_ES_MEAN_BGR = (104.008, 116.669, 122.675)


def crf_image(image: np.ndarray, mode: str = "rgb") -> np.ndarray:
    """The image the CRF's bilateral term sees. ``rgb``: the image. ``clip-es-code``: what CLIP-ES's
    ``eval_cam_with_crf.py`` passes (METHODS.md §16.17): ``cv2.imread`` BGR, minus their mean, cast to
    uint8, so negative values wrap (C's float→uint8 conversion truncates, then keeps the low 8 bits);
    their published 75.0 mask mIoU was made that way."""
    if mode == "rgb":
        return image
    if mode != "clip-es-code":
        raise TokensegError(f"pseudo.crf_image must be rgb or clip-es-code, got {mode!r}")
    bgr = image[..., ::-1].astype(np.float32) - np.asarray(CLIP_ES_MEAN_BGR, np.float32)
    return np.ascontiguousarray((np.trunc(bgr).astype(np.int64) & 255).astype(np.uint8))


# ----------------------------------------------------------------------------- the job
@dataclass
class _Task:
    image_id: str
    seed_file: Path
    image_path: Path
    out_path: Path


def _run_task(task: _Task, pc: PseudoConfig, crf: CRFParams, backend: str,
              affinity: tuple[torch.Tensor, tuple[int, int]] | None = None,
              image: np.ndarray | None = None) -> None:
    from ..data import load_rgb

    seed = load_seed(task.seed_file)
    if image is None and pc.crf and len(seed.classes):
        image = np.asarray(load_rgb(task.image_path), dtype=np.uint8)
    size = image.shape[:2] if image is not None else image_hw(task.image_path)
    n = seed.maps.shape[0]
    if n != len(seed.classes):
        raise TokensegError(f"{task.seed_file}: {len(seed.classes)} classes but {n} maps")
    mask = pseudo_mask(seed, size, pc, image=image, affinity=affinity, crf=crf, backend=backend)
    save_palette_png(task.out_path, mask)


def _worker(args) -> str:
    task, pc, crf, backend = args
    _run_task(task, pc, crf, backend)
    return task.image_id


# the seed kind pseudo masks start from when pseudo.kind is empty: the paper's seeds first
SEED_KIND_PREFERENCE = ("fused_affinity", "attention_affinity", "fused", "patchcam", "attention")


def resolve_seeds_dir(cfg: Config, seeds_dir: str | Path | None = None) -> Path:
    """``seeds_dir``, else ``<output_dir>/seeds/<split>/<kind>`` or ``<output_dir>/seeds/<kind>``, the kind
    being ``pseudo.kind`` or the first of fused_affinity, attention_affinity, fused, patchcam, attention
    in ``maps.kinds``."""
    if seeds_dir:
        p = Path(seeds_dir)
        if not p.is_dir():
            raise TokensegError(f"{p}: seeds folder not found")
        return p
    kind = cfg.pseudo.kind or next((k for k in SEED_KIND_PREFERENCE if k in cfg.maps.kinds), cfg.maps.kinds[0])
    split = cfg.pseudo.split or cfg.maps.split
    root = Path(cfg.output_dir) / "seeds"
    candidates = [root / split / kind, root / kind]
    for c in candidates:
        if c.is_dir():
            return c
    raise TokensegError(f"no seeds folder found (looked for {candidates[0]} and {candidates[1]}: split "
                        f"{split!r} from {PSEUDO_SPLIT_ORIGIN}, kind {kind!r} from config key pseudo.kind); "
                        f"{existing_seed_folders(root)}; run `tokenseg maps --split {split}` first, or pass "
                        f"--split SPLIT or --seeds DIR")


PSEUDO_SPLIT_ORIGIN = "config key pseudo.split (empty: maps.split) or the --split option"


def existing_seed_folders(root: Path) -> str:
    """The seed folders under ``<output_dir>/seeds`` as ``split/kind`` (what a user can pass instead)."""
    subs = [d for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    found = [d.name for d in subs if next(d.glob("*.np[yz]"), None)]
    found += [f"{d.name}/{k.name}" for d in subs for k in sorted(d.iterdir())
              if k.is_dir() and next(k.rglob("*.np[yz]"), None)]
    if not found:
        return f"{root} holds no seeds"
    return f"seed folders in {root}: {', '.join(found[:12])}{' ...' if len(found) > 12 else ''}"


def pseudo_settings(cfg: Config, seeds: Path, checkpoint: str | Path | None) -> dict:
    """The settings that shape the masks of ``tokenseg pseudo`` (recorded beside them): the background
    model, CRF and confidence, and the chosen refinement's own keys (another refinement's keys, the
    worker count and the device cannot change them)."""
    pc = cfg.pseudo
    own = {"attention": ("attn_",), "affinitynet": ("aff_", "rw_"), "irn": ()}.get(pc.refine, ())
    crf_used = pc.crf or pc.refine in ("affinitynet", "irn")
    out: dict = {"--seeds": str(Path(seeds).resolve())}
    for k, v in vars(pc).items():
        if k in ("workers", "device", "kind", "irn", "checkpoint") or k.startswith(("attn_", "aff_", "rw_")) \
                and not k.startswith(own):
            continue
        if k.startswith("crf_") and not crf_used:
            continue
        out[f"pseudo.{k}"] = v
    if pc.refine == "irn":
        out.update({f"pseudo.irn.{k}": v for k, v in vars(pc.irn).items()
                    if k not in ("num_workers", "checkpoint_every", "infer_batch", "walk")})
    if pc.refine == "attention":
        out["--checkpoint"] = str(checkpoint or pc.checkpoint or Path(cfg.output_dir) / "checkpoint.pt")
    return out


def make_pseudo_masks(cfg: Config, seeds_dir: str | Path | None = None, out_dir: str | Path | None = None,
                      checkpoint: str | Path | None = None, work_dir: str | Path | None = None,
                      overwrite: bool = False, progress: bool = True, ids: Iterable[str] | None = None) -> dict:
    """Python API of ``tokenseg pseudo``: write ``<out_dir>/<image_id>.png`` for every image of the
    split (``pseudo.split`` or ``maps.split``) that has a seed file.

    ``checkpoint``: the classification checkpoint (``refine=attention``); ``work_dir``: where
    ``refine=affinitynet`` / ``refine=irn`` keep their CRF labels and network checkpoint (default
    ``<output_dir>/affinitynet`` / ``<output_dir>/irn``). Returns a summary dict."""
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "pseudo"
    refuse_inside_dataset(out, cfg, "pseudo --out")  # before the lock creates the folder
    with job_lock(out, "tokenseg pseudo"):
        return _make_pseudo_masks(cfg, seeds_dir, out, checkpoint, work_dir, overwrite, progress, ids)


def _make_pseudo_masks(cfg: Config, seeds_dir, out_dir, checkpoint, work_dir, overwrite: bool, progress: bool,
                       ids) -> dict:
    from ..data import build_dataset, load_rgb

    pc = cfg.pseudo
    seeds = resolve_seeds_dir(cfg, seeds_dir)
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "pseudo"
    refuse_inside_dataset(out, cfg, "pseudo --out")
    split = pc.split or cfg.maps.split
    ds = build_dataset(cfg.data, split, PSEUDO_SPLIT_ORIGIN)
    wanted = set(ids) if ids is not None else None
    tasks, missing = [], []
    for i, image_id in enumerate(ds.ids):
        if wanted is not None and image_id not in wanted:
            continue
        sf = find_seed_file(seeds, image_id)
        if sf is None:
            missing.append(image_id)
            continue
        tasks.append(_Task(image_id, sf, ds.image_paths[i], safe_output_path(out, f"{image_id}.png")))
    if not tasks:
        raise TokensegError(f"{seeds}: no seed file matches an image of split {split!r} ({len(ds)} images; the "
                            f"split from {PSEUDO_SPLIT_ORIGIN})")
    todo = [t for t in tasks if overwrite or not t.out_path.is_file()]
    n_todo = len(todo)  # over every rank
    dinfo = init_distributed(resolve_device(pc.device).type)
    if dinfo.world > 1:
        if pc.refine in ("affinitynet", "irn"):
            raise TokensegError(f"pseudo.refine={pc.refine} trains a network: run it as one process (without "
                                f"torchrun); refine none or attention shard by rank")
        todo = todo[dinfo.rank::dinfo.world]  # each rank writes its share of the masks; rank 0 the summary
    if dinfo.is_main:
        from ..core.resume import check_settings

        check_settings(out, pseudo_settings(cfg, seeds, checkpoint), overwrite, "pseudo_settings.json",
                       "pseudo masks")
    barrier(dinfo)
    progress = progress and dinfo.is_main
    crf = crf_params_from_config(pc)
    backend = resolve_backend(pc.crf_backend) if (pc.crf or pc.refine in ("affinitynet", "irn")) else "none"
    out.mkdir(parents=True, exist_ok=True)
    if dinfo.is_main:
        cfg.save(out / "config.yaml")
    summary = {"out_dir": str(out), "seeds_dir": str(seeds), "split": split, "images": len(tasks),
               "written": n_todo, "skipped_existing": len(tasks) - n_todo,
               "missing_seeds": len(missing), "refine": pc.refine, "crf": pc.crf,
               "crf_backend": backend if pc.crf else None}
    if missing and progress:
        print(f"pseudo: {len(missing)} of {len(ds)} images of split {split!r} have no seed file "
              f"(first: {missing[0]}); they get no mask")
    bar = tqdm(total=len(todo), desc="pseudo", unit="img", disable=not progress)

    if pc.refine == "none":
        if pc.workers > 1 and len(todo) > 1:
            with worker_pool(pc.workers) as pool:
                for _ in pool.map(_worker, [(t, pc, crf, backend) for t in todo], chunksize=8):
                    bar.update(1)
        else:
            for t in todo:
                _run_task(t, pc, crf, backend)
                bar.update(1)
    elif pc.refine == "attention":
        model, device = _load_classifier(cfg, checkpoint)
        for t in todo:
            image = np.asarray(load_rgb(t.image_path), dtype=np.uint8)
            aff = attention_affinity(model, image, device, pc.attn_layers)
            _run_task(t, pc, crf, backend, affinity=aff, image=image)
            bar.update(1)
    elif pc.refine == "irn":
        from .irn import make_irn_masks

        bar.close()
        work = Path(work_dir) if work_dir else Path(cfg.output_dir) / "irn"
        refuse_inside_dataset(work, cfg, "pseudo --work")
        summary["irn"] = make_irn_masks(cfg, ds, tasks, todo, seeds, work, progress=progress)
    else:  # affinitynet
        from .affinitynet import affinity_for_image, load_affinitynet, train_affinitynet

        bar.close()
        work = Path(work_dir) if work_dir else Path(cfg.output_dir) / "affinitynet"
        refuse_inside_dataset(work, cfg, "pseudo --work")
        ckpt = train_affinitynet(cfg, ds, [t.image_id for t in tasks], seeds, work, progress=progress,
                                 overwrite=overwrite)
        device = resolve_device(pc.device)
        net = load_affinitynet(ckpt).to(device)
        summary["affinitynet"] = str(ckpt)
        bar = tqdm(total=len(todo), desc="pseudo (random walk)", unit="img", disable=not progress)
        for t in todo:
            image = np.asarray(load_rgb(t.image_path), dtype=np.uint8)
            aff = affinity_for_image(net, image, pc.aff_radius, device)
            _run_task(t, pc, crf, backend, affinity=aff, image=image)
            bar.update(1)
    bar.close()
    barrier(dinfo)
    if dinfo.is_main:
        write_json_atomic(out / "pseudo_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- attention affinity
def _load_classifier(cfg: Config, checkpoint: str | Path | None):
    from ..checkpoint import load_model_from_checkpoint, run_checkpoint

    ckpt = Path(checkpoint or cfg.pseudo.checkpoint or run_checkpoint(cfg))
    loaded = load_model_from_checkpoint(ckpt)
    model = loaded[0]
    device = resolve_device(cfg.pseudo.device)
    return model.to(device).eval(), device


def to_input(image: np.ndarray, size: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) ImageNet-normalised float, resized bicubically to ``size``."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float().to(device)
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
    return normalise_images(x)


@torch.no_grad()
def attention_affinity(model, image: np.ndarray, device: torch.device | str = "cpu",
                       layers: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """The classifier's patch affinity for one image at its own resolution (rounded to a multiple
    of the patch): head-mean p2p attention summed over the last ``layers`` layers (0 = all)."""
    device = torch.device(device)
    p = model.patch_size
    H, W = image.shape[:2]
    size = (max(p, int(round(H / p)) * p), max(p, int(round(W / p)) * p))
    x = to_input(image, size, device)
    out = model.forward_maps(x, last_k=1, affinity=True, affinity_layers=layers)
    return out.affinity[0].float().cpu(), tuple(out.grid)


# ----------------------------------------------------------------------------- evaluation
def evaluate_masks(mask_dir: str | Path, dataset, progress: bool = False, classes: str = "all") -> dict:
    """mIoU (%) of the label PNGs in ``mask_dir`` against ``dataset``'s ground truth, averaged over
    ``classes`` (``eval.miou_classes``: the rule every command's mIoU follows).

    Only images that have both a PNG and a ground-truth mask are scored (``missing`` counts the
    rest). Predicted 255 (ignored) pixels count as wrong wherever the ground truth is labelled
    (a column of their own in the confusion), so a confidence mask cannot inflate the score;
    ``ignored_fraction`` reports how many labelled pixels were left out."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise TokensegError(f"{mask_dir}: mask folder not found")
    n = dataset.num_classes + 1
    conf = np.zeros((n + 1, n + 1), dtype=np.int64)
    evaluated, missing = 0, 0
    for i in tqdm(range(len(dataset)), desc="evaluate masks", unit="img", disable=not progress, leave=False):
        path = mask_dir / f"{dataset.ids[i]}.png"
        if not path.is_file() or dataset.mask_paths is None or dataset.mask_paths[i] is None:
            missing += 1
            continue
        gt = dataset.load_mask(i)
        pred = read_mask(path).astype(np.int64)
        if pred.shape != gt.shape:
            raise TokensegError(f"{path}: size {pred.shape} differs from the ground truth {gt.shape}")
        bad = (pred != IGNORE_INDEX) & (pred >= n)
        if bad.any():
            raise TokensegError(f"{path}: label {int(pred[bad].max())} exceeds the {n - 1} classes")
        pred = np.where(pred == IGNORE_INDEX, n, pred)
        conf += confusion_matrix(pred, gt, n + 1)
        evaluated += 1
    if evaluated == 0:
        raise TokensegError(f"{mask_dir}: no mask matches an image with ground truth in {dataset.name}")
    sc = scores_from_confusion(conf[:n], classes)  # the last column: predicted 255, wrong wherever gt is labelled
    names = ["background"] + list(dataset.class_names)
    return {
        "miou": sc["miou"] * 100,
        "iou": {name: (float(v) * 100 if np.isfinite(v) else None) for name, v in zip(names, sc["iou"])},
        "fp": sc["fp"] * 100, "fn": sc["fn"] * 100, "pixel_acc": sc["pixel_acc"] * 100,
        "ignored_fraction": float(conf[:n, n].sum() / max(conf[:n].sum(), 1)),
        "images": evaluated,
        "missing": missing,
        "miou_rule": sc["miou_rule"],
    }


def format_scores(title: str, res: dict) -> str:
    """A per-class IoU table."""
    lines = [f"{title}: mIoU {res['miou']:.2f}  (FP {res.get('fp', 0):.1f}, FN {res.get('fn', 0):.1f}, "
             f"{res['images']} images)"]
    if res.get("miou_rule"):
        lines.append(f"  ({res['miou_rule']})")
    width = max(len(k) for k in res["iou"])
    for name, v in res["iou"].items():
        lines.append(f"  {name:<{width}}  " + ("   n/a" if v is None else f"{v:6.2f}"))
    return "\n".join(lines)


__all__ = ["seed_scores", "normalise_scores", "label_from_probs", "pseudo_mask", "make_pseudo_masks",
           "attention_affinity", "evaluate_masks", "format_scores", "resolve_seeds_dir", "find_seed_file",
           "worker_pool", "watch_parent"]
