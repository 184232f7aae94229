"""MCTformer-V1, MCTformer-V2 and MCTformer+ (METHODS.md §2–§6, errata §16.1–16.10).

* V1: C class tokens; class scores = mean over D of the output class tokens; seeds = class-to-patch
  attention summed over the last K = 3 layers (+ patch affinity).
* V2: + a 3×3 conv PatchCAM head on the patch tokens, GAP; loss α·cls + β·patch; fused = attention ⊙
  PatchCAM.
* MCTformer+: GWRP pooling (0.996), the contrastive class-token loss (CCT) on every layer, fused =
  sqrt(attention ⊙ PatchCAM), mean over K = 12 layers; position embeddings decayed (§16.3).

No final LayerNorm anywhere (§16.1). The model: :mod:`.model`; the authors' checkpoints: :mod:`.convert`;
``maps.mode=authors`` runs their inference exactly (:mod:`.authors`); presets in ``presets/``. Each variant's
functions are bound to its name, so a method built on one (OTPL) passes the config as it is.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ...core.losses import contrastive_class_token_loss, multilabel_soft_margin
from .. import MapRecipe, Method, register
from .authors import AUTHORS_HOOKS
from .convert import CONVERTER
from .model import build_model

ATTENTION_KINDS = ("attention", "attention_affinity")
ALL_KINDS = ("attention", "attention_affinity", "patchcam", "fused", "fused_affinity")
KIND_TITLES = {
    "attention": "class-token attention",
    "attention_affinity": "attention + patch affinity",
    "patchcam": "PatchCAM",
    "fused": "fused (attention x PatchCAM)",
    "fused_affinity": "fused + patch affinity",
}


def build(cfg, num_classes: int, variant: str | None = None) -> nn.Module:
    """The model of ``variant`` (default ``model.method``)."""
    variant = variant or cfg.model.method
    return build_model(cfg.model, num_classes, decay_pos_embed=decays_pos_embed(cfg, variant), variant=variant)


def decays_pos_embed(cfg, variant: str | None = None) -> bool:
    """The authors' weight-decay skip list is timm's {'pos_embed', 'cls_token'}: MCTformer+'s
    ``pos_embed_cls``/``pos_embed_pat`` are therefore decayed, V1/V2's ``pos_embed`` is not (§16.3)."""
    value = str(cfg.train.decay_pos_embed).lower()
    return (variant or cfg.model.method) == "mctformer-plus" if value == "auto" else value == "true"


def uses_cct(cfg, variant: str | None = None) -> bool:
    return (variant or cfg.model.method) == "mctformer-plus" and cfg.model.cct_weight > 0


def forward(model: nn.Module, batch: dict, ctx, cfg, variant: str | None = None) -> dict:
    return model(batch["image"], return_layer_tokens=uses_cct(cfg, variant))


def compute_losses(model_out: dict, targets: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """α·MLSM(class tokens) + β·MLSM(PatchCAM) + γ·CCT, with a ``total``."""
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


def loss(out: dict, batch: dict, ctx, cfg) -> dict[str, torch.Tensor]:
    terms = compute_losses(out, batch["labels"], cfg)
    terms.pop("total")
    return terms


def class_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of class-token and PatchCAM scores (their ``x_logits``), or the class tokens' alone (V1)."""
    out = model(x)
    s = out["cls_logits"]
    return (s + out["patch_logits"]) / 2 if "patch_logits" in out else s


def combine(model, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, cfg, kinds) -> dict:
    """Class-to-patch attention of the last K layers, the PatchCAM, their fusion, and the patch-affinity
    refinement ``A_ref[c, i] = Σ_j aff[i, j] A[c, j]`` (affinity over all layers), on the patch grid."""
    mc = cfg.maps
    need_aff = any(k.endswith("_affinity") for k in kinds)
    out = model.forward_maps(x, last_k=mc.layers, affinity=need_aff, layer_reduce=mc.layer_reduce)
    att = out.attention[:, classes].float()
    base = {"attention": att}
    if out.patchcam is not None:
        pc = out.patchcam[:, classes].float()
        base["patchcam"] = pc
        fused = att * pc
        base["fused"] = fused.sqrt() if mc.fusion == "sqrt" else fused
    maps = {}
    for kind in kinds:
        m = base[kind.removesuffix("_affinity")]
        if kind.endswith("_affinity"):
            m = (m.flatten(2) @ out.affinity.float().transpose(1, 2)).view(m.shape)
        maps[kind] = m
    return maps


def load_foreign(state, source: str, overrides=(), num_heads: int | None = None, path=None):
    """The authors' MCTformer-V1/V2/+ checkpoints (and ImageNet DeiT/DINO weights as initialisation)."""
    from .convert import claims, model_from_state, unwrap_state_dict

    try:
        sd = unwrap_state_dict(state, source)
    except Exception:
        return None
    if claims(sd) is None:
        return None  # another family's layout, or not a class-token ViT at all
    return model_from_state(state, source, overrides=overrides, path=path, num_heads=num_heads)



# maps.mode=auto runs the authors' inference: the batched pipeline deviates from it (nearest rounding,
# torch resizing of the normalised tensor, no +0.1 position-embedding offset for V1/V2; README)
V1_RECIPE = MapRecipe(kinds=ATTENTION_KINDS, default_kinds=("attention_affinity",), combine=combine,
                      authors=AUTHORS_HOOKS, default_mode="authors", titles=KIND_TITLES)
RECIPE = MapRecipe(kinds=ALL_KINDS, default_kinds=("fused_affinity",), combine=combine, authors=AUTHORS_HOOKS,
                   default_mode="authors", titles=KIND_TITLES)

for _name, _recipe, _summary in (
        ("mctformer-v1", V1_RECIPE, "C class tokens; class-to-patch attention seeds (CVPR 2022)"),
        ("mctformer-v2", RECIPE, "+ PatchCAM head, attention ⊙ PatchCAM seeds (CVPR 2022)"),
        ("mctformer-plus", RECIPE, "+ GWRP pooling and contrastive class tokens (TPAMI 2024)")):
    register(Method(name=_name, summary=_summary, build=partial(build, variant=_name), recipe=_recipe, loss=loss,
                    forward=partial(forward, variant=_name), class_scores=class_scores, load_foreign=load_foreign,
                    convert=CONVERTER))
