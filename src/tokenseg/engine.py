"""Training engine: AdamW, warm-up + cosine, AMP, grad clipping, atomic checkpoints, exact resume,
DDP under ``torchrun``, val mAP, JSONL metrics and progress bars."""
from __future__ import annotations

import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .config import Config, apply_overrides, validate
from .data import WSSSDataset, build_dataset
from .data.transforms import ClassificationSet, build_eval_transform, build_train_transform
from .io import TokensegError, write_bytes_atomic
from .losses import contrastive_class_token_loss, multilabel_soft_margin
from .models import ClassTokenViT, build_model
from .models.convert import model_from_state, read_weights

CHECKPOINT_NAME = "checkpoint.pt"


# ----------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available (this rank's GPU under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TokensegError(f"device {name!r} requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, total: int, warmup: int, base: float, warmup_lr: float, min_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` then cosine decay to ``min_lr`` (per optimiser step)."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def lr_at_epoch(epoch: int, epochs: int, warmup_epochs: float, base: float, warmup_lr: float, min_lr: float) -> float:
    """The authors' schedule: timm's ``CosineLRScheduler`` stepped once per epoch *after* it
    (``lr_scheduler.step(epoch)``), so epoch ``e`` runs at the scheduler's value for ``t = max(e - 1, 0)``:
    epochs 0 and 1 both at ``warmup_lr`` (METHODS.md §16.4). The cosine runs over ``t / epochs``
    (timm's default, no warm-up prefix), its floor ``min_lr`` from ``epochs`` on."""
    t = max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + t * (base - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms) and on what the model's ``no_weight_decay()``
    names (timm's convention, which the authors' optimizer follows)."""
    skip_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip_names else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- losses
def compute_losses(model_out: dict, targets: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    m = cfg.model
    losses = {"cls": m.cls_loss_weight * multilabel_soft_margin(model_out["cls_logits"], targets)}
    if "patch_logits" in model_out:
        losses["patch"] = m.patch_loss_weight * multilabel_soft_margin(model_out["patch_logits"], targets)
    if m.cct_weight > 0 and "layer_cls_tokens" in model_out:
        layers = model_out["layer_cls_tokens"]
        if m.cct_layers > 0:
            layers = layers[-m.cct_layers:]
        losses["cct"] = m.cct_weight * contrastive_class_token_loss(layers, targets)
    losses["total"] = sum(losses.values())
    return losses


def decays_pos_embed(cfg: Config) -> bool:
    """The authors' weight-decay skip list is timm's {'pos_embed', 'cls_token'}: MCTformer+'s
    ``pos_embed_cls``/``pos_embed_pat`` are therefore decayed, V1/V2's ``pos_embed`` is not (§16.3)."""
    value = str(cfg.train.decay_pos_embed).lower()
    return cfg.model.method == "mctformer-plus" if value == "auto" else value == "true"


def uses_cct(cfg: Config) -> bool:
    return cfg.model.method == "mctformer-plus" and cfg.model.cct_weight > 0


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scaler, step: int, cfg: Config,
                    class_names: list[str], class_names_source: str = "checkpoint") -> None:
    """``class_names_source="default"`` marks names made up for a file that had none (converted authors'
    weights): a dataset with the same class count may then supply its own."""
    state = {
        "format": "tokenseg-checkpoint/1",
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "config": cfg.to_dict(),
        "class_names": list(class_names),
        "class_names_source": class_names_source,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def read_checkpoint(path: str | Path, allow_foreign: bool = False, allow_pickle: bool = False) -> dict:
    """Our checkpoint dict; with ``allow_foreign`` any dict is returned (the authors' layouts, which
    :func:`load_model_from_checkpoint` converts). Read tensors-only (``weights_only``) with an allow-list
    that covers our own checkpoints (config dicts, optimizer state, numpy RNG state) and the authors'
    ``args``; anything else needs ``allow_pickle``, since unpickling a file can run code."""
    path = Path(path)
    state = read_weights(path, allow_pickle)
    if allow_foreign and isinstance(state, dict):
        return state
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise TokensegError(f"{path}: not a tokenseg checkpoint (use `tokenseg convert` for authors' weights)")
    return state


def config_from_checkpoint(state: dict, overrides=()) -> Config:
    from .config import _merge

    cfg = Config()
    _merge(cfg, state["config"], "")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def load_state_checked(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Load a state dict, turning shape/key mismatches into a clear error naming the source."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch: {', '.join(wrong[:4])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:4])}")
        raise TokensegError(f"{source}: checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(sd)


def load_model_from_checkpoint(path: str | Path, overrides=(), num_heads: int | None = None
                               ) -> tuple[ClassTokenViT, Config, list[str]]:
    """Rebuild the model a checkpoint was trained with and load its weights (on the CPU).

    The authors' MCTformer-V1/V2/+ checkpoints are converted on the fly (see ``tokenseg convert``);
    ``num_heads`` is needed for them when the embedding width is not a multiple of 64. Their files hold
    no class names: the model's ``class_names_source`` is then ``default`` and a dataset with the same
    class count may supply its own names."""
    state = read_checkpoint(path, allow_foreign=True)
    if "config" not in state or "model" not in state:
        return model_from_state(state, str(path), overrides=overrides, path=path, num_heads=num_heads)
    cfg = config_from_checkpoint(state, overrides)
    names = list(state.get("class_names") or [])
    model_cfg = cfg.model
    pretrained, model_cfg.pretrained = model_cfg.pretrained, False  # weights come from the checkpoint
    model = build_model(model_cfg, num_classes=len(names))
    model_cfg.pretrained = pretrained
    load_state_checked(model, state["model"], str(path))
    model.class_names_source = state.get("class_names_source", "checkpoint")
    model.eval()
    return model, cfg, names


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------- evaluation
def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP (non-interpolated: mean precision at each positive), NaN for classes with no positive."""
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        pos = targets[:, c] > 0
        if not pos.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = pos[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps[c] = precision[hits].mean()
    return aps


@torch.no_grad()
def evaluate_map(model: torch.nn.Module, ds: WSSSDataset, img_size: int, device: torch.device,
                 batch_size: int = 32, num_workers: int = 0, progress: bool = False) -> dict:
    """Classification mAP on ``ds`` with the average of class-token and patch-token scores."""
    model.eval()
    loader = DataLoader(ClassificationSet(ds, build_eval_transform(img_size), deterministic_aug=False),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers)
    scores, targets = [], []
    for x, y, _ in tqdm(loader, desc="val mAP", leave=False, disable=not progress):
        out = _unwrap(model)(x.to(device))
        s = out["cls_logits"]
        if "patch_logits" in out:
            s = (s + out["patch_logits"]) / 2
        scores.append(s.float().cpu().numpy())
        targets.append(y.numpy())
    aps = average_precision(np.concatenate(scores), np.concatenate(targets))
    return {"map": float(np.nanmean(aps)) * 100 if np.isfinite(aps).any() else 0.0, "ap": aps.tolist()}


# ----------------------------------------------------------------------------- training
class _StopTraining(Exception):
    pass


def train(cfg: Config, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train a class-token model as ``cfg`` says; returns the checkpoint path.

    ``resume``: continue from ``<output_dir>/checkpoint.pt`` exactly where it stopped (same weights as
    an uninterrupted run on the CPU). ``on_step(step, losses)`` is called after every step (tests use it
    to simulate a kill)."""
    dinfo = init_distributed(resolve_device(cfg.train.device).type)
    device = resolve_device(cfg.train.device, dinfo.local_rank)
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")

    train_ds = build_dataset(cfg.data, cfg.data.train_split)
    if len(train_ds) == 0:
        raise TokensegError(f"split {cfg.data.train_split!r} has no images")
    tc = cfg.train
    if tc.batch_size % dinfo.world:
        raise TokensegError(f"train.batch_size={tc.batch_size} is not divisible by the {dinfo.world} DDP ranks")
    per_rank = tc.batch_size // dinfo.world
    steps_per_epoch = len(train_ds) // tc.batch_size
    if steps_per_epoch == 0:
        raise TokensegError(f"train.batch_size={tc.batch_size} exceeds the {len(train_ds)} training images")
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = build_model(cfg.model, train_ds.num_classes, decay_pos_embed=decays_pos_embed(cfg)).to(device)
    for blk in model.blocks:
        blk.attn.fused_attn = True  # never materialise attention while training
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, eps=1e-8)
    adtype = amp_dtype(tc.amp, device)
    scaler = torch.amp.GradScaler("cuda") if adtype == torch.float16 else None

    step = 0
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        load_state_checked(model, state["model"], str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if dinfo.is_main and progress:
            print(f"resuming from {ckpt_path} at step {step}/{total_steps}")
    elif resume and dinfo.is_main and progress:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")

    train_model: torch.nn.Module = model
    if dinfo.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        train_model = torch.compile(train_model)

    base_lr = tc.lr * tc.batch_size / tc.lr_base_batch
    min_lr = tc.min_lr  # DeiT scales the peak lr by batch/512 but not the floor
    warmup_steps = int(round(tc.warmup_epochs * steps_per_epoch))
    tset = ClassificationSet(train_ds, build_train_transform(tc.augment, cfg.model.img_size, tc.crop_scale, tc.color_jitter), seed=tc.seed)
    sampler = DistributedSampler(tset, num_replicas=dinfo.world, rank=dinfo.rank, shuffle=True, seed=tc.seed,
                                 drop_last=True)
    val_ds = None
    if tc.eval_every and dinfo.is_main and cfg.data.val_split:
        try:
            val_ds = build_dataset(cfg.data, cfg.data.val_split)
        except TokensegError as exc:
            print(f"note: no val mAP ({exc})")
    log_path = out_dir / "metrics.jsonl"
    want_cct = uses_cct(cfg)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and dinfo.is_main))
    t0 = time.time()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        tset.set_epoch(epoch)
        indices = list(sampler)[offset * per_rank: steps_per_epoch * per_rank]
        # a private generator: creating the loader must not draw from the global RNG (drop-path uses
        # it), or a run resumed mid-epoch would diverge from an uninterrupted one
        gen = torch.Generator().manual_seed(tc.seed * 100003 + epoch)
        loader = DataLoader(tset, batch_size=per_rank, sampler=indices, num_workers=cfg.data.num_workers,
                            drop_last=True, persistent_workers=False, pin_memory=device.type == "cuda",
                            generator=gen)
        train_model.train()
        for x, y, _ in loader:
            if tc.lr_schedule == "epoch":
                lr = lr_at_epoch(epoch, tc.epochs, tc.warmup_epochs, base_lr, tc.warmup_lr, min_lr)
            else:
                lr = lr_at(step, total_steps, warmup_steps, base_lr, tc.warmup_lr, min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=adtype, enabled=adtype is not None):
                out = train_model(x, return_layer_tokens=want_cct)
            losses = compute_losses(out, y, cfg)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(losses["total"]).backward()
                scaler.unscale_(optimizer)
            else:
                losses["total"].backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            if not math.isfinite(values["total"]):
                raise TokensegError(f"loss became {values['total']} at step {step}; lower train.lr or enable grad_clip")
            if dinfo.is_main:
                bar.update()
                bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}")
                if step % 10 == 0 or step == total_steps:
                    _append_jsonl(log_path, {"step": step, "epoch": epoch, "lr": lr, **values,
                                             "time": round(time.time() - t0, 2)})
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    save_checkpoint(ckpt_path, model, optimizer, scaler, step, cfg, train_ds.class_names)
            if on_step is not None:
                on_step(step, values)
            if step >= total_steps:
                break
        epoch_done = step % steps_per_epoch == 0 or step >= total_steps
        if epoch_done and dinfo.is_main:
            save_checkpoint(ckpt_path, model, optimizer, scaler, step, cfg, train_ds.class_names)
            ep = (step - 1) // steps_per_epoch + 1
            if val_ds is not None and tc.eval_every and (ep % tc.eval_every == 0 or step >= total_steps):
                res = evaluate_map(model, val_ds, cfg.model.img_size, device, num_workers=cfg.data.num_workers)
                _append_jsonl(log_path, {"step": step, "epoch": ep, "val_map": res["map"]})
                if progress:
                    bar.write(f"epoch {ep}: val mAP {res['map']:.1f}")
    bar.close()
    if dinfo.world > 1:
        dist.barrier()
    return ckpt_path


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
