"""Segmentation networks: DeepLab-V2 (timm ResNet, output stride 8, ASPP 6/12/18/24) and a ViT option.

* :class:`DeepLabV2`: a timm ``features_only`` backbone with ``output_stride=8`` (dilated last stages,
  as DeepLab-V2's ResNet-101) and the V2 ASPP head: parallel 3×3 convolutions with dilations
  6/12/18/24, each predicting class scores directly, summed. Logits are upsampled bilinearly to the
  input. The papers' networks: DeepLab-V2 ResNet-101 (CLIP-ES, POT, OTPL, CTI on COCO); MCTformer
  uses DeepLab-V1 on ResNet-38, which timm does not have.
* :class:`ViTSegmenter`: a timm ViT (``dynamic_img_size``) whose patch tokens feed a small conv
  decoder (3×3 conv, BN, ReLU, 1×1 conv), upsampled to the input.

Weights: ``pretrained=True`` downloads timm's ImageNet weights (online); ``weights=PATH`` loads a
local file (timm/torchvision state dict) instead; neither = random initialisation.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import TokensegError
from ..models.backbone import create_feature_backbone, create_timm


class ASPPV2(nn.Module):
    """DeepLab-V2 ASPP: Σ_d conv3x3_dilation=d(x), each branch predicting the classes."""

    def __init__(self, in_ch: int, num_classes: int, dilations=(6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=int(d), dilation=int(d), bias=True) for d in dilations)
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


def _freeze_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class DeepLabV2(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet101", pretrained: bool = False, weights: str = "",
                 output_stride: int = 8, dilations=(6, 12, 18, 24), feature_stage: int = -1,
                 freeze_bn: bool = False, backbone_kwargs: dict | None = None) -> None:
        super().__init__()
        self.backbone = create_feature_backbone(backbone, pretrained, weights, output_stride, (feature_stage,),
                                                **(backbone_kwargs or {}))
        ch = self.backbone.feature_info.channels()[-1]
        self.head = ASPPV2(ch, num_classes, dilations)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            _freeze_bn(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            _freeze_bn(self.backbone)
        return self

    def backbone_parameters(self):
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self):
        return list(self.head.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)[-1]
        logits = self.head(feat)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ViTSegmenter(nn.Module):
    """timm ViT patch tokens -> conv decoder -> logits at the input size (input padded to the patch)."""

    def __init__(self, num_classes: int, backbone: str = "deit_small_patch16_224", pretrained: bool = False,
                 weights: str = "", decoder_dim: int = 256, backbone_kwargs: dict | None = None) -> None:
        super().__init__()
        kwargs = dict(backbone_kwargs or {})
        kwargs.setdefault("dynamic_img_size", True)
        self.backbone = create_timm(backbone, pretrained, weights, num_classes=0, **kwargs)
        if not hasattr(self.backbone, "patch_embed") or not hasattr(self.backbone, "forward_features"):
            raise TokensegError(f"segment.backbone {backbone!r} is not a timm ViT (segment.arch=vit)")
        ps = self.backbone.patch_embed.patch_size
        self.patch = int(ps if isinstance(ps, int) else ps[0])
        self.prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))
        dim = self.backbone.embed_dim
        self.head = nn.Sequential(
            nn.Conv2d(dim, decoder_dim, 3, padding=1, bias=False), nn.BatchNorm2d(decoder_dim), nn.ReLU(inplace=True),
            nn.Conv2d(decoder_dim, num_classes, 1))

    def backbone_parameters(self):
        return list(self.backbone.parameters())

    def head_parameters(self):
        return list(self.head.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        p = self.patch
        ph, pw = (-H) % p, (-W) % p
        xp = F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x
        tokens = self.backbone.forward_features(xp)[:, self.prefix:]
        h, w = xp.shape[-2] // p, xp.shape[-1] // p
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        logits = self.head(fmap)
        logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W]


def build_segmenter(sc, num_classes: int) -> nn.Module:
    """The network of a :class:`~tokenseg.config.SegmentConfig` for ``num_classes`` (incl. background)."""
    from_weights = bool(sc.pretrained or sc.weights)
    if sc.arch == "deeplabv2":
        return DeepLabV2(num_classes, sc.backbone, sc.pretrained, sc.weights, sc.output_stride,
                         tuple(sc.aspp_dilations), sc.feature_stage, freeze_bn=bool(sc.freeze_bn) and from_weights,
                         backbone_kwargs=sc.backbone_kwargs)
    if sc.arch == "vit":
        return ViTSegmenter(num_classes, sc.backbone, sc.pretrained, sc.weights, sc.decoder_dim, sc.backbone_kwargs)
    raise TokensegError(f"segment.arch must be deeplabv2 or vit, got {sc.arch!r}")
