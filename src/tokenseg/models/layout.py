"""The authors' ViT checkpoints (MCTformer, CTI): what a state dict says about its model, and a config
that rebuilds it. Shared by :mod:`tokenseg.methods.mctformer.convert` and :mod:`tokenseg.methods.cti.convert`
(and POT's file reader)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..config import Config, apply_overrides, load_config, validate
from ..core.errors import TokensegError
from ..core.registry import get_method

# (embed dim, depth, patch) -> (timm name, heads) for the standard DeiT backbones the authors use
_STANDARD = {(192, 12, 16): ("deit_tiny_patch16_224", 3), (384, 12, 16): ("deit_small_patch16_224", 6),
             (768, 12, 16): ("deit_base_patch16_224", 12)}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_SHARED_PREFIXES = ("patch_embed.proj.", "norm.")


@dataclass
class LayoutInfo:
    """What a state dict says about its model."""

    layout: str  # mctformer-v1 | mctformer-v2 | mctformer-plus | cti | imagenet | tokenseg
    num_classes: int
    embed_dim: int
    depth: int
    patch_size: int
    grid: tuple[int, int]  # training patch grid of the position embedding
    mlp_ratio: float
    qkv_bias: bool
    has_head: bool


def _grid_of(m: int, source: str) -> tuple[int, int]:
    g = int(round(math.sqrt(m)))
    if g * g != m:
        raise TokensegError(f"{source}: {m} patch position embeddings do not form a square grid")
    return g, g


def refuse_unexpected(unexpected: list[str], source: str, layout: str) -> None:
    """A clear error naming the first keys of a state dict that ``layout`` has no place for."""
    if unexpected:
        raise TokensegError(f"{source}: unexpected keys for {layout}: {', '.join(unexpected[:6])}"
                            + (" ..." if len(unexpected) > 6 else ""))


def authors_patch_positions(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our (1, D, gh, gw) ``pos_embed_pat`` as the authors' (1, gh·gw, D), after checking that their
    layout can hold the model at all (a linear patch stem without norm, a square grid)."""
    if any(k.startswith("patch_embed.proj.") and k.count(".") > 3 for k in sd) or \
            "patch_embed.proj.weight" not in sd:
        raise TokensegError("this model has a convolutional stem (model.stem=conv), which the authors' "
                            "layout cannot hold")
    extra = [k for k in sd if k.startswith("patch_embed.norm.")]
    if extra:
        raise TokensegError(f"the authors' layout has no patch-embedding norm ({extra[0]})")
    _, D, gh, gw = sd["pos_embed_pat"].shape
    if gh != gw:
        raise TokensegError(f"the authors' code needs a square position grid, this model has {gh}×{gw}")
    return sd["pos_embed_pat"].permute(0, 2, 3, 1).reshape(1, gh * gw, D).contiguous()


def resolve_class_names(spec: str | list[str] | None, num_classes: int | None) -> list[str]:
    """``voc`` / ``coco`` / a class names file / a list; default by count (20: VOC, 80: COCO)."""
    from ..data import COCO_CLASSES, VOC_CLASSES

    if isinstance(spec, (list, tuple)):
        names = list(spec)
    elif spec in (None, ""):
        if num_classes is None:
            raise TokensegError("give the number of classes (--num-classes) or their names (--class-names)")
        names = {20: VOC_CLASSES, 80: COCO_CLASSES}.get(num_classes) or [f"class_{i}" for i in range(num_classes)]
    elif str(spec).lower() in ("voc", "coco"):
        names = VOC_CLASSES if str(spec).lower() == "voc" else COCO_CLASSES
    else:
        from ..data import read_class_names

        names = read_class_names(spec)
    names = list(names)
    if num_classes is not None and len(names) != num_classes:
        raise TokensegError(f"{len(names)} class names given for {num_classes} classes")
    return names


def config_for(info: LayoutInfo, method: str, num_heads: int | None = None, overrides=()) -> Config:
    """A config that rebuilds the model ``info`` describes: the ``method`` preset, the right backbone."""
    cfg = load_config(method)
    cfg.name = f"converted-{method}"
    cfg.output_dir = f"runs/converted-{method}"
    m = cfg.model
    key = (info.embed_dim, info.depth, info.patch_size)
    std = _STANDARD.get(key)
    if std and (num_heads in (None, std[1])) and info.mlp_ratio == 4.0 and info.qkv_bias:
        m.backbone, m.backbone_kwargs = std[0], {}
    else:
        if num_heads is None:
            if info.embed_dim % 64:
                raise TokensegError(f"cannot tell the number of attention heads for embed dim {info.embed_dim}: "
                                    "pass --num-heads")
            num_heads = info.embed_dim // 64
        if info.embed_dim % num_heads:
            raise TokensegError(f"embed dim {info.embed_dim} is not divisible by {num_heads} heads")
        m.backbone = "vit_small_patch16_224"
        m.backbone_kwargs = {"embed_dim": info.embed_dim, "depth": info.depth, "num_heads": num_heads,
                             "patch_size": info.patch_size, "img_size": info.grid[0] * info.patch_size}
        if info.mlp_ratio != 4.0:
            m.backbone_kwargs["mlp_ratio"] = info.mlp_ratio
        if not info.qkv_bias:
            m.backbone_kwargs["qkv_bias"] = False
    m.method = method
    m.pretrained = False
    m.stem = "patch"
    if info.layout != "imagenet":
        m.img_size = info.grid[0] * info.patch_size
    recipe = get_method(method).recipe  # the preset's map kinds that this method makes (V1: attention only)
    cfg.maps.kinds = [k for k in cfg.maps.kinds if k in recipe.kinds] or list(recipe.default_kinds)
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
