"""Model construction from a :class:`~tokenseg.config.ModelConfig`."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..core.errors import TokensegError
from .classtoken import ClassTokenViT, MapOutputs, explicit_attention, gwrp, pool_patch_scores, resize_pos_grid

__all__ = ["ClassTokenViT", "MapOutputs", "build_model", "explicit_attention", "gwrp", "pool_patch_scores", "resize_pos_grid",
           "load_backbone_weights"]


def _create_backbone(cfg: ModelConfig, pretrained: bool) -> nn.Module:
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


def build_model(cfg: ModelConfig, num_classes: int, decay_pos_embed: bool = False) -> ClassTokenViT:
    """Create the class-token ViT for ``cfg.method`` on the timm backbone ``cfg.backbone``.

    ``cfg.pretrained``: False (random init), True (timm weights, needs network), or a local file."""
    pretrained = cfg.pretrained
    online = pretrained is True
    if online:  # offline: fail at once naming the file, or use the cached copy
        from ..core.hub import require_timm_download

        cached = require_timm_download(cfg.backbone, "model.pretrained", "model.pretrained")
        if cached is not None:
            online, pretrained = False, str(cached)
    backbone = _create_backbone(cfg, pretrained=online)
    if isinstance(pretrained, str) and pretrained:
        load_backbone_weights(backbone, pretrained)
    from .classtoken import _patch_size

    patch = _patch_size(backbone)
    if cfg.stem == "conv":
        from .stem import ConvStem

        backbone.patch_embed.proj = ConvStem(patch, backbone.embed_dim)
    grid = (cfg.img_size // patch, cfg.img_size // patch)
    return ClassTokenViT(
        backbone, num_classes=num_classes, train_grid=grid,
        patch_head=cfg.method != "mctformer-v1", pooling=cfg.pooling, gwrp_decay=cfg.gwrp_decay,
        distinct_init=cfg.token_init == "independent" or (cfg.token_init == "auto" and not pretrained),
        final_norm=cfg.final_norm, decay_pos_embed=decay_pos_embed)
