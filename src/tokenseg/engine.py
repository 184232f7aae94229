"""The training loop every method shares: optimizer and schedule (AdamW + warm-up/cosine or SGD + poly),
AMP, gradient clipping, atomic checkpoints, exact resume, DDP under ``torchrun``, sharded val mAP, JSONL
metrics (+ optional TensorBoard) and progress.

What is method-specific — the model, the views of a sample, the forward, the losses, the parameter
groups — comes from the :class:`~tokenseg.methods.Method` that ``model.method`` names.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, config_from_checkpoint, load_model_from_checkpoint,
                         read_checkpoint, save_checkpoint)
from .config import Config
from .core import optim
from .core.device import AmpStep, DistInfo, amp_dtype, barrier, fixed_shapes, init_distributed, resolve_device, setup
from .core.errors import TokensegError
from .core.files import append_jsonl
from .core.locks import job_lock
from .core.progress import progress_bar
from .core.resume import config_differences, differing_settings_error
from .core.weights import load_state_checked, unwrap
from .data import WSSSDataset, build_dataset
from .data.guard import refuse_inside_dataset
from .data.transforms import ClassificationSet, TrainSet, build_eval_transform
from .fit import (LOG_EVERY, At, Task, epoch_generator, finished_step, fit, kind_of, lr_at, lr_at_epoch, poly_lr,
                  restore, start_log)
from .fit.state import TITLES
from .methods import Method, StepContext, get_method

__all__ = ["train", "evaluate_map", "average_precision", "lr_at", "lr_at_epoch", "poly_lr", "build_optimizer", "LOG_EVERY",
           "CHECKPOINT_NAME", "load_model_from_checkpoint", "read_checkpoint", "save_checkpoint",
           "config_from_checkpoint", "load_state_checked", "resolve_device", "init_distributed", "amp_dtype",
           "DistInfo"]


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(method: Method, model: torch.nn.Module, cfg: Config, steps_per_epoch: int, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, Callable[[int, int], float]]:
    """The method's parameter groups in its optimizer; returns it and ``lr(step, epoch)`` (before each
    group's ``lr_mult``). ``train.optimizer=auto`` takes the method's choice."""
    tc = cfg.train
    kind = method.optimizer if tc.optimizer == "auto" else {"adamw": "adamw-cosine", "sgd": "sgd-poly"}[tc.optimizer]
    groups = [g for g in method.param_groups(unwrap(model), cfg) if g["params"]]
    base_lr = tc.lr * tc.batch_size / tc.lr_base_batch
    if kind == "sgd-poly":
        optimizer = optim.sgd(groups, tc.fused_optimizer, lr=base_lr, momentum=tc.momentum,
                              weight_decay=tc.weight_decay)
        return optimizer, lambda step, epoch: poly_lr(step, total_steps, base_lr, tc.poly_power)
    optimizer = optim.adamw(groups, tc.fused_optimizer, lr=base_lr, eps=1e-8)
    warmup_steps = int(round(tc.warmup_epochs * steps_per_epoch))
    if tc.lr_schedule in ("epoch", "epoch_ahead"):
        ahead = tc.lr_schedule == "epoch_ahead"
        return optimizer, lambda step, epoch: lr_at_epoch(epoch, tc.epochs, tc.warmup_epochs, base_lr, tc.warmup_lr,
                                                          tc.min_lr, ahead)
    # DeiT scales the peak lr by batch/512 but not the floor
    return optimizer, lambda step, epoch: lr_at(step, total_steps, warmup_steps, base_lr, tc.warmup_lr, tc.min_lr)


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
                 batch_size: int = 32, num_workers: int = 0, progress: bool = False, method: Method | None = None,
                 dinfo: DistInfo | None = None) -> dict:
    """Classification mAP on ``ds`` with the method's class scores. Under DDP every rank scores its
    shard and the scores are gathered (no rank waits on another's whole pass)."""
    dinfo = dinfo or DistInfo()
    scorer = method.class_scores if method is not None and method.class_scores else _default_scores
    net = unwrap(model)
    was_training = net.training
    net.eval()
    shard = list(range(dinfo.rank, len(ds), dinfo.world))
    loader = DataLoader(ClassificationSet(ds, build_eval_transform(img_size), deterministic_aug=False),
                        batch_size=batch_size, sampler=shard, num_workers=num_workers)
    scores, targets, index = [], [], []
    for x, y, i in progress_bar(loader, desc="val mAP", leave=False, disable=not progress):
        scores.append(scorer(net, x.to(device)).float().cpu().numpy())
        targets.append(y.numpy())
        index.append(i.numpy())
    C = ds.num_classes
    local = (np.concatenate(scores) if scores else np.zeros((0, C)), np.concatenate(targets) if targets else
             np.zeros((0, C)), np.concatenate(index) if index else np.zeros(0, np.int64))
    if dinfo.world > 1:
        parts = [None] * dinfo.world
        dist.all_gather_object(parts, local)
        local = tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
    order = np.argsort(local[2], kind="stable")
    aps = average_precision(local[0][order], local[1][order])
    net.train(was_training)
    return {"map": float(np.nanmean(aps)) * 100 if np.isfinite(aps).any() else 0.0, "ap": aps.tolist()}


def _default_scores(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)["cls_logits"]


# ----------------------------------------------------------------------------- training
# the settings that shape a classifier's weights (a resumed run must share them), and the keys under them
# that cannot change the weights (where it runs, what it logs, how often it saves or scores)
TRAIN_SETTINGS = ("train", "model", "data.format", "data.train_split", "data.synthetic")
TRAIN_FREE = ("train.device", "train.tensorboard", "train.checkpoint_every", "train.eval_every", "train.keep_best",
              "train.compile", "train.fused_optimizer")


def train(cfg: Config, resume: bool = False, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, overwrite: bool = False) -> Path:
    """Train the method ``cfg.model.method`` as ``cfg`` says; returns the checkpoint path.

    A folder that holds a checkpoint is continued from it exactly where it stopped (same weights as an
    uninterrupted run on the CPU) when it was trained with the same settings, and refused naming the
    differing keys otherwise; ``overwrite`` starts over. ``resume`` only says that a checkpoint is
    expected. ``on_step(step, losses)`` is called after every step (tests use it to simulate a kill).
    The output folder is locked: a second run into it stops with this one's PID."""
    refuse_inside_dataset(cfg.output_dir, cfg, "output_dir")
    with job_lock(cfg.output_dir, "tokenseg train"):
        return _train(cfg, resume, progress, on_step, overwrite)


def train_warnings(cfg: Config, method: Method) -> list[str]:
    """Settings that run but are rarely meant: a paper recipe from random weights, an lr that never
    leaves its warm-up."""
    out = []
    own = getattr(cfg, method.section, None) if method.section else None
    backbone = getattr(own, "backbone", "") or cfg.model.backbone
    custom = cfg.model.backbone_kwargs or getattr(own, "backbone_kwargs", None) or cfg.model.stem != "patch"
    if cfg.model.pretrained is False and not custom:
        from .core.hub import timm_sources

        try:
            repo, url = timm_sources(backbone)
        except Exception:  # not a timm name: nothing to point at
            repo, url = "", ""
        preset = _preset_weights(cfg.name)
        if preset or repo or url:
            file = (f"/path/to/{Path(preset).name}" if preset else f"/path/to/{Path(url).name}" if url else
                    f"FILE (model.safetensors of https://huggingface.co/{repo})")
            out.append(f"model.pretrained is false: {backbone} starts from random weights, but the {cfg.name} "
                       f"recipe follows a paper that starts from pretrained weights; from scratch it learns "
                       f"little. Give them with model.pretrained={file}" +
                       ("" if preset else " or model.pretrained=true (a download)") +
                       "; for a from-scratch run on purpose use the small recipes (presets demo, photos-scratch)")
    kind = method.optimizer if cfg.train.optimizer == "auto" else cfg.train.optimizer
    warm = cfg.train.warmup_epochs
    if kind.startswith("adamw") and warm > 0 and cfg.train.epochs <= warm:
        out.append(f"train.epochs={cfg.train.epochs} <= train.warmup_epochs={cfg.train.warmup_epochs:g}: the "
                   f"learning rate stays in its warm-up ramp for the whole run and never reaches train.lr; "
                   f"lower train.warmup_epochs (e.g. train.warmup_epochs={max(cfg.train.epochs // 5, 0)})")
    return out


def _preset_weights(name: str) -> str:
    """The weights file a shipped preset of that name points ``model.pretrained`` at ("" if none)."""
    from .config import available_presets, load_config

    if name not in available_presets():
        return ""
    value = load_config(name).model.pretrained
    return value if isinstance(value, str) else ""


def previous_state(ckpt_path: Path, cfg: Config, method: Method, overwrite: bool) -> dict | None:
    """The checkpoint a run into ``output_dir`` continues, or None (none there, or ``overwrite``). One of
    another kind (a segmentation network) or made with other settings is an error naming what differs."""
    if overwrite or not ckpt_path.is_file():
        return None
    state = read_checkpoint(ckpt_path)
    if kind_of(state) != "classifier":
        found = TITLES.get(kind_of(state)) or f"a {state.get('kind') or state.get('format')}"
        raise TokensegError(f"{ckpt_path}: holds {found} checkpoint, not a "
                            f"{method.name} classifier: give the classifier its own output_dir (a folder holds "
                            f"one kind of run)")
    keys = TRAIN_SETTINGS + tuple(s for s in (method.section, *method.uses_sections) if s)
    diffs = config_differences(state.get("config") or {}, cfg.to_dict(), keys, TRAIN_FREE)
    if diffs:
        raise differing_settings_error(ckpt_path.parent, f"a checkpoint (step {state.get('step')})", diffs,
                                       "output_dir")
    return state


def _train(cfg: Config, resume: bool, progress: bool, on_step, overwrite: bool = False) -> Path:
    method = get_method(cfg.model.method)
    if not method.trainable:
        raise TokensegError(f"{method.name} needs no training: run `tokenseg maps {method.name} ...` directly")
    dinfo, device = setup(cfg.train.device)
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    state = previous_state(ckpt_path, cfg, method, overwrite)
    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.yaml")

    train_ds = build_dataset(cfg.data, cfg.data.train_split, "config key data.train_split")
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

    if dinfo.is_main:
        for line in train_warnings(cfg, method):
            print(f"tokenseg: warning: {line}", file=sys.stderr, flush=True)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = method.build(cfg, train_ds.num_classes).to(device)
    optimizer, lr_fn = build_optimizer(method, model, cfg, steps_per_epoch, total_steps)
    amp = AmpStep(tc.amp, device, optimizer, tc.grad_clip, model.parameters())
    scaler = amp.scaler
    fixed_shapes(device)  # training views are crops of one size

    step = 0
    log_path = out_dir / "metrics.jsonl"
    if state is not None:
        step = restore(state, model, optimizer, scaler, str(ckpt_path))
        if dinfo.is_main and progress:
            how = "" if resume else " (same settings; --overwrite starts over)"
            print(f"resuming from {ckpt_path} at step {step}/{total_steps}{how}")
    elif dinfo.is_main:
        if resume and progress:
            print(f"no checkpoint at {ckpt_path} yet; starting from scratch")
        if (out_dir / BEST_NAME).exists():
            (out_dir / BEST_NAME).unlink()  # a fresh run: the best epoch starts anew
    finished = finished_step(state)
    del state

    train_model: torch.nn.Module = model
    if dinfo.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.dynamic_graph)
    if tc.compile:
        train_model = torch.compile(train_model)

    extras = method.extras(cfg, train_ds) if method.extras is not None else None
    tset = TrainSet(train_ds, method.views(cfg), seed=tc.seed, extras=extras)
    sampler = DistributedSampler(tset, num_replicas=dinfo.world, rank=dinfo.rank, shuffle=True, seed=tc.seed,
                                 drop_last=True)
    val_ds = None
    if tc.eval_every and cfg.data.val_split:
        try:
            val_ds = build_dataset(cfg.data, cfg.data.val_split, "config key data.val_split")
        except TokensegError as exc:
            if dinfo.is_main:
                print(f"note: no val mAP ({exc})")
    board = _TensorBoard(out_dir, tc.tensorboard and dinfo.is_main)
    best_map = _best_so_far(out_dir / BEST_NAME) if (tc.keep_best and step > 0) else -1.0

    def batches(epoch: int, offset: int):
        """The epoch's batches of this rank from the ``offset``-th on (DistributedSampler's order: the
        permutation seeded ``train.seed + epoch``, sharded)."""
        sampler.set_epoch(epoch)
        tset.set_epoch(epoch)
        indices = list(sampler)[offset * per_rank: steps_per_epoch * per_rank]
        return DataLoader(tset, batch_size=per_rank, sampler=indices, num_workers=cfg.data.num_workers,
                          drop_last=True, persistent_workers=False, pin_memory=device.type == "cuda",
                          generator=epoch_generator(tc.seed, epoch))

    def context(at: At) -> StepContext:
        return StepContext(epoch=at.epoch, step=at.step, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           world=dinfo.world, rank=dinfo.rank)

    def loss(out, batch, at: At):
        terms = method.loss(out, batch, context(at), cfg)
        return sum(v for k, v in terms.items() if not k.startswith("_")), terms

    def validate_epoch(step: int) -> None:
        """Val mAP of the epoch that ends at ``step`` (if due), its log line and the best-checkpoint choice;
        the log line is written last, so its presence means the epoch's decisions are on disk."""
        nonlocal best_map
        ep = (step - 1) // steps_per_epoch + 1  # epochs count from 1 in every message and log line
        if val_ds is None or not tc.eval_every or not (ep % tc.eval_every == 0 or step >= total_steps):
            return
        res = evaluate_map(model, val_ds, cfg.model.img_size, device, num_workers=cfg.data.num_workers,
                           method=method, dinfo=dinfo)
        if dinfo.is_main:
            if tc.keep_best and res["map"] > best_map:
                best_map = res["map"]
                save_checkpoint(out_dir / BEST_NAME, model, None, None, step, cfg, train_ds.class_names,
                                extra={"val_map": best_map, "epoch": ep})
            board.scalars(step, {"val/mAP": res["map"]})
            board.overlays(step, model, method, val_ds, cfg, device)
            append_jsonl(log_path, {"step": step, "epoch": ep, "val_map": res["map"]})
            if progress:
                print(f"epoch {ep}/{tc.epochs}: val mAP {res['map']:.1f}")

    task = Task(
        kind="classifier", name="train", model=train_model, optimizer=optimizer, amp=amp, schedule=lr_fn,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, batches=batches,
        forward=lambda batch, at: method.forward(train_model, batch, context(at), cfg), loss=loss,
        checkpoint=ckpt_path, checkpoint_every=tc.checkpoint_every,
        save_meta=lambda: {"config": cfg.to_dict(), "class_names": list(train_ds.class_names),
                           "class_names_source": "checkpoint"},
        oom=(f"training step {{step}} (a batch of {per_rank} per device)",
             "train.batch_size or model.img_size (train.amp=bf16 halves the activations)"),
        nonfinite_hint="lower train.lr or set train.grad_clip", log_path=log_path, log_steps=True,
        on_log=lambda step, lr, values: board.scalars(step, {"lr": lr, **{f"loss/{k}": v for k, v in values.items()}}),
        after_epoch=lambda end: validate_epoch(end.step), on_step=on_step, is_main=dinfo.is_main, progress=progress)
    start_log(task, step)
    if step and (step % steps_per_epoch == 0 or step >= total_steps) and not _validated(log_path, step):
        validate_epoch(step)  # killed after the epoch's checkpoint, before its validation: redo it now
    fit(task, step, finished)
    board.close()
    barrier(dinfo)
    return ckpt_path


def _validated(log_path: Path, step: int) -> bool:
    """Whether the log holds the val mAP line of ``step`` (written after the epoch's best-checkpoint choice)."""
    if not log_path.is_file():
        return False
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step") == step and "val_map" in rec:
            return True
    return False


def _best_so_far(path: Path) -> float:
    """The val mAP of ``checkpoint_best.pt`` (a resumed run keeps beating it, not a fresh -1)."""
    if not path.is_file():
        return -1.0
    return float(read_checkpoint(path).get("val_map", -1.0))


class _TensorBoard:
    """Training scalars under ``<output_dir>/tensorboard`` (``train.tensorboard=true``; extra ``[tensorboard]``)."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise TokensegError('train.tensorboard=true needs TensorBoard: pip install "tokenseg[tensorboard]"'
                                    ) from exc
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def overlays(self, step: int, model, method: Method, ds: WSSSDataset | None, cfg: Config, device,
                 n: int = 4) -> None:
        """Seeds of the first ``n`` val images (scale 1 + flip, the method's first kind) as heat maps."""
        if self.writer is None or ds is None or len(ds) == 0:
            return
        import copy

        from .maps import compute_map_batch, normalise
        from .core.viz import overlay

        mcfg = copy.deepcopy(cfg)
        mcfg.maps.scales, mcfg.maps.flip = [1.0], True
        kind = method.recipe.default_kinds[0]
        net = unwrap(model)
        was_training = net.training
        net.eval()
        for i in range(min(n, len(ds))):
            raw = torch.from_numpy(np.asarray(ds.load_image(i), np.uint8).copy()).permute(2, 0, 1)[None]
            labels = torch.from_numpy(ds.multi_hot(i))[None].to(device)
            mb = compute_map_batch(net, normalise(raw.to(device), method.recipe.mean, method.recipe.std), labels,
                                   mcfg, [kind], method.recipe)
            m = mb.maps[kind]
            top = m.max(0).values.cpu().numpy() if len(m) else np.zeros(raw.shape[-2:], np.float32)
            img = overlay(raw[0].permute(1, 2, 0).numpy(), top)
            self.writer.add_image(f"seeds/{ds.ids[i]}", img, step, dataformats="HWC")
        net.train(was_training)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
