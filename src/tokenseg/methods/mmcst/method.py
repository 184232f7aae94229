"""MMCST — multi-modal class-specific tokens (CVPR 2023; METHODS.md §9). Model: :mod:`.model`.

Only the supplement is known; the architecture is §9.2's inferred design [I], every alternative reading a
switch of the ``mmcst`` section:

* C visual class tokens + the visual context (mean of the input patch embeddings), C textual class
  tokens = frozen CLIP text embeddings of ``mmcst.prompt`` (cached, a buffer of the model) projected to
  D + the image–language context (``mmcst.image_context``: clip = CLIP's image embedding, frozen tower
  kept in the checkpoint; patches = the ViT's mean patch embedding; none);
* ``mmcst.text_tokens=classifier``: reading (a), the textual vectors only score the output patch tokens;
* ``mmcst.context_mode=concat``: reading (b), contexts concatenated (then a linear map back to D);
* losses: MLSM(visual tokens) + MLSM(textual) + MLSM(GWRP(PatchCAM)), λ = 0.996 [P];
* not the paper, off by default, on in ``demo-mmcst`` (from scratch the 2C tokens start as one):
  ``mmcst.text_center`` (prompt embeddings minus their class mean) and ``mmcst.cct_weight``
  (MCTformer+'s CCT on each token group);
* maps: MCTformer's recipe and fusion (:func:`tokenseg.methods.mctformer.combine`) on the class-to-patch
  attention of the last ``maps.layers`` = 6 layers averaged over both token groups, sqrt(· ⊙ PatchCAM),
  refined by the patch affinity of all layers [P];
* model selection: ``train.keep_best`` keeps ``checkpoint_best.pt``, the best val mAP [P] — the checkpoint
  MMCST's seeds are meant to come from (``tokenseg maps ... --checkpoint <run>/checkpoint_best.pt``).
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...core.errors import TokensegError
from ...core.losses import contrastive_class_token_loss, multilabel_soft_margin
from .. import MapRecipe, Method, register
from ..mctformer import ALL_KINDS, combine, decays_pos_embed


def _random_tower_default() -> dict:
    from .model import RANDOM_TOWER

    return {**RANDOM_TOWER, "seed": 0}


@dataclass
class MMCSTConfig:
    """``mmcst.*``: the CLIP side and the switchable readings of §9.2."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "mmcst.text_dim": ">=1", "mmcst.text_loss_weight": ">=0", "mmcst.cct_weight": ">=0"}

    clip: str = ""  # CLIP weights: a file (OpenAI's ViT-B-16.pt, open_clip .pt/.safetensors), openai (download),
    # an open_clip tag, or random (a small random open_clip tower from random_tower: tests, the demo)
    clip_arch: str = "ViT-B-16"  # open_clip config of the CLIP file (and of the image tower a checkpoint rebuilds)
    clip_quick_gelu: bool = True  # OpenAI's CLIP uses QuickGELU; false for LAION/open_clip-trained weights
    text_dim: int = 512  # CLIP embedding width (ViT-B/16: 512); checked against the weights
    prompt: str = "a photo of a {}."  # [I] §9.2
    prompt_names: str = "clip-es"  # clip-es (CLIP-ES's VOC/COCO synonyms, e.g. "tvmonitor screen") | dataset [I]
    class_names: list = field(default_factory=list)  # names for the prompts; [] = the dataset's
    text_tokens: str = "tokens"  # tokens (§9.2) | classifier (reading a: textual vectors score the patch tokens)
    visual_context: bool = True  # add the mean input patch embedding to the visual tokens
    image_context: str = "clip"  # image-language context: clip (CLIP image embedding, §9.2) | patches | none
    context_mode: str = "add"  # add (§9.2) | concat (reading b: concatenate, linear 2D -> D, starts as the sum)
    map_groups: str = "both"  # class-to-patch attention of: both token groups (averaged) | visual | textual
    text_loss_weight: float = 1.0  # weight of the textual tokens' MLSM (visual: model.cls_loss_weight,
    # PatchCAM: model.patch_loss_weight)
    text_center: bool = False  # false = the paper. true: subtract the class mean from the C prompt embeddings
    # (then L2-normalise), so textual tokens differ by what tells the classes apart; a random tower's
    # prompts are 0.90-0.99 cosine-similar, i.e. C copies of one token (the demo)
    cct_weight: float = 0.0  # 0 = the paper (no CCT; model.cct_weight is not read). > 0: MCTformer+'s
    # contrastive class-token loss on every layer's visual tokens and, as a second term, the textual ones
    random_tower: dict = field(default_factory=_random_tower_default)  # clip=random: the tower's config + seed


CHOICES = {"prompt_names": ("clip-es", "dataset"), "text_tokens": ("tokens", "classifier"),
           "image_context": ("clip", "patches", "none"), "context_mode": ("add", "concat"),
           "map_groups": ("both", "visual", "textual")}


def validate(cfg) -> None:
    mc = cfg.mmcst
    for key, options in CHOICES.items():
        if getattr(mc, key) not in options:
            raise TokensegError(f"config key 'mmcst.{key}' must be one of {list(options)}, got {getattr(mc, key)!r}")
    if not str(mc.clip):
        raise TokensegError("mmcst.clip: set the CLIP weights (e.g. mmcst.clip=/weights/ViT-B-16.pt, openai, or "
                            "random for a small random tower)")
    if "{}" not in mc.prompt:
        raise TokensegError(f"mmcst.prompt needs a '{{}}' for the class name, got {mc.prompt!r}")
    if mc.text_dim < 1:
        raise TokensegError(f"mmcst.text_dim must be >= 1, got {mc.text_dim}")
    if mc.image_context == "clip" and str(mc.clip) != "random" and not mc.clip_arch:
        raise TokensegError("mmcst.clip_arch: image_context=clip needs the open_clip config of the CLIP file "
                            "(e.g. ViT-B-16) so that a checkpoint can rebuild the image tower")
    from .model import RANDOM_TOWER

    unknown = sorted(set(mc.random_tower) - set(RANDOM_TOWER) - {"seed"})
    if unknown:
        raise TokensegError(f"mmcst.random_tower: unknown keys {unknown}; keys: {sorted(RANDOM_TOWER)} and seed")


def deferred(cfg) -> bool:
    """Build with placeholders instead of reading CLIP? Yes when the build may only be a frame for a
    checkpoint's weights (``build_for_weights`` builds with ``model.pretrained=false``; the engine's
    ``checkpoint.rebuilding()`` says so explicitly where it exists): then neither the CLIP file nor the
    dataset (for the class names) is needed, and a training run fills them in at its first step
    (:func:`forward`). The small random tower is always built at once."""
    from ... import checkpoint

    flag = getattr(checkpoint, "rebuilding", None)
    if callable(flag) and flag():
        return True
    return str(cfg.mmcst.clip) != "random" and not cfg.model.pretrained


def text_side(cfg, num_classes: int, placeholders: bool):
    from ...data import cache_root
    from .model import load_text_side

    with torch.random.fork_rng(devices=[]):  # the CLIP side must not shift the model's initialisation
        return load_text_side(cfg.mmcst, lambda: prompt_names(cfg, num_classes), num_classes, cache_root(cfg.data),
                              placeholders)


def prompt_names(cfg, num_classes: int) -> list[str]:
    """The class names written into the prompts: ``mmcst.class_names`` or the training split's, with
    CLIP-ES's VOC/COCO synonyms when ``mmcst.prompt_names=clip-es`` [I]."""
    names = [str(n) for n in cfg.mmcst.class_names]
    if not names:
        from ...data import build_dataset

        names = list(build_dataset(cfg.data, cfg.data.train_split).class_names)
    if cfg.mmcst.prompt_names == "clip-es":
        from ..clip_es.prompts import dataset_kind, prompt_names as clip_es_names

        names = clip_es_names(names, dataset_kind(names, cfg.data.format))
    return names


def build(cfg, num_classes: int) -> nn.Module:
    """DINO/any timm ViT (``model.pretrained``: False | True | a file in the timm/DeiT/DINO layout) with
    MMCST's token groups; CLIP is read once here and only its outputs are kept."""
    from ...models import vit_backbone
    from .model import MMCSTViT

    m, mc = cfg.model, cfg.mmcst
    backbone, grid = vit_backbone(m)
    text = text_side(cfg, num_classes, deferred(cfg))
    model = MMCSTViT(
        backbone, num_classes, grid, text, text_tokens=mc.text_tokens,
        visual_context=mc.visual_context, image_context=mc.image_context, context_mode=mc.context_mode,
        map_groups=mc.map_groups, pooling=m.pooling, gwrp_decay=m.gwrp_decay,
        distinct_init=m.token_init == "independent" or (m.token_init == "auto" and not m.pretrained),
        final_norm=m.final_norm, decay_pos_embed=decays_pos_embed(cfg))
    return model


def forward(model: nn.Module, batch: dict, ctx, cfg) -> dict:
    """The training forward; a model built with placeholders (:func:`deferred`) first gets CLIP's outputs.
    The layers' class tokens are kept only for ``mmcst.cct_weight`` > 0."""
    from ...core.weights import unwrap

    net = unwrap(model)
    if net._text_pending:
        with torch.autocast(batch["image"].device.type, enabled=False):
            net.fill_text_side(text_side(cfg, net.num_classes, placeholders=False))
    return model(batch["image"], return_layer_tokens=cfg.mmcst.cct_weight > 0)


def loss(out: dict, batch: dict, ctx, cfg) -> dict[str, torch.Tensor]:
    """The three multilabel soft-margin losses (visual tokens, textual, PatchCAM) [I §9.2], and with
    ``mmcst.cct_weight`` > 0 MCTformer+'s CCT on each layer's visual and textual tokens (not the paper)."""
    y, m = batch["labels"], cfg.model
    terms = {"cls": m.cls_loss_weight * multilabel_soft_margin(out["cls_logits"], y),
             "text": cfg.mmcst.text_loss_weight * multilabel_soft_margin(out["text_logits"], y),
             "patch": m.patch_loss_weight * multilabel_soft_margin(out["patch_logits"], y)}
    if cfg.mmcst.cct_weight > 0 and "layer_cls_tokens" in out:
        C, layers = y.shape[1], out["layer_cls_tokens"]
        terms["cct"] = cfg.mmcst.cct_weight * contrastive_class_token_loss([t[:, :C] for t in layers], y)
        if layers[0].shape[1] >= 2 * C:  # text_tokens=tokens: the textual group is a second token set
            terms["cct_text"] = cfg.mmcst.cct_weight * contrastive_class_token_loss(
                [t[:, C:2 * C] for t in layers], y)
    return terms


def class_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of the three branches' scores (val mAP, hence model selection; ``predict``) [I]."""
    out = model(x)
    return (out["cls_logits"] + out["text_logits"] + out["patch_logits"]) / 3


def combine_maps(model, x, labels, classes, cfg, kinds) -> dict:
    """MCTformer's recipe (attention, PatchCAM, fusion, affinity refinement) on MMCST's forward_maps;
    ``mmcst.map_groups`` is a maps-time setting (as ``maps.layers``), taken from the command's config."""
    model.map_groups = cfg.mmcst.map_groups
    return combine(model, x, labels, classes, cfg, kinds)


RECIPE = MapRecipe(kinds=ALL_KINDS, default_kinds=("fused_affinity",), combine=combine_maps)

register(Method(name="mmcst", summary="visual + CLIP-textual class tokens with sample contexts (CVPR 2023) [I]",
                build=build, recipe=RECIPE, loss=loss, forward=forward, class_scores=class_scores,
                section="mmcst", section_config=MMCSTConfig, validate=validate))
