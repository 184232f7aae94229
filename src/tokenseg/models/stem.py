"""A convolutional stem for ViTs trained from scratch (the demo, small datasets).

A linear patch embedding has no locality prior, which a ViT learns only from a lot of data;
a few stride-2 3×3 convolutions in its place ("Early convolutions help transformers see better",
Xiao et al., 2021) make a tiny ViT learn textures and shapes within minutes on a CPU. The stem has the
same stride as the patch size, so the token grid, the position embeddings and every map are unchanged.
Pretrained backbones keep timm's linear embedding (``model.stem: patch``).
"""
from __future__ import annotations

import math

import torch.nn as nn


class ConvStem(nn.Sequential):
    """log2(patch) stride-2 conv3×3 + GELU stages (channels D/2^k … D), then a 1×1 projection."""

    def __init__(self, patch: int, embed_dim: int, in_chans: int = 3) -> None:
        n = int(round(math.log2(patch)))
        if 2 ** n != patch:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for k in range(n):
            c_out = max(embed_dim // 2 ** (n - 1 - k), 16)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        super().__init__(*layers)
