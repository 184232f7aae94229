"""Training a segmentation network on pseudo masks (``tokenseg segment train``; METHODS.md §7.4).

The papers' recipe: SGD (momentum 0.9), poly learning rate (power 0.9) per step, 10× learning rate on
the head, random scale 0.7–1.3, horizontal flip, random crop 321 (image padded with the mean colour,
mask with 255), cross-entropy ignoring 255. AMP on CUDA. A checkpoint is written atomically at the end
of every epoch (and every ``checkpoint_every`` steps); ``resume=True`` continues from it, visiting the
remaining batches of the interrupted epoch in the same order.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import Config, SegmentConfig
from ..core import optim
from ..core.device import AmpStep, fixed_shapes, resolve_device
from ..core.errors import TokensegError
from ..core.files import append_jsonl, write_json_atomic
from ..core.locks import job_lock
from ..core.masks import IGNORE_INDEX
from ..core.weights import read_weights
from ..data.crops import CropDataset
from ..fit import Task, epoch_order, finished_step, fit, kind_of, poly_lr, restore, save_state, start_log
from .deeplab import build_segmenter


def save_segmentation_checkpoint(path: Path, model, optimizer, scaler, step: int, total: int, cfg: Config,
                                 class_names: list[str], extra: dict | None = None) -> None:
    """A segmentation network's checkpoint (:mod:`tokenseg.fit.state`'s format, kind ``segmenter``)."""
    save_state(path, "segmenter", step, {"model": model, "optimizer": optimizer, "scaler": scaler},
               total_steps=total, config=cfg.to_dict(), class_names=list(class_names), **(extra or {}))


def segment_paths(cfg: Config, masks_dir=None, out_dir=None) -> tuple[Path, Path]:
    masks = Path(masks_dir or cfg.segment.masks or Path(cfg.output_dir) / "pseudo")
    out = Path(out_dir or Path(cfg.output_dir) / "segment")
    return masks, out


# segment.* keys that cannot change the trained weights (where it runs, how often it saves, the final scoring)
SEGMENT_FREE = ("segment.device", "segment.num_workers", "segment.checkpoint_every", "segment.eval_at_end",
                "segment.eval_scales", "segment.eval_flip", "segment.eval_merge", "segment.eval_crf",
                "segment.crf_preset", "segment.val_split", "segment.masks")


def previous_segmentation(ckpt_path: Path, cfg: Config, masks: Path, overwrite: bool) -> dict | None:
    """The segmentation checkpoint a run into its folder continues, or None. A classifier's checkpoint
    there, or one trained with other settings or masks, is an error naming what differs."""
    if overwrite or not ckpt_path.is_file():
        return None
    state = read_weights(ckpt_path)  # tensors-only: a planted pickle cannot run code
    if kind_of(state) != "segmenter":
        what = state.get("format") if isinstance(state, dict) else None
        raise TokensegError(f"{ckpt_path}: holds {'a ' + what if what else 'another'} checkpoint, not a segmentation "
                            f"network's (a classifier's output_dir?): write the segmentation run to its own "
                            f"folder (--out), a folder holds one kind of run")
    from ..core.resume import config_differences, differing_settings_error

    diffs = config_differences(state.get("config") or {}, cfg.to_dict(), ("segment", "data.format"), SEGMENT_FREE)
    if state.get("masks") and os.path.abspath(state["masks"]) != os.path.abspath(masks):
        diffs.append(f"--masks: {state['masks']!r} -> {str(masks)!r}")
    if diffs:
        raise differing_settings_error(ckpt_path.parent, f"a segmentation checkpoint (step {state.get('step')})",
                                       diffs, "--out")
    return state


def train_segmentation(cfg: Config, masks_dir: str | Path | None = None, out_dir: str | Path | None = None,
                       resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Python API of ``tokenseg segment train``: train ``cfg.segment`` on the PNG masks in ``masks_dir``
    (default ``segment.masks`` or ``<output_dir>/pseudo``) for the images of ``segment.train_split``
    (default ``data.train_split``) that have a mask. Writes ``<out_dir>/checkpoint.pt`` (default
    ``<output_dir>/segment``), ``config.yaml``, ``log.jsonl`` and ``metrics.json``; returns the metrics.
    A folder holding a checkpoint of the same settings is continued from it (as ``resume``); other
    settings stop naming the keys unless ``overwrite``. The output folder is locked while training."""
    from ..data.guard import refuse_inside_dataset

    masks, out = segment_paths(cfg, masks_dir, out_dir)
    if not masks.is_dir():
        raise TokensegError(f"{masks}: pseudo-mask folder not found (run `tokenseg pseudo` or pass --masks)")
    refuse_inside_dataset(out, cfg, "segment train --out")
    with job_lock(out, "tokenseg segment train"):
        return _train_segmentation(cfg, masks, out, resume, progress, overwrite)


def _train_segmentation(cfg: Config, masks: Path, out: Path, resume: bool, progress: bool,
                        overwrite: bool = False) -> dict:
    from ..data import build_dataset

    sc: SegmentConfig = cfg.segment
    split = sc.train_split or cfg.data.train_split
    ds = build_dataset(cfg.data, split, "config key segment.train_split (empty: data.train_split) or the "
                                        "--split option")
    indices = [i for i, k in enumerate(ds.ids) if (masks / f"{k}.png").is_file()]
    if not indices:
        raise TokensegError(f"{masks}: no mask matches an image of split {split!r} ({len(ds)} images)")
    if progress and len(indices) < len(ds):
        print(f"segment: {len(ds) - len(indices)} of {len(ds)} images of {split!r} have no mask; training on "
              f"{len(indices)}")
    num_classes = ds.num_classes + 1
    device = resolve_device(sc.device)
    torch.manual_seed(sc.seed)
    model = build_segmenter(sc, num_classes).to(device)
    bs = min(sc.batch_size, len(indices))
    steps_per_epoch = max(len(indices) // bs, 1)
    total = sc.max_steps if sc.max_steps > 0 else sc.epochs * steps_per_epoch
    if total <= 0:
        raise TokensegError("segment.epochs (or segment.max_steps) must be positive")
    groups = [{"params": model.backbone_parameters(), "lr": sc.lr, "base_lr": sc.lr},
              {"params": model.head_parameters(), "lr": sc.lr * sc.head_lr_mult, "base_lr": sc.lr * sc.head_lr_mult}]
    if sc.optimizer == "adamw":
        optimizer = optim.adamw(groups, cfg.train.fused_optimizer, lr=sc.lr, weight_decay=sc.weight_decay)
    else:
        optimizer = optim.sgd(groups, cfg.train.fused_optimizer,
                              lr=sc.lr, momentum=sc.momentum, weight_decay=sc.weight_decay)
    amp = AmpStep(sc.amp, device, optimizer)
    fixed_shapes(device)  # crops of segment.crop_size

    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    log_path = out / "log.jsonl"
    state = previous_segmentation(ckpt_path, cfg, masks, overwrite)
    step = 0
    if state is not None:
        step = restore(state, model, optimizer, amp.scaler, str(ckpt_path))
        if progress:
            how = "" if resume else " (same settings; --overwrite starts over)"
            print(f"segment: resuming from {ckpt_path} at step {step}/{total}{how}")
    elif resume and progress:
        print(f"segment: no checkpoint at {ckpt_path} yet; starting from scratch")
    cfg.save(out / "config.yaml")

    train_set = CropDataset(ds, indices, masks, sc.crop_size, sc.scale_range, sc.flip, sc.seed)
    workers = cfg.data.num_workers if sc.num_workers < 0 else sc.num_workers
    names = list(ds.class_names)

    def batches(epoch: int, offset: int) -> DataLoader:
        train_set.epoch = epoch
        order = epoch_order(len(indices), bs, steps_per_epoch, sc.seed, epoch, offset)
        return DataLoader(train_set, batch_size=bs, sampler=order, num_workers=workers, drop_last=True,
                          pin_memory=device.type == "cuda")

    def loss(logits, batch, at):
        y = batch[1]
        # the mean over labelled pixels without asking the device whether there are any: a crop of 255 only
        # gives 0 (and no gradient)
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum") \
            / (y != IGNORE_INDEX).sum().clamp_min(1), {}

    task = Task(
        kind="segmenter", name="segment train", model=model, optimizer=optimizer, amp=amp,
        schedule=lambda step, epoch: poly_lr(step, total, 1.0, sc.poly_power), steps_per_epoch=steps_per_epoch,
        total_steps=total, batches=batches, forward=lambda batch, at: model(batch[0]), loss=loss,
        checkpoint=ckpt_path, checkpoint_every=sc.checkpoint_every,
        save_meta=lambda: {"config": cfg.to_dict(), "class_names": names, "masks": str(masks), "train_split": split},
        oom=(f"segmentation step {{step}} (a batch of {bs} crops of {sc.crop_size}²)",
             "segment.batch_size or segment.crop_size (segment.amp=bf16 halves the activations)"),
        nonfinite_hint="lower segment.lr", log_path=log_path,
        after_epoch=lambda end: append_jsonl(log_path, {"epoch": end.epoch, "step": end.step, "loss": end.mean_loss,
                                                        "time_s": end.seconds}),
        progress=progress)
    start_log(task, step)
    step = fit(task, step, finished_step(state))
    metrics = {"checkpoint": str(ckpt_path), "steps": step, "train_images": len(indices),
               "train_split": split, "masks": str(masks)}
    if sc.eval_at_end and sc.final_eval != "none":
        from .evaluate import evaluate_segmentation

        val_split = sc.val_split or cfg.data.val_split
        try:
            val = build_dataset(cfg.data, val_split)
        except TokensegError as exc:
            val = None
            metrics["val_error"] = str(exc)
        if val is not None and val.has_masks:
            full = sc.final_eval == "full"
            scales, flip = (list(sc.eval_scales), sc.eval_flip) if full else ([1.0], False)
            if progress:
                print(f"segment train: scoring {len(val)} images of split {val_split!r} at scales {scales}"
                      f"{' + flip' if flip else ''} (segment.final_eval={sc.final_eval}; "
                      f"{'quick' if full else 'full'} or none instead, or --no-eval)", flush=True)
            metrics["val"] = evaluate_segmentation(cfg, model=model, class_names=names, dataset=val,
                                                   progress=progress, scales=scales, flip=flip,
                                                   crf=sc.eval_crf if full else False)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics

