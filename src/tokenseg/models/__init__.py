"""The shared model pieces: timm backbones (:func:`load_backbone_weights` reads an ImageNet ViT file), the
class-token ViT of MCTformer and CTI, attention, CLIP. A method's own model lives in its package
(``tokenseg.methods.<name>``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..core.errors import TokensegError
from .classtoken import ClassTokenViT, MapOutputs, explicit_attention, gwrp, pool_patch_scores, resize_pos_grid

__all__ = ["ClassTokenViT", "MapOutputs", "explicit_attention", "gwrp", "pool_patch_scores", "resize_pos_grid",
           "load_backbone_weights", "create_backbone", "vit_backbone"]


def create_backbone(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    """The timm ViT ``cfg.backbone`` without classifier (``model.drop_path``, ``backbone_kwargs``)."""
    import timm

    kwargs = dict(cfg.backbone_kwargs)
    kwargs.setdefault("drop_path_rate", cfg.drop_path)
    try:
        return timm.create_model(cfg.backbone, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise TokensegError(f"model.backbone: unknown timm model {cfg.backbone!r}") from exc
        raise
    except Exception as exc:
        if pretrained:
            raise TokensegError(
                f"model.pretrained=true: could not download ImageNet weights for {cfg.backbone!r} "
                f"({type(exc).__name__}: {exc}). Offline, download the checkpoint elsewhere and set "
                f"model.pretrained=/path/to/weights.pth") from exc
        raise


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load an ImageNet ViT checkpoint (timm/DeiT/DINO layout, optionally under 'model' or
    'state_dict') into a timm backbone; the classifier head is dropped, the position grid resized."""
    from ..core.weights import read_weights, unwrap_state_dict

    path = Path(path)
    if not path.is_file():
        raise TokensegError(f"model.pretrained: weights file {path} not found")
    sd = read_weights(path)  # tensors-only
    sd = unwrap_state_dict(sd, f"model.pretrained: {path}", strip=("module.", "backbone."))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist.", "fc_norm."))}
    if "pos_embed" in sd and sd["pos_embed"].shape != backbone.pos_embed.shape:
        pe = sd["pos_embed"]
        n_src = pe.shape[1] - 1
        g = int(round(n_src ** 0.5))
        grid = backbone.patch_embed.grid_size
        pat = pe[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pat = resize_pos_grid(pat, grid, "auto").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        sd["pos_embed"] = torch.cat([pe[:, :1], pat], dim=1)
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("head", "fc_norm"))]
    if missing or unexpected:
        raise TokensegError(
            f"{path}: does not match backbone: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def vit_backbone(cfg: ModelConfig, pretrained: Any = None) -> tuple[nn.Module, tuple[int, int]]:
    """The timm ViT of ``cfg`` with weights as ``pretrained`` (default ``cfg.pretrained``) says — False,
    True (timm's download) or a file (:func:`load_backbone_weights`) — the conv stem under
    ``model.stem=conv``, and the patch grid of the training size ``model.img_size``."""
    from .classtoken import _patch_size

    pretrained = cfg.pretrained if pretrained is None else pretrained
    backbone = create_backbone(cfg, pretrained=pretrained is True)
    if isinstance(pretrained, str) and pretrained:
        load_backbone_weights(backbone, pretrained)
    patch = _patch_size(backbone)
    if cfg.stem == "conv":
        from .stem import ConvStem

        backbone.patch_embed.proj = ConvStem(patch, backbone.embed_dim)
    return backbone, (cfg.img_size // patch, cfg.img_size // patch)
