"""MCTformer's checkpoints: the authors' files to ours and back (METHODS.md §2).

Layouts this module reads (``detect_layout``):

``mctformer-v1`` / ``mctformer-v2``
    ``cls_token`` (1, C, D), one ``pos_embed`` (1, C+M, D) (class part first), ``patch_embed.proj.*``,
    ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``; V2 adds the PatchCAM
    conv ``head.weight`` (C, D, 3, 3). A V1 file may carry timm's unused linear ``head`` (C, D): dropped.
``mctformer-plus``
    the same, with ``pos_embed_cls`` (1, C, D) and ``pos_embed_pat`` (1, M, D) instead of ``pos_embed``
    (M = 784, a 28×28 grid, for the 448 px training size).
``imagenet``
    a DeiT / DINO / timm ViT checkpoint with one class token: used as backbone initialisation as the
    authors do (:func:`tokenseg.methods.mctformer.model.build_model` with ``model.pretrained=PATH``: the
    class token and its position embedding are repeated C times, the patch grid is resized, the head
    re-initialised).
``tokenseg``
    our own checkpoint (``{'model', 'config', 'class_names', ...}``).

Any of them may be wrapped in ``{'model': ...}`` / ``{'state_dict': ...}`` and carry a DDP ``module.``
prefix. The authors' training checkpoints also pickle their ``argparse.Namespace``: it is allowed when
loading with ``weights_only=True``; anything else needs ``allow_pickle=True`` (unpickling can run code).

Only the position embeddings and the class tokens change name and shape; every other tensor keeps
its key, so ours → authors' → ours round-trips bit for bit (:func:`export_authors_state`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.errors import TokensegError
from ...core.weights import is_tokenseg_checkpoint, load_state_checked, read_weights
from ...core.weights import unwrap_state_dict as _unwrap
from ...models.layout import (_BLOCK_KEY, _SHARED_PREFIXES, LayoutInfo, _grid_of, authors_patch_positions,
                              config_for, refuse_unexpected, resolve_class_names)
from ..base import IMAGENET, Converter
from .model import build_model

METHOD_NAMES = ("mctformer-v1", "mctformer-v2", "mctformer-plus")
_METHOD_ALIASES = {"v1": "mctformer-v1", "v2": "mctformer-v2", "plus": "mctformer-plus", "+": "mctformer-plus",
                   "mctformer+": "mctformer-plus"}


def canonical_method(method: str | None) -> str | None:
    if method is None:
        return None
    m = _METHOD_ALIASES.get(method.lower(), method.lower())
    if m not in METHOD_NAMES:
        raise TokensegError(f"unknown method {method!r}; use one of {', '.join(METHOD_NAMES)}")
    return m


# ---------------------------------------------------------------------------------------- reading
def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside one of the authors' checkpoints (``module.`` and ``backbone.`` removed)."""
    return _unwrap(obj, source, strip=("module.", "backbone."))


def detect_layout(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> LayoutInfo:
    """Which of the layouts above ``sd`` is, with the model dimensions it implies."""
    if "cls_tokens" in sd and "pos_embed_pat" in sd:
        layout = "tokenseg"
        cls = sd["cls_tokens"]
        grid = tuple(sd["pos_embed_pat"].shape[-2:])
    elif "cls_token" in sd:
        cls = sd["cls_token"]
        if cls.ndim != 3:
            raise TokensegError(f"{source}: cls_token has shape {tuple(cls.shape)}, expected (1, C, D)")
        head = sd.get("head.weight")
        if "pos_embed_cls" in sd and "pos_embed_pat" in sd:
            layout = "mctformer-plus"
            grid = _grid_of(sd["pos_embed_pat"].shape[1], source)
        elif "pos_embed" in sd:
            C = cls.shape[1]
            if "dist_token" in sd:
                raise TokensegError(f"{source}: distilled DeiT checkpoints (dist_token) are not supported")
            if C == 1 and (head is None or head.ndim == 2):
                layout = IMAGENET
            else:
                layout = "mctformer-v2" if head is not None and head.ndim == 4 else "mctformer-v1"
            grid = _grid_of(sd["pos_embed"].shape[1] - C, source)
        else:
            raise TokensegError(f"{source}: has cls_token but no pos_embed / pos_embed_cls+pos_embed_pat")
    else:
        raise TokensegError(
            f"{source}: not a ViT checkpoint of a known layout (no cls_token / cls_tokens; first keys: "
            f"{', '.join(list(sd)[:5])})")
    if "patch_embed.proj.weight" not in sd:
        raise TokensegError(f"{source}: missing key patch_embed.proj.weight (a conv-stem model cannot be converted)")
    proj = sd["patch_embed.proj.weight"]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k))), default=-1)
    if depth == 0:
        raise TokensegError(f"{source}: no transformer blocks (blocks.0.attn.qkv.weight) found")
    D = cls.shape[-1]
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    head = sd.get("head.weight")
    return LayoutInfo(
        layout=layout, num_classes=int(cls.shape[1]), embed_dim=int(D), depth=depth,
        patch_size=int(proj.shape[-1]), grid=(int(grid[0]), int(grid[1])),
        mlp_ratio=float(fc1.shape[0]) / D if fc1 is not None else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, has_head=head is not None and head.ndim == 4)


# ---------------------------------------------------------------------------------------- key mapping
def authors_to_tokenseg_state(sd: dict[str, torch.Tensor], info: LayoutInfo, source: str = "checkpoint"
                              ) -> dict[str, torch.Tensor]:
    """Authors' V1/V2/+ keys -> :class:`ClassTokenViT` keys (position embeddings split / reshaped)."""
    C, D = info.num_classes, info.embed_dim
    gh, gw = info.grid
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in sd.items():
        if k in ("cls_token", "pos_embed", "pos_embed_cls", "pos_embed_pat"):
            continue
        if k.startswith("head."):
            if v.ndim == 4 or (k == "head.bias" and info.has_head):
                out[k] = v
            continue  # V1: timm's unused linear classifier
        if _BLOCK_KEY.match(k) or k.startswith(_SHARED_PREFIXES):
            out[k] = v
        else:
            unexpected.append(k)
    refuse_unexpected(unexpected, source, info.layout)
    out["cls_tokens"] = sd["cls_token"].reshape(1, C, D)
    if info.layout == "mctformer-plus":
        cls_pos, pat_pos = sd["pos_embed_cls"], sd["pos_embed_pat"]
        if tuple(cls_pos.shape) != (1, C, D):
            raise TokensegError(f"{source}: pos_embed_cls has shape {tuple(cls_pos.shape)}, expected (1, {C}, {D})")
    else:
        pe = sd["pos_embed"]
        cls_pos, pat_pos = pe[:, :C], pe[:, C:]
    if tuple(pat_pos.shape) != (1, gh * gw, D):
        raise TokensegError(f"{source}: patch position embedding has shape {tuple(pat_pos.shape)}, "
                            f"expected (1, {gh * gw}, {D})")
    out["pos_embed_cls"] = cls_pos.reshape(1, C, D).clone()
    out["pos_embed_pat"] = pat_pos.reshape(1, gh, gw, D).permute(0, 3, 1, 2).contiguous()
    return out


def tokenseg_to_authors_state(sd: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """:class:`ClassTokenViT` keys -> the authors' layout of ``method`` (V1/V2: one ``pos_embed``)."""
    method = canonical_method(method)
    if "cls_tokens" not in sd:
        raise TokensegError(f"not an MCTformer model (no cls_tokens): it cannot be written in the {method} layout")
    pat = authors_patch_positions(sd)
    cls = sd["cls_tokens"]
    out: dict[str, torch.Tensor] = {"cls_token": cls.clone()}
    if method == "mctformer-plus":
        out["pos_embed_cls"] = sd["pos_embed_cls"].clone()
        out["pos_embed_pat"] = pat.contiguous()
    else:
        out["pos_embed"] = torch.cat([sd["pos_embed_cls"], pat], dim=1)
    for k, v in sd.items():
        if k in ("cls_tokens", "pos_embed_cls", "pos_embed_pat"):
            continue
        if k.startswith("head.") and method == "mctformer-v1":
            continue
        out[k] = v.clone()
    if method != "mctformer-v1" and "head.weight" not in sd:
        raise TokensegError(f"{method} needs a PatchCAM head, this model has none (it is mctformer-v1)")
    return out


def export_authors_state(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """A :class:`ClassTokenViT`'s weights in the authors' layout of ``method``."""
    return tokenseg_to_authors_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, method)


# ---------------------------------------------------------------------------------------- building
def _check_method(info: LayoutInfo, method: str | None, source: str) -> str:
    method = canonical_method(method)
    if info.layout == IMAGENET:
        return method or "mctformer-plus"
    if method is None:
        return info.layout
    if method == "mctformer-v1" and info.has_head:
        raise TokensegError(f"{source}: has a PatchCAM conv head, so it is not mctformer-v1 "
                            f"(detected {info.layout})")
    if method != "mctformer-v1" and not info.has_head:
        raise TokensegError(f"{source}: {method} needs the PatchCAM conv head (head.weight, C×D×3×3), "
                            f"which this checkpoint lacks (detected {info.layout})")
    return method


def model_from_state(obj: Any, source: str = "checkpoint", method: str | None = None,
                     num_classes: int | None = None, class_names: str | list[str] | None = None,
                     num_heads: int | None = None, overrides=(), path: str | Path | None = None):
    """Build our model from an already loaded authors' (or ImageNet) checkpoint object.

    Returns ``(model, cfg, class_names)``. ``num_classes`` / ``class_names`` are checked against the
    checkpoint (and required for an ImageNet checkpoint, which has one class token)."""
    sd = unwrap_state_dict(obj, source)
    info = detect_layout(sd, source)
    if info.layout == "tokenseg":
        raise TokensegError(f"{source}: already a tokenseg state dict; load it with load_model_from_checkpoint")
    method = _check_method(info, method, source)
    if info.layout == IMAGENET:
        if num_classes is None and class_names in (None, ""):
            raise TokensegError(f"{source}: an ImageNet backbone checkpoint (one class token): give the number "
                                "of classes (--num-classes) or --class-names to initialise C class tokens from it")
        names = resolve_class_names(class_names, num_classes)
        if path is None:
            raise TokensegError(f"{source}: an ImageNet checkpoint needs its file path")
        cfg = config_for(info, method, num_heads, overrides)
        if cfg.model.backbone_kwargs:
            cfg.model.backbone_kwargs["img_size"] = info.grid[0] * info.patch_size
        cfg.model.pretrained = str(path)
        model = build_model(cfg.model, len(names))  # class token repeated C times (METHODS.md §2)
        model.class_names_source = "given" if class_names not in (None, "") else "default"
        return model.eval(), cfg, names
    C = info.num_classes
    if num_classes is not None and num_classes != C:
        raise TokensegError(f"{source}: the checkpoint has {C} class tokens, but {num_classes} classes were asked for")
    head = sd.get("head.weight")
    if info.has_head and head.shape[0] != C:
        raise TokensegError(f"{source}: head.weight has {head.shape[0]} outputs for {C} class tokens")
    names = resolve_class_names(class_names, C)
    ours = authors_to_tokenseg_state(sd, info, source)
    cfg = config_for(info, method, num_heads, overrides)
    model = build_model(cfg.model, C)
    try:
        load_state_checked(model, ours, source)
    except TokensegError as exc:
        raise TokensegError(f"{exc} [layout {info.layout}, depth {info.depth}, dim {info.embed_dim}, "
                            f"{C} classes]") from None
    # the authors' files carry no class names: a dataset with C classes may supply its own
    model.class_names_source = "given" if class_names not in (None, "") else "default"
    model.eval()
    return model, cfg, names


def load_authors_checkpoint(path: str | Path, method: str | None = None, *, num_classes: int | None = None,
                            class_names: str | list[str] | None = None, num_heads: int | None = None,
                            allow_pickle: bool = False, overrides=()):
    """Load the authors' MCTformer-V1/V2/+ weights (or an ImageNet ViT as initialisation) from ``path``.

    The layout is detected (``method`` forces one; it must fit the weights). Returns ``(model, cfg)``;
    the class names are the returned model's ``class_names`` attribute (VOC for 20 classes, COCO for 80,
    unless ``class_names`` says otherwise)."""
    obj = read_weights(path, allow_pickle)
    model, cfg, names = model_from_state(obj, str(path), method, num_classes, class_names, num_heads,
                                         overrides, path=path)
    model.class_names = names
    return model, cfg


# ---------------------------------------------------------------------------------------- tokenseg convert
# every key of the V1/V2/+ and ImageNet ViT layouts; a file with others is some other family's
_OWN_KEYS = {"cls_token", "pos_embed", "pos_embed_cls", "pos_embed_pat", "dist_token"}
_OWN_PREFIXES = ("blocks.", "patch_embed.", "norm.", "head.", "head_dist.", "fc_norm.")


def claims(sd: dict[str, torch.Tensor]) -> str | None:
    """The layout of ``sd`` when it is one of the authors' MCTformer layouts (or an ImageNet ViT)."""
    if "cls_token" not in sd or any(k not in _OWN_KEYS and not k.startswith(_OWN_PREFIXES) for k in sd):
        return None
    try:
        return detect_layout(sd).layout
    except TokensegError:
        return "mctformer"  # theirs, but malformed: loading it says what is wrong


def _load(obj, source, method, num_classes, class_names, num_heads, path):
    return model_from_state(obj, source, method, num_classes, class_names, num_heads, path=path)


CONVERTER = Converter(title="MCTformer", marks="C class tokens in cls_token (1, C, D)", claims=claims,
                      load=_load, export=tokenseg_to_authors_state, wrap=True)


__all__ = ["LayoutInfo", "detect_layout", "unwrap_state_dict", "read_weights", "authors_to_tokenseg_state",
           "tokenseg_to_authors_state", "export_authors_state", "model_from_state", "load_authors_checkpoint",
           "resolve_class_names", "config_for", "canonical_method", "is_tokenseg_checkpoint", "claims", "CONVERTER"]
