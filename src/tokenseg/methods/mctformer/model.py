"""MCTformer's model: the class-token ViT (:class:`~tokenseg.models.classtoken.ClassTokenViT`) of a variant."""
from __future__ import annotations

from ...config import ModelConfig
from ...models import ClassTokenViT, vit_backbone


def build_model(cfg: ModelConfig, num_classes: int, decay_pos_embed: bool = False,
                variant: str | None = None) -> ClassTokenViT:
    """The class-token ViT of MCTformer ``variant`` (default ``cfg.method``) on the timm backbone
    ``cfg.backbone``: V1 has no PatchCAM head.

    ``cfg.pretrained``: False (random init), True (timm weights, needs network), or a local file."""
    pretrained = cfg.pretrained
    online = pretrained is True
    if online:  # offline: fail at once naming the file, or use the cached copy
        from ...core.hub import require_timm_download

        cached = require_timm_download(cfg.backbone, "model.pretrained", "model.pretrained")
        if cached is not None:
            online, pretrained = False, str(cached)
    backbone, grid = vit_backbone(cfg, True if online else pretrained)
    return ClassTokenViT(
        backbone, num_classes=num_classes, train_grid=grid,
        patch_head=(variant or cfg.method) != "mctformer-v1", pooling=cfg.pooling, gwrp_decay=cfg.gwrp_decay,
        distinct_init=cfg.token_init == "independent" or (cfg.token_init == "auto" and not pretrained),
        final_norm=cfg.final_norm, decay_pos_embed=decay_pos_embed)
