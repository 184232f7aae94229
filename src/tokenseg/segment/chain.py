"""Seeds -> pseudo masks -> segmentation network in one call (used by ``tokenseg demo``)."""
from __future__ import annotations

import copy
from pathlib import Path

from ..config import Config

# A segmentation network small enough to train on ~2000 96×96 images in about a minute on two CPU
# cores: a 1.2 M-parameter ResNet-10-T up to its third stage (stride 8), a two-branch ASPP, random
# init, AdamW, 64-px crops, 3 epochs.
DEMO_SEGMENT = {
    "arch": "deeplabv2",
    "backbone": "resnet10t",
    "backbone_kwargs": {},
    "pretrained": False,
    "weights": "",
    "output_stride": 8,
    "feature_stage": 3,
    "aspp_dilations": [1, 3],
    "epochs": 3,
    "max_steps": 0,
    "batch_size": 16,
    "optimizer": "adamw",  # from scratch; the papers' SGD recipe needs ImageNet weights and more steps
    "lr": 2e-3,
    "head_lr_mult": 1.0,
    "weight_decay": 1e-4,
    "crop_size": 64,
    "scale_range": [0.7, 1.3],
    "eval_scales": [1.0],
    "eval_flip": False,
    "eval_crf": False,
    "num_workers": 0,
}


def demo_config(cfg: Config) -> Config:
    """A copy of ``cfg`` with the small demo segmentation network (:data:`DEMO_SEGMENT`)."""
    cfg = copy.deepcopy(cfg)
    for k, v in DEMO_SEGMENT.items():
        setattr(cfg.segment, k, copy.deepcopy(v))
    if cfg.pseudo.refine != "none":
        cfg.pseudo.refine = "none"  # AffinityNet / attention walks do not fit the demo's budget
    if cfg.pseudo.crf:
        from ..refine.crf import resolve_backend

        if resolve_backend(cfg.pseudo.crf_backend) == "torch":
            print("demo: pydensecrf is not installed; pseudo masks without CRF (pip install \"tokenseg[crf]\")")
            cfg.pseudo.crf = False
    return cfg


def run_post_chain(cfg: Config, seeds_dir: str | Path, out_dir: str | Path, progress: bool = True,
                   demo: bool = True) -> dict:
    """Seeds of the training split -> pseudo masks (``<out_dir>/pseudo``, scored against the ground truth
    where it exists) -> a segmentation network (``<out_dir>/segment``) scored on the val split.

    ``demo=True`` swaps in :data:`DEMO_SEGMENT` (small, random init, CPU-friendly) and skips refinements
    that need training; ``demo=False`` runs ``cfg.pseudo`` / ``cfg.segment`` as they are.
    Returns ``{"mask_miou", "seg_miou", "pseudo", "segment"}`` (mIoU in %, None where no ground truth)."""
    from ..data import build_dataset
    from ..refine.pseudo import evaluate_masks, make_pseudo_masks
    from .train import train_segmentation

    cfg = demo_config(cfg) if demo else copy.deepcopy(cfg)
    out = Path(out_dir)
    split = cfg.segment.train_split or cfg.data.train_split
    cfg.pseudo.split = split
    masks = out / "pseudo"
    summary = make_pseudo_masks(cfg, seeds_dir, masks, progress=progress)
    ds = build_dataset(cfg.data, split)
    mask_miou = None
    if ds.mask_paths is not None and any(p is not None for p in ds.mask_paths):
        mask_miou = evaluate_masks(masks, ds)["miou"]
    if progress and mask_miou is not None:
        print(f"pseudo masks: mIoU {mask_miou:.2f} on {split}")
    cfg.segment.eval_at_end = True
    metrics = train_segmentation(cfg, masks, out / "segment", resume=True, progress=progress)
    seg = metrics.get("val", {}).get("miou") if metrics.get("val") else None
    if progress and seg is not None:
        print(f"segmentation: mIoU {seg:.2f} on {cfg.segment.val_split or cfg.data.val_split}")
    return {"mask_miou": mask_miou, "seg_miou": seg, "pseudo": summary, "segment": metrics}
