"""Seeds -> pseudo masks -> segmentation network in one call (used by ``tokenseg demo``)."""
from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config

def demo_config(cfg: Config) -> Config:
    """A copy of ``cfg`` that fits a CPU demo's minutes: the small segmentation network of the demo
    preset's ``segment`` section, no refinement that trains a network (AffinityNet, IRN, attention
    walks), and no torch DenseCRF (pydensecrf is used if installed)."""
    from ..config import load_config

    cfg = copy.deepcopy(cfg)
    cfg.segment = load_config("demo").segment  # the demo's small network (ResNet-10-T, AdamW, 3 epochs)
    if cfg.pseudo.refine != "none":
        cfg.pseudo.refine = "none"
    if cfg.pseudo.crf:
        from ..core.crf import resolve_backend

        if resolve_backend(cfg.pseudo.crf_backend) == "torch":
            print("demo: pydensecrf is not installed; pseudo masks without CRF (pip install pydensecrf2)")
            cfg.pseudo.crf = False
    return cfg


def run_post_chain(cfg: Config, seeds_dir: str | Path, out_dir: str | Path, progress: bool = True,
                   demo: bool = True) -> dict:
    """Seeds of the training split -> pseudo masks (``<out_dir>/pseudo``, scored against the ground truth
    where it exists) -> a segmentation network (``<out_dir>/segment``) scored on the val split.

    ``demo=True`` skips refinements that need training (see :func:`demo_config`); ``demo=False`` runs
    ``cfg.pseudo`` / ``cfg.segment`` as they are.
    Returns ``{"mask_miou", "seg_miou", "pseudo", "segment"}`` (mIoU in %, None where no ground truth)."""
    from ..data import build_dataset
    from ..refine.pseudo import evaluate_masks, make_pseudo_masks
    from ..segment.train import train_segmentation

    cfg = demo_config(cfg) if demo else copy.deepcopy(cfg)
    out = Path(out_dir)
    split = cfg.segment.train_split or cfg.data.train_split
    cfg.pseudo.split = split
    masks = out / "pseudo"
    summary = make_pseudo_masks(cfg, seeds_dir, masks, progress=progress)
    ds = build_dataset(cfg.data, split)
    mask_miou = None
    if ds.mask_paths is not None and any(p is not None for p in ds.mask_paths):
        mask_miou = evaluate_masks(masks, ds, classes=cfg.eval.miou_classes)["miou"]
    if progress and mask_miou is not None:
        print(f"pseudo masks: mIoU {mask_miou:.2f} on {split}")
    cfg.segment.eval_at_end = True
    if cfg.segment.final_eval == "none":
        cfg.segment.final_eval = "quick"  # the chain reports a segmentation score
    metrics = train_segmentation(cfg, masks, out / "segment", resume=True, progress=progress)
    seg = metrics.get("val", {}).get("miou") if metrics.get("val") else None
    if progress and seg is not None:
        print(f"segmentation: mIoU {seg:.2f} on {cfg.segment.val_split or cfg.data.val_split}")
    return {"mask_miou": mask_miou, "seg_miou": seg, "pseudo": summary, "segment": metrics}
