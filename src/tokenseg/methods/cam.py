"""A plain CAM baseline on a timm CNN — the worked example of README "Adding a method".

A ResNet (any timm CNN) at output stride 16, a 1×1 conv classifier, global average pooling and the
multilabel soft-margin loss; its map is the class activation map ReLU(conv(features)). Everything else
(training loop, views, maps over scales and flips, seeds, evaluation, pseudo masks) is the engine's.
"""
from __future__ import annotations

from typing import ClassVar
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.losses import multilabel_soft_margin
from . import MapRecipe, Method, register


@dataclass
class CAMConfig:
    """``cam.*``: the CNN and its output stride."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "cam.output_stride": ">=1"}

    backbone: str = "resnet50"
    output_stride: int = 16


class CAMNet(nn.Module):
    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__()
        from ..models.backbone import create_feature_backbone

        pretrained = cfg.model.pretrained
        self.features = create_feature_backbone(cfg.cam.backbone, pretrained is True,
                                                pretrained if isinstance(pretrained, str) else "",
                                                output_stride=cfg.cam.output_stride, key="model")
        channels = self.features.feature_info.channels()[-1]
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)
        self.patch_size = cfg.cam.output_stride  # the map pipeline's size multiple

    def forward(self, x: torch.Tensor) -> dict:
        cam = self.classifier(self.features(x)[-1])
        return {"cls_logits": cam.float().mean((2, 3)), "cam": cam}


def loss(out: dict, batch: dict, ctx, cfg) -> dict:
    return {"cls": multilabel_soft_margin(out["cls_logits"], batch["labels"])}


def combine(model, x, labels, classes, cfg, kinds) -> dict:
    return {"cam": F.relu(model(x)["cam"][:, classes])}


register(Method(
    name="cam", summary="plain CAM on a timm CNN (GAP classifier): the worked example",
    build=CAMNet, loss=loss, class_scores=lambda model, x: model(x)["cls_logits"],
    recipe=MapRecipe(kinds=("cam",), default_kinds=("cam",), combine=combine, size_rounding="none"),
    section="cam", section_config=CAMConfig))
