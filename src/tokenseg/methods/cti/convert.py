"""CTI's released checkpoints (their ``MCTformerV2_CTI``, a bare state dict; METHODS.md §8).

Their layout: one foreground ``cls_token`` (1, 1, D), ``bg_token``, the tokenizer MLP ``tokenizer.{0,2}.*``,
``pos_embed_cls`` (1, C+1, D), ``pos_embed_pat`` (1, M, D), the (C+1)-way ``head``, the unused
``pos_embed``; every other key is MCTformer's. Only ``pos_embed_pat`` changes shape, so theirs → ours →
theirs round-trips bit for bit. An ImageNet ViT initialises CTI as their ``finetune`` path does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.errors import TokensegError
from ...core.weights import load_state_checked
from ...models.layout import (_BLOCK_KEY, _SHARED_PREFIXES, LayoutInfo, _grid_of, authors_patch_positions,
                              config_for, refuse_unexpected, resolve_class_names)
from ..base import IMAGENET, Converter
from .model import CTI_KEYS, MEMORY_KEYS, CTIViT, build_cti_model


# ---------------------------------------------------------------------------------------- their layout
def is_authors_state(sd: dict) -> bool:
    """Their ``MCTformerV2_CTI`` state dict (background token and tokenizer present)."""
    return "bg_token" in sd and "tokenizer.0.weight" in sd


def authors_layout(sd: dict[str, torch.Tensor], source: str = "checkpoint"):
    """:class:`~tokenseg.models.layout.LayoutInfo` of their state dict, every CTI key checked."""
    
    need = ("cls_token", "pos_embed_cls", "pos_embed_pat", "head.weight", "head.bias", "patch_embed.proj.weight",
            *CTI_KEYS)
    missing = [k for k in need if k not in sd]
    if missing:
        what = "" if "bg_token" in sd else " (no background token: an MCTformer checkpoint?)"
        raise TokensegError(f"{source}: not a CTI checkpoint{what}: missing {', '.join(missing[:6])}")
    cls, pos_cls, head = sd["cls_token"], sd["pos_embed_cls"], sd["head.weight"]
    D = int(cls.shape[-1])
    if tuple(cls.shape) != (1, 1, D) or tuple(sd["bg_token"].shape) != (1, 1, D):
        raise TokensegError(f"{source}: cls_token {tuple(cls.shape)} / bg_token {tuple(sd['bg_token'].shape)}: "
                            f"CTI has one (1, 1, D) foreground and one background token")
    C = int(pos_cls.shape[1]) - 1
    if C < 1 or tuple(pos_cls.shape) != (1, C + 1, D):
        raise TokensegError(f"{source}: pos_embed_cls has shape {tuple(pos_cls.shape)}, expected (1, C+1, {D})")
    if head.ndim != 4 or head.shape[0] != C + 1:
        raise TokensegError(f"{source}: head.weight has shape {tuple(head.shape)}, expected ({C + 1}, {D}, 3, 3) "
                            f"for C + 1 = {C + 1} tokens (pos_embed_cls)")
    t0, t2 = sd["tokenizer.0.weight"], sd["tokenizer.2.weight"]
    if tuple(t0.shape) != (5 * D, D) or tuple(t2.shape) != ((C + 1) * D, 5 * D):
        raise TokensegError(f"{source}: tokenizer weights {tuple(t0.shape)}, {tuple(t2.shape)}; expected "
                            f"({5 * D}, {D}) and ({(C + 1) * D}, {5 * D}) (D -> 5D -> D·(C+1))")
    grid = _grid_of(sd["pos_embed_pat"].shape[1], source)
    depth = 1 + max((int(mm.group(1)) for k in sd if (mm := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        raise TokensegError(f"{source}: no transformer blocks (blocks.0.attn.qkv.weight) found")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    return LayoutInfo(layout="cti", num_classes=C, embed_dim=D, depth=depth,
                      patch_size=int(sd["patch_embed.proj.weight"].shape[-1]), grid=grid,
                      mlp_ratio=float(fc1.shape[0]) / D if fc1 is not None else 4.0,
                      qkv_bias="blocks.0.attn.qkv.bias" in sd, has_head=True)


def authors_to_tokenseg_state(sd: dict[str, torch.Tensor], info, source: str = "checkpoint"
                              ) -> dict[str, torch.Tensor]:
    """Their keys -> :class:`CTIViT`'s (only ``pos_embed_pat`` changes shape: (1, M, D) -> (1, D, h, w));
    the memory is not in their files (it starts empty)."""
    gh, gw = info.grid
    D = info.embed_dim
    own = {"cls_token", "bg_token", "pos_embed", "pos_embed_cls", "pos_embed_pat"}
    out, unexpected = {}, []
    for k, v in sd.items():
        if k in own or k.startswith(("tokenizer.", "head.")) or _BLOCK_KEY.match(k) or k.startswith(_SHARED_PREFIXES):
            out[k] = v
        else:
            unexpected.append(k)
    refuse_unexpected(unexpected, source, "CTI")
    pat = sd["pos_embed_pat"]
    if tuple(pat.shape) != (1, gh * gw, D):
        raise TokensegError(f"{source}: pos_embed_pat has shape {tuple(pat.shape)}, expected (1, {gh * gw}, {D})")
    out["pos_embed_pat"] = pat.reshape(1, gh, gw, D).permute(0, 3, 1, 2).contiguous()
    return out


def tokenseg_to_authors_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`CTIViT`'s state dict -> their bare state dict, in their key order (``torch.save`` of it is
    what their ``save_model`` writes and their ``load_state_dict(strict=True)`` reads). The memory bank
    (training state their files do not hold) is left out."""
    if "bg_token" not in sd or "tokenizer.0.weight" not in sd:
        raise TokensegError("not a CTI model (no bg_token / tokenizer): export it with its own method")
    out = {"cls_token": sd["cls_token"].clone(), "pos_embed": sd["pos_embed"].clone(),
           "bg_token": sd["bg_token"].clone(), "pos_embed_cls": sd["pos_embed_cls"].clone(),
           "pos_embed_pat": authors_patch_positions(sd)}
    for k, v in sd.items():
        if k not in out and k not in MEMORY_KEYS:
            out[k] = v.clone()
    return out


def model_from_authors_state(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                             num_classes: int | None = None, class_names=None, num_heads: int | None = None,
                             overrides=()) -> tuple[CTIViT, Any, list[str]]:
    """Build the CTI model from their state dict: ``(model, cfg, class_names)`` (the ``cti`` preset
    with the backbone the weights imply; names VOC for 20 classes, COCO for 80, unless given)."""
    info = authors_layout(sd, source)
    C = info.num_classes
    if num_classes is not None and num_classes != C:
        raise TokensegError(f"{source}: the checkpoint has {C} foreground tokens (+ background), but "
                            f"{num_classes} classes were asked for")
    names = resolve_class_names(class_names, C)
    cfg = config_for(info, "cti", num_heads, overrides)
    model = build_cti_model(cfg, C)
    ours = authors_to_tokenseg_state(sd, info, source)
    own = model.state_dict()
    if "pos_embed" not in ours:  # a file without their unused embedding: keep ours
        ours["pos_embed"] = own["pos_embed"]
    for k in MEMORY_KEYS:
        ours[k] = own[k]  # their files hold no memory: it starts empty
    try:
        load_state_checked(model, ours, source)
    except TokensegError as exc:
        raise TokensegError(f"{exc} [layout cti, depth {info.depth}, dim {info.embed_dim}, {C} classes]") from None
    model.class_names_source = "given" if class_names not in (None, "") else "default"
    return model.eval(), cfg, names


# ---------------------------------------------------------------------------------------- loading
def model_from_state(obj: Any, source: str = "checkpoint", method: str | None = None,
                     num_classes: int | None = None, class_names=None, num_heads: int | None = None,
                     overrides=(), path: str | Path | None = None) -> tuple[CTIViT, Any, list[str]]:
    """CTI from their file, or from an ImageNet ViT as CTI's initialisation; any other layout asked to
    be CTI is an error that says what the file is."""
    from ..mctformer.convert import detect_layout, unwrap_state_dict

    sd = unwrap_state_dict(obj, source)
    if is_authors_state(sd):
        if method not in (None, "cti"):
            raise TokensegError(f"{source}: is a CTI checkpoint (bg_token, tokenizer), not {method}; use --method cti")
        return model_from_authors_state(sd, source, num_classes, class_names, num_heads, overrides)
    info = detect_layout(sd, source)
    if info.layout != IMAGENET:
        raise TokensegError(f"{source}: not a CTI checkpoint: it has no background token (bg_token) nor tokenizer; "
                            f"it is {info.layout} (load it as {info.layout})")
    if num_classes is None and class_names in (None, ""):
        raise TokensegError(f"{source}: an ImageNet backbone checkpoint (one class token): give the number "
                            "of classes (--num-classes) or --class-names to initialise CTI from it")
    if path is None:
        raise TokensegError(f"{source}: an ImageNet checkpoint needs its file path")
    names = resolve_class_names(class_names, num_classes)
    cfg = config_for(info, "cti", num_heads, overrides)
    if cfg.model.backbone_kwargs:
        cfg.model.backbone_kwargs["img_size"] = info.grid[0] * info.patch_size
    cfg.model.pretrained = str(path)
    model = build_cti_model(cfg, len(names))  # their finetune path: cls_token, pos C+1 times, bg_token 0
    model.class_names_source = "given" if class_names not in (None, "") else "default"
    return model.eval(), cfg, names


def load_foreign(state, source: str, overrides=(), num_heads: int | None = None, path=None):
    """Their released layout (a bare ``MCTformerV2_CTI`` state dict); None for any other file."""
    from ..mctformer.convert import unwrap_state_dict

    try:
        sd = unwrap_state_dict(state, source)
    except Exception:
        return None
    if not is_authors_state(sd):
        return None
    return model_from_authors_state(sd, source, num_heads=num_heads, overrides=overrides)


def _load(obj, source, method, num_classes, class_names, num_heads, path):
    return model_from_state(obj, source, method, num_classes, class_names, num_heads, path=path)


def _export(sd: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    return tokenseg_to_authors_state(sd)


def claims(sd: dict) -> str | None:
    return "cti" if is_authors_state(sd) else None


CONVERTER = Converter(title="CTI", marks="bg_token, tokenizer", claims=claims, load=_load, export=_export)

__all__ = ["is_authors_state", "authors_layout", "authors_to_tokenseg_state", "tokenseg_to_authors_state",
           "model_from_authors_state", "model_from_state", "load_foreign", "CONVERTER"]
