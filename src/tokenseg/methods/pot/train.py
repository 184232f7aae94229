"""POT's model build, optimizer groups, forward and losses."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.losses import multilabel_soft_margin
from .model import POTNet, code_fusion, code_stage, max_norm, paper_stage
from .config import _stage_options, clusters_of, con_active, momentum_of, numpy_init_of, target_of


# ----------------------------------------------------------------------------------------- model
def build(cfg, num_classes: int) -> nn.Module:
    pc = cfg.pot
    model = POTNet(pc.backbone, num_classes, cfg.model.pretrained, pc.output_stride, pc.freeze_stem, pc.freeze_bn,
                   pc.backbone_kwargs)
    model.pot_cfg = copy.deepcopy(pc)  # POT's own map loop reads it (it gets the maps section only)
    return model


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Backbone at lr × 1, side convs and classifier at × ``new_lr_mult``; weight decay on every
    parameter (the code's two groups); frozen conv1/bn1 left out; per-group momentum (§16.16)."""
    net = model.module if hasattr(model, "module") else model
    new_ids = {id(p) for m in net.new_modules() for p in m.parameters()}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in new_ids]
    new = [p for m in net.new_modules() for p in m.parameters() if p.requires_grad]
    wd = cfg.train.weight_decay
    mom = momentum_of(cfg.pot, cfg.train)
    return [{"params": backbone, "weight_decay": wd, "lr_mult": 1.0, "momentum": mom},
            {"params": new, "weight_decay": wd, "lr_mult": float(cfg.pot.new_lr_mult), "momentum": mom}]


def class_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)["cls_logits"]


# ----------------------------------------------------------------------------------------- training
def _step_seed(cfg, ctx) -> int:
    """The k-means initialisation of a step: a function of (seed, step, rank), so a resumed run draws
    the same points as an uninterrupted one."""
    return int(np.random.SeedSequence([int(cfg.train.seed), int(ctx.step), int(ctx.rank), 7]).generate_state(1)[0])


def _step_generator(cfg, ctx, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_step_seed(cfg, ctx))


def _to_grid(t: torch.Tensor, size, mode: str) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size, mode=mode) if mode == "nearest" else F.interpolate(
        t, size, mode=mode, align_corners=False)


def classifier_cam(cam: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """M_cls (B, C+1, h, w): [1 − max_c, ReLU(cam)/max] with the max over *all* classes (the code),
    foreground masked by the labels."""
    nc = max_norm(F.relu(cam.float()))
    return torch.cat([1.0 - nc.amax(1, keepdim=True), nc * present[:, :, None, None]], 1)


def forward(model: nn.Module, batch: dict, ctx, cfg) -> dict:
    """The network once, then the prototype stages of the mode (fp32, no autocast); before
    ``pot.start_epoch`` (or with ``pot.con_weight=0``) the stages are skipped: the step trains the classifier."""
    pc = cfg.pot
    out = model(batch["image"])
    if not con_active(pc, ctx.epoch):
        return out
    feats = out["features"]
    dev = feats.device
    size = feats.shape[-2:]
    labels = batch["labels"].float()
    valid = _to_grid(batch["valid"][:, None].float(), size, "nearest")[:, 0]
    clip = batch.get("clip")
    if clip is not None:
        clip = _to_grid(clip.float(), size, "bilinear") * labels[:, :, None, None] * valid[:, None]
    gen = _step_generator(cfg, ctx, dev)
    vm = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)[:, :, None, None] * valid[:, None]
    with torch.autocast(dev.type, enabled=False):
        cam = out["cam"].float()
        if pc.mode == "code":
            seed = _step_seed(cfg, ctx) if numpy_init_of(pc) else None
            maps, vm = code_stage(feats.float(), cam, labels, valid, pc.kmeans_iters, gen, clusters_of(pc),
                                  training=True, numpy_seed=seed)
            pred, target = code_fusion(maps, clip, vm, training=True)
            weight = None
        else:
            baseline = clip if clip is not None else max_norm(F.relu(cam)) * labels[:, :, None, None]
            st = paper_stage(feats.float(), baseline, labels, valid, _stage_options(pc), gen)
            pred = torch.cat([st.background, st.cam], 1)
            if target_of(pc) == "fused":
                pred, target = code_fusion(pred, clip, vm, training=True)
            else:
                target = classifier_cam(cam, labels)
            weight = torch.cat([torch.ones_like(st.background), st.confidence], 1) if pc.adaptive else None
            out["_omega"] = st.omega.float().mean() if st.omega.numel() else feats.new_zeros(())
    out.update(pot_pred=pred, pot_target=target, pot_mask=vm)
    if weight is not None:
        out["pot_weight"] = weight
    return out


def loss(out: dict, batch: dict, ctx, cfg) -> dict:
    """cls_weight · MLSM(scores) + con_weight · mean |pred − target| over (B, C+1, h, w), both masked
    by [valid, valid·y] and max-normalised per channel (the code's ``lossCon``)."""
    pc = cfg.pot
    cls = pc.cls_weight * multilabel_soft_margin(out["cls_logits"], batch["labels"])
    if "pot_pred" not in out:  # before pot.start_epoch: the features stay in the graph at zero weight (DDP)
        return {"cls": cls, "con": 0.0 * out["features"].float().sum()}
    vm = out["pot_mask"]
    target = out["pot_target"].detach() if pc.detach_target else out["pot_target"]
    diff = (max_norm(out["pot_pred"] * vm) - max_norm(target * vm)).abs()
    if "pot_weight" in out:
        diff = diff * out["pot_weight"]
    terms = {"cls": cls, "con": pc.con_weight * diff.mean()}
    if "_omega" in out:
        terms["_omega"] = out["_omega"].detach()
    return terms
