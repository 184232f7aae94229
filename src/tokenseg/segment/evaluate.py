"""Segmentation inference and evaluation (``tokenseg segment evaluate``; METHODS.md §7.4, §13.3).

Inference: for each scale (and its flip) the softmax probabilities are resized to the image and
merged by ``max`` (MCTformer: max-pooled over scales) or ``mean``; optionally refined by DenseCRF
(MCTformer's segmentation CRF: t=10, Gaussian 4/3, bilateral 83/5/3); label = argmax.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, SegmentConfig
from ..core.errors import TokensegError
from ..core.masks import save_palette_png
from ..core.files import write_json_atomic
from ..core.metrics import confusion_matrix, scores_from_confusion
from ..core.progress import progress_bar
from .deeplab import build_segmenter
from ..data.transforms import normalise_array as normalise_image
from ..core.device import amp_dtype as autocast_dtype
from ..fit.state import kind_of


def read_segmentation_checkpoint(path: str | Path) -> dict:
    """A tokenseg checkpoint (segmentation or classification) as a dict with a 'model' entry."""
    from ..checkpoint import read_checkpoint

    state = read_checkpoint(path, allow_foreign=True)
    if "model" not in state:
        raise TokensegError(f"{path}: not a tokenseg checkpoint")
    return state


def is_segmentation_checkpoint(state: dict) -> bool:
    return kind_of(state) == "segmenter"


def load_segmenter(path: str | Path, device: str | torch.device = "cpu"):
    """(model, cfg, class_names) of a segmentation checkpoint; the network is rebuilt from the saved
    ``segment`` config (without downloading weights: they come from the checkpoint)."""
    from ..config import Config, _merge

    state = read_segmentation_checkpoint(path)
    if not is_segmentation_checkpoint(state):
        raise TokensegError(f"{path}: not a segmentation checkpoint (this is a classification checkpoint?)")
    cfg = Config()
    try:
        _merge(cfg, state["config"], "")
    except TokensegError as exc:
        raise TokensegError(f"{path}: saved config does not fit this tokenseg version ({exc})") from exc
    names = list(state.get("class_names") or [])
    sc = SegmentConfig(**{**vars(cfg.segment), "pretrained": False, "weights": ""})
    model = build_segmenter(sc, len(names) + 1)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise TokensegError(f"{path}: weights do not fit the saved network ({str(exc)[:300]})") from exc
    return model.to(device).eval(), cfg, names


@torch.no_grad()
def infer_probs(model, image: np.ndarray, scales: Sequence[float] = (1.0,), flip: bool = False, merge: str = "max",
                device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> torch.Tensor:
    """(L, H, W) float32 class probabilities (CPU) for an (H, W, 3) uint8 image."""
    device = torch.device(device)
    H, W = image.shape[:2]
    x0 = torch.from_numpy(normalise_image(image))[None].to(device)
    acc = None
    n = 0
    for s in scales:
        size = (max(1, int(round(H * s))), max(1, int(round(W * s))))
        x = x0 if size == (H, W) else F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
        xs = torch.cat([x, x.flip(-1)]) if flip else x
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(xs)
        logits = logits.float()
        if flip:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        if logits.shape[-2:] != (H, W):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        p = logits.softmax(1)
        for k in range(p.shape[0]):
            if acc is None:
                acc = p[k].clone()
            elif merge == "max":
                acc = torch.maximum(acc, p[k])
            else:
                acc += p[k]
            n += 1
    if merge != "max":
        acc = acc / n
    else:
        acc = acc / acc.sum(0, keepdim=True).clamp_min(1e-8)
    return acc.cpu()


def predict_mask(model, image: np.ndarray, scales=(1.0,), flip=False, merge="max", crf: bool = False,
                 crf_preset: str = "mctformer-seg", crf_backend: str = "auto", device="cpu", amp=None) -> np.ndarray:
    """(H, W) uint8 label mask for one image."""
    probs = infer_probs(model, image, scales, flip, merge, device, amp).numpy()
    if crf:
        from ..core.crf import CRF_PRESETS, dense_crf

        probs = dense_crf(image, probs, CRF_PRESETS[crf_preset], crf_backend)
    return probs.argmax(0).astype(np.uint8)


def evaluate_segmentation(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
                          scales: Sequence[float] | None = None, flip: bool | None = None,
                          crf: bool | None = None, save_dir: str | Path | None = None, progress: bool = True,
                          model=None, class_names: list[str] | None = None, dataset=None) -> dict:
    """Python API of ``tokenseg segment evaluate``: mIoU (%) of a segmentation checkpoint on a split
    (default ``segment.val_split`` or ``data.val_split``) with multi-scale + flip and optional CRF.
    ``save_dir``: also write the predicted masks there (palette PNGs)."""
    from ..data import build_dataset

    from ..core.device import all_reduce_sum, setup

    sc = cfg.segment
    dinfo, device = setup(sc.device)  # under torchrun every rank scores its share of the images
    if save_dir:
        from ..data.guard import refuse_inside_dataset

        refuse_inside_dataset(save_dir, cfg, "segment evaluate --save-masks")
    if model is None:
        ckpt = Path(checkpoint) if checkpoint else Path(cfg.output_dir) / "segment" / "checkpoint.pt"
        model, _, class_names = load_segmenter(ckpt, device)
    was_training = model.training
    model.eval()
    ds = dataset if dataset is not None else build_dataset(
        cfg.data, split or sc.val_split or cfg.data.val_split,
        "config key segment.val_split (empty: data.val_split) or the --split option")
    if class_names is not None and list(class_names) != list(ds.class_names):
        raise TokensegError(f"the model was trained on classes {class_names}, the dataset has {ds.class_names}")
    if not ds.has_masks:
        raise TokensegError(f"{ds.name}: some images have no ground-truth mask; cannot evaluate")
    scales = list(scales if scales is not None else sc.eval_scales)
    flip = sc.eval_flip if flip is None else flip
    crf = sc.eval_crf if crf is None else crf
    amp = autocast_dtype(sc.amp, device)
    n = ds.num_classes + 1
    conf = np.zeros((n, n), dtype=np.int64)
    for i in progress_bar(range(dinfo.rank, len(ds), dinfo.world), desc="segment eval", unit="img",
                          disable=not (progress and dinfo.is_main), leave=False):
        image = np.asarray(ds.load_image(i), dtype=np.uint8)
        gt = ds.load_mask(i)
        pred = predict_mask(model, image, scales, flip, sc.eval_merge, crf, sc.crf_preset, "auto", device, amp)
        if gt.shape != pred.shape:
            raise TokensegError(f"{ds.ids[i]}: ground truth {gt.shape} and image {pred.shape} sizes differ")
        conf += confusion_matrix(pred, gt, n)
        if save_dir:
            save_palette_png(Path(save_dir) / f"{ds.ids[i]}.png", pred)
    if was_training:
        model.train()
    conf = all_reduce_sum(conf, dinfo)
    s = scores_from_confusion(conf, cfg.eval.miou_classes)
    names = ["background"] + list(ds.class_names)
    res = {
        "miou": s["miou"] * 100,
        "iou": {k: (float(v) * 100 if np.isfinite(v) else None) for k, v in zip(names, s["iou"])},
        "fp": s["fp"] * 100, "fn": s["fn"] * 100, "pixel_acc": s["pixel_acc"] * 100,
        "images": len(ds), "split": ds.name, "scales": scales, "flip": flip, "crf": crf,
        "miou_rule": s["miou_rule"],
    }
    return res


def save_eval(path: str | Path, res: dict) -> None:
    write_json_atomic(path, res)
