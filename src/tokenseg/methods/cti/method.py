"""CTI — Class Tokens Infusion (CVPR 2024), exact to the authors' code (METHODS.md §8, errata §16.11–16.15).

* Model (:mod:`.model`; their checkpoints: :mod:`.convert`): C + 1 tokens (0 = background) from a tokenizer MLP on one
  foreground token, a (C+1)-way PatchCAM, the cross-image token memory as model state.
* Training (their ``model_CTI.update()``): two independent views per image (view 2 adds RandAugment);
  four multilabel soft-margin terms; the BG-CAM loss on the training-time maps (class-to-patch attention
  of the last 6 layers, patch affinity of layers swap + 1.., refinement in float64, their max-norm);
  intra-image infusion (view 2's tokens after block ``swap`` averaged into view 1's, L1 between
  max-normed PatchCAMs); cross-image infusion (present classes' tokens swapped for the memory mean,
  L1 against the infused pass's attention-weighted CAM), added once every class holds 30 entries.
  Weights and start epoch per dataset: VOC [0.1, 1, 1] from epoch 0, COCO [0.1, 0.1, 0.1] from epoch 2.
* Maps (their ``infer_multi``): original size + flip, class-to-patch attention summed over all layers ⊙
  PatchCAM, refined by the patch affinity of all layers, × [1, labels], max-norm; seeds keep the
  background token's channel (``eval.background=channel`` / ``pseudo.background=channel`` use it).
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ...core.errors import TokensegError
from ...core.losses import contrastive_class_token_loss, multilabel_soft_margin
from .. import BACKGROUND, MapRecipe, Method, image_only, register
from ..mctformer import KIND_TITLES
# val mAP and `predict`: the mean of class-token and PatchCAM scores, as MCTformer's [I: their code has no val mAP]
from ..mctformer import class_scores
from .convert import CONVERTER, load_foreign
from .model import CTIPlan, build_cti_model

ALL_KINDS = ("attention", "attention_affinity", "patchcam", "fused", "fused_affinity")


@dataclass
class CTIConfig:
    """``cti.*`` — defaults are their VOC recipe (``train_trm.py`` / ``model_CTI.py``)."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "cti.weights": ">=0", "cti.start_epoch": ">=0", "cti.swap_layer": ">=0", "cti.memory_size": ">=1",
        "cti.train_attn_layers": ">=1", "cti.train_affinity_from": ">=-1", "cti.infer_affinity_layers": ">=0",
        "cti.expect_classes": ">=0", "cti.cct_weight": ">=0"}

    weights: list = field(default_factory=lambda: [0.1, 1.0, 1.0])  # W: BG-CAM, intra, cross (COCO: 0.1 each)
    start_epoch: int = 0  # the three terms count from this epoch (their ``epo > warmup``: VOC 0, COCO 2)
    swap_layer: int = 3  # their swap_idx: tokens after block 3 (0-indexed) are infused at the input of block 4
    memory_size: int = 30  # tokens kept per class; the cross loss is added once every class holds this many
    train_attn_layers: int = 6  # training-time class-to-patch attention: the last N layers (their n_layers=6)
    train_affinity_from: int = -1  # training-time patch affinity: layers from this index on; -1 = swap_layer + 1
    infer_affinity_layers: int = 0  # maps: patch affinity over the last N layers; 0 = all (their inference)
    bg_detach_cams: bool = False  # BG-CAM foreground from cams.detach() (their COCO branch)
    refine_dtype: str = "float64"  # the BG-CAM refinement products (theirs: float64) | float32
    view2_augment: str = "rand-m9-mstd0.5-inc1"  # view 2's timm auto-augment policy; "" = none
    expect_classes: int = 0  # > 0: the class count this preset is for (cti-coco: 80); 0 = any
    # [demo] true: epochs before start_epoch train view 1 alone (one plain pass and its two MLSM terms, no
    # view 2: about 0.4x the cost of their step), view 2 joins with the three terms. false = their code (both
    # views from the first step)
    view2_from_start_epoch: bool = False
    # [demo] > 0: MCTformer+'s contrastive class-token loss (CCT) on view 1's C foreground tokens after every
    # block, from the first step. 0 = their code (CTI has no such term)
    cct_weight: float = 0.0
    # [demo] the PatchCAM's class scores: gap = their code; gwrp = MCTformer+'s ranking pooling (decay
    # model.gwrp_decay), gmp = max. model.pooling (MCTformer's) is refused for CTI
    pooling: str = "gap"


def weights_of(cfg) -> tuple[float, float, float]:
    w = [float(v) for v in cfg.cti.weights]
    return w[0], w[1], w[2]


def plan_for(cfg, epoch: int):
    """Which passes and terms a step of ``epoch`` runs (their ``W[i] > 0 and epo > warmup_epoch``)."""
    c = cfg.cti
    w_bg, w_intra, w_cross = weights_of(cfg)
    on = epoch >= c.start_epoch
    return CTIPlan(bg=on and w_bg > 0, intra=on and w_intra > 0, cross=on and w_cross > 0, swap=c.swap_layer,
                   attn_layers=c.train_attn_layers, affinity_from=affinity_from(cfg),
                   view2=on or not c.view2_from_start_epoch, layer_tokens=c.cct_weight > 0)


def affinity_from(cfg) -> int:
    c = cfg.cti
    return c.swap_layer + 1 if c.train_affinity_from < 0 else c.train_affinity_from


# ---------------------------------------------------------------------------------------- model
def build(cfg, num_classes: int) -> nn.Module:
    c = cfg.cti
    if c.expect_classes and num_classes != c.expect_classes:
        data = cfg.data.root or cfg.data.format
        raise TokensegError(
            f"cti.expect_classes={c.expect_classes}: the {cfg.name!r} config (its loss weights, start epoch and "
            f"BG-CAM detaching) is for a dataset of {c.expect_classes} classes, but {data} has {num_classes}; "
            f"use the `cti` preset (VOC recipe) or set cti.expect_classes=0")
    return build_cti_model(cfg, num_classes)  # cti.swap_layer is checked against the depth when training


def forward(model: nn.Module, batch: dict, ctx, cfg) -> dict:
    """One call of the (maybe DDP-wrapped) model runs every pass of the step; before
    ``cti.start_epoch`` with ``cti.view2_from_start_epoch`` that is view 1's plain pass alone."""
    plan = plan_for(cfg, ctx.epoch)
    if not plan.view2:
        return model(batch["image"], return_layer_tokens=plan.layer_tokens)
    return model(batch["image"], batch["image_pos"], batch["labels"], plan=plan)


def max_norm(m: torch.Tensor) -> torch.Tensor:
    """Their ``max_norm`` per (image, channel) over H×W: ReLU(ReLU(m) − min − 1e-5)/(max − min + 1e-5) with
    min/max of ReLU(m) (§16.14); ``max``/``min`` with an index, as theirs, so ties take one gradient."""
    flat = F.relu(m.flatten(-2))
    hi = flat.max(-1, keepdim=True).values
    lo = flat.min(-1, keepdim=True).values
    return (F.relu(flat - lo - 1e-5) / (hi - lo + 1e-5)).view_as(m)


def compute_losses(out: dict, labels: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """Their terms, weighted: ``cls`` (4 MLSM; view 1's two alone when the step skipped view 2), ``bg``,
    ``intra``, ``cross`` (or ``_cross`` = computed, not added), and ``total``. A term whose pass the step's
    plan skipped is absent."""
    c = cfg.cti
    w_bg, w_intra, w_cross = weights_of(cfg)
    y = labels.float()
    cls = multilabel_soft_margin(out["cls_logits"], y) + multilabel_soft_margin(out["patch_logits"], y)
    if "cls_logits_pos" in out:
        cls = (cls + multilabel_soft_margin(out["cls_logits_pos"], y)
               + multilabel_soft_margin(out["patch_logits_pos"], y))
    terms = {"cls": cls}
    if c.cct_weight > 0 and "layer_cls_tokens" in out:
        terms["cct"] = c.cct_weight * contrastive_class_token_loss(out["layer_cls_tokens"], y)
    cams = out["cams"].float() if "cams" in out else None
    if "mtatt" in out:
        terms["bg"] = w_bg * bg_cam_loss(cams, out["mtatt"].float(), out["attn"], y, c.bg_detach_cams,
                                         torch.float64 if c.refine_dtype == "float64" else torch.float32)
    normed = max_norm(cams) if ("cams_swap_intra" in out or "fcams_as_swap_cross" in out) else None
    if "cams_swap_intra" in out:
        terms["intra"] = w_intra * (normed - max_norm(out["cams_swap_intra"].float())).abs().mean()
    if "fcams_as_swap_cross" in out:
        cross = w_cross * (normed[:, 1:] - max_norm(out["fcams_as_swap_cross"].float())[:, 1:]).abs().mean()
        terms["cross" if out.get("memory_full", False) else "_cross"] = cross
    terms["total"] = sum(v for k, v in terms.items() if not k.startswith("_"))
    return terms


def bg_cam_loss(cams: torch.Tensor, mtatt: torch.Tensor, attn: torch.Tensor, y: torch.Tensor, detach_cams: bool,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """mean |(1 − maxnorm(A·f_fg)) − maxnorm(A·f_bg)|: f_fg = max over present classes of attention ⊙ CAM,
    f_bg = the background token's, A = the training-time patch affinity; products in ``dtype``."""
    B, P, h, w = cams.shape
    fg = (mtatt * (cams.detach() if detach_cams else cams))[:, 1:] * y.view(B, P - 1, 1, 1)
    fg = fg.max(1).values
    bg = (cams * mtatt)[:, 0]
    f = torch.stack([fg, bg], 1).flatten(2).to(dtype)  # (B, 2, M)
    refined = max_norm(torch.bmm(f, attn.to(dtype).transpose(1, 2)).view(B, 2, h, w))
    return ((1 - refined[:, 0]) - refined[:, 1]).abs().mean()


def loss(out: dict, batch: dict, ctx, cfg) -> dict[str, torch.Tensor]:
    terms = compute_losses(out, batch["labels"], cfg)
    terms.pop("total")
    return terms


# ---------------------------------------------------------------------------------------- data
def views(cfg) -> dict:
    """Two independent views (their ``transform`` and ``transform2``): timm's RandomResizedCrop (bicubic,
    ``train.crop_scale``) + flip each; view 2 adds ``cti.view2_augment`` (RandAugment). Colour jitter is
    inert under RandAugment in timm and view 1 has none (§16.2); ``train.color_jitter`` > 0 adds it to
    view 2. No random erasing (their ``reprob 0``). ``train.augment`` is not read. With
    ``cti.view2_from_start_epoch`` view 2 is made from ``cti.start_epoch`` on."""
    from timm.data import create_transform
    from torchvision import transforms as T

    t = cfg.train
    common = dict(input_size=cfg.model.img_size, is_training=True, scale=tuple(t.crop_scale), color_jitter=None,
                  interpolation="bicubic", re_prob=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    view1 = create_transform(auto_augment=None, **common)
    policy = cfg.cti.view2_augment.strip()
    view2 = create_transform(auto_augment=policy if policy and policy != "none" else None, **common)
    if t.color_jitter > 0:
        view2.transforms.insert(2, T.ColorJitter(t.color_jitter, t.color_jitter, t.color_jitter))
    pos = image_only(_posterize_zero_bits(view2))
    if cfg.cti.view2_from_start_epoch:  # the steps before cti.start_epoch do not read view 2: not made
        pos.start_epoch = cfg.cti.start_epoch
    return {"image": image_only(view1), "image_pos": pos}


def _posterize_zero_bits(transform):
    """timm's RandAugment posterizes to 0 bits at magnitude 10 (reached with mstd 0.5); Pillow 13 raises
    there, the Pillow of their environment returned a black image: keep that behaviour."""
    from timm.data.auto_augment import RandAugment, posterize

    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize
    return transform


def _posterize(img, bits_to_keep, **kwargs):
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:  # every bit masked: black, as ImageOps.posterize(img, 0) in older Pillow
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


# ---------------------------------------------------------------------------------------- maps
def combine(model, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, cfg, kinds) -> dict:
    """Their inference maps for the background token and the classes present: ``fused`` = attention ⊙
    PatchCAM (their ``fcams``), ``fused_affinity`` = affinity-refined (their ``rcams``, the seeds), and
    the parts alone; each with its ``@background`` channel."""
    mc = cfg.maps
    need_aff = any(k.endswith("_affinity") for k in kinds)
    out = model.forward_maps(x, last_k=mc.layers, affinity=need_aff, layer_reduce=mc.layer_reduce,
                             affinity_layers=cfg.cti.infer_affinity_layers)
    att = torch.cat([out.bg_attention, out.attention[:, classes]], 1).float()
    pc = torch.cat([out.bg_patchcam, out.patchcam[:, classes]], 1).float()
    fused = att * pc
    base = {"attention": att, "patchcam": pc, "fused": fused.sqrt() if mc.fusion == "sqrt" else fused}
    maps = {}
    for kind in kinds:
        m = base[kind.removesuffix("_affinity")]
        if kind.endswith("_affinity"):  # rcams[c, i] = Σ_j aff[i, j] m[c, j]
            m = (m.flatten(2) @ out.affinity.float().transpose(1, 2)).view(m.shape)
        maps[kind] = m[:, 1:]
        maps[kind + BACKGROUND] = m[:, :1]
    return maps


RECIPE = MapRecipe(kinds=ALL_KINDS, default_kinds=("fused_affinity",), combine=combine, normalise="maxnorm",
                   background="channel", size_rounding="floor", titles=KIND_TITLES)


# ---------------------------------------------------------------------------------------- checks, files
def validate(cfg) -> None:
    c = cfg.cti
    if len(c.weights) != 3 or any(float(w) < 0 for w in c.weights):
        raise TokensegError(f"cti.weights must be three numbers >= 0 [BG-CAM, intra, cross], got {c.weights}")
    for key in ("swap_layer", "start_epoch", "infer_affinity_layers", "expect_classes"):
        if getattr(c, key) < 0:
            raise TokensegError(f"cti.{key} must be >= 0, got {getattr(c, key)}")
    if c.memory_size < 1 or c.train_attn_layers < 1:
        raise TokensegError(f"cti.memory_size and cti.train_attn_layers must be >= 1, got {c.memory_size}, "
                            f"{c.train_attn_layers}")
    if c.train_affinity_from < -1:
        raise TokensegError(f"cti.train_affinity_from must be a layer index or -1 (swap_layer + 1), got "
                            f"{c.train_affinity_from}")
    if c.pooling not in ("gap", "gmp", "gwrp"):
        raise TokensegError(f"config key 'cti.pooling' must be one of ['gap', 'gmp', 'gwrp'], got {c.pooling!r}")
    default_pooling = type(cfg.model)().pooling
    if cfg.model.pooling != default_pooling:  # MCTformer's key: CTI reads its own
        raise TokensegError(f"config key 'model.pooling' is not used by CTI (got {cfg.model.pooling!r}): remove it "
                            f"and set cti.pooling (now {c.pooling!r}; their code: gap)")
    if c.refine_dtype not in ("float64", "float32"):
        raise TokensegError(f"config key 'cti.refine_dtype' must be one of ['float64', 'float32'], got "
                            f"{c.refine_dtype!r}")
    if c.expect_classes and c.expect_classes != 20 and cfg.data.format == "voc":
        raise TokensegError(f"cti.expect_classes={c.expect_classes}: the {cfg.name!r} config is for a dataset of "
                            f"{c.expect_classes} classes (MS COCO), but data.format=voc (PASCAL VOC, 20 classes); "
                            f"use the `cti` preset, or data.format=coco for COCO")


register(Method(
    name="cti", summary="C+1 tokens (background token), intra/cross-image class-token infusion (CVPR 2024)",
    build=build, recipe=RECIPE, loss=loss, forward=forward, class_scores=class_scores, views=views,
    section="cti", section_config=CTIConfig, validate=validate, load_foreign=load_foreign, convert=CONVERTER,
    # every parameter gets a gradient on every step (the four MLSM terms reach all of them), also while
    # the COCO schedule has the other terms off: DDP needs no unused-parameter search (tested)
    dynamic_graph=False))
