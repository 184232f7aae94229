"""Multi-class-token wrapper around a timm Vision Transformer (MCTformer-V1/V2/+).

The wrapper re-uses the timm model's patch embedding, blocks and final norm, and replaces its single
class token with ``C`` class tokens. Position embeddings are kept separately for class tokens
(``pos_embed_cls``, 1×C×D) and patch tokens (``pos_embed_pat``, 1×D×Gh×Gw at the training grid) so the
patch part can be interpolated to any input size (METHODS.md §2).

Two forward paths:

* :meth:`ClassTokenViT.forward` for training: timm blocks with fused attention
  (``F.scaled_dot_product_attention``); no attention matrix is ever materialised.
* :meth:`ClassTokenViT.forward_maps` for map generation: explicit attention only in the layers a
  recipe needs, reduced on the fly (head mean, layer sum) instead of stacking L×B×H×N×N.

Methods with other token groups (CTI: a background token and tokens from a tokenizer MLP; MMCST:
textual tokens) subclass it and override :meth:`ClassTokenViT.prefix_tokens`; every forward goes
through :func:`tokenseg.models.attention.run_blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import explicit_attention, run_blocks


def gwrp(scores: torch.Tensor, decay: float) -> torch.Tensor:
    """Global Weighted Ranking Pooling over the last dim: Σ_j λ^{j-1} r_j / Σ_j λ^{j-1} (Eq. 7)."""
    m = scores.shape[-1]
    weights = decay ** torch.arange(m, device=scores.device, dtype=torch.float32)
    ranked = scores.float().sort(dim=-1, descending=True).values
    return (ranked * weights).sum(-1) / weights.sum()


def pool_patch_scores(fmap: torch.Tensor, pooling: str, decay: float) -> torch.Tensor:
    """(B, C, h, w) PatchCAM logits -> (B, C) class scores."""
    flat = fmap.flatten(2)
    if pooling == "gap":
        return flat.float().mean(-1)
    if pooling == "gmp":
        return flat.float().amax(-1)
    if pooling == "gwrp":
        return gwrp(flat, decay)
    raise ValueError(f"unknown pooling {pooling!r}")


@dataclass
class MapOutputs:
    """What :meth:`ClassTokenViT.forward_maps` returns (all on the patch grid)."""

    attention: torch.Tensor  # (B, C, h, w) class-to-patch attention reduced over the last K layers
    patchcam: torch.Tensor | None  # (B, C, h, w) ReLU(conv(patch tokens)), None for V1
    affinity: torch.Tensor | None  # (B, M, M) head-mean patch-to-patch attention summed over layers
    cls_logits: torch.Tensor  # (B, C)
    grid: tuple[int, int]


class ClassTokenViT(nn.Module):
    """A timm ViT with ``num_classes`` class tokens and an optional 3×3 PatchCAM head."""

    def __init__(self, backbone: nn.Module, num_classes: int, train_grid: tuple[int, int],
                 patch_head: bool = True, pooling: str = "gwrp", gwrp_decay: float = 0.996,
                 pos_resize: str = "auto", distinct_init: bool = False, final_norm: bool = False,
                 decay_pos_embed: bool = False) -> None:
        super().__init__()
        for attr in ("patch_embed", "blocks", "norm", "cls_token", "pos_embed"):
            if getattr(backbone, attr, None) is None:
                raise ValueError(f"backbone {type(backbone).__name__} lacks '{attr}': not a timm ViT with a class token")
        if getattr(backbone, "num_prefix_tokens", 1) != 1:
            raise ValueError("backbones with register/distillation tokens are not supported")
        self.num_classes = num_classes
        self.embed_dim = backbone.embed_dim
        self.patch_size = _patch_size(backbone)
        self.patch_embed = backbone.patch_embed
        self.blocks = backbone.blocks
        self.norm = backbone.norm  # kept in the state dict (lossless conversion) even when not applied
        # CLIP-style towers normalise the embedded tokens before the first block (timm's norm_pre)
        self.norm_pre = getattr(backbone, "norm_pre", None) or nn.Identity()
        self.final_norm = final_norm
        if not final_norm:  # unused: frozen, so the optimizer and DDP leave it alone (as the authors' code)
            self.norm.requires_grad_(False)
        self.decay_pos_embed = decay_pos_embed
        self.pooling = pooling
        self.gwrp_decay = gwrp_decay
        self.train_grid = tuple(train_grid)
        D, C = self.embed_dim, num_classes

        # Class tokens (and their position embedding) start as copies of the backbone's one class
        # token, as in the papers ("all class tokens were initialized by the pre-trained class token").
        self.cls_tokens = nn.Parameter(backbone.cls_token.detach().clone().expand(1, C, D).contiguous())
        if distinct_init:
            # Without pretrained weights, C copies of one random token stay identical: CCT's gradient
            # is zero for identical tokens and the class-score head (mean over D after LayerNorm) is
            # zero at init, so nothing breaks the symmetry. Start them as independent draws instead.
            nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        pos = backbone.pos_embed.detach()
        no_embed_class = getattr(backbone, "no_embed_class", False)
        cls_pos = torch.zeros(1, 1, D) if no_embed_class else pos[:, :1]
        pat_pos = pos if no_embed_class else pos[:, 1:]
        g0 = backbone.patch_embed.grid_size
        pat_pos = pat_pos.reshape(1, g0[0], g0[1], D).permute(0, 3, 1, 2)
        self.pos_embed_cls = nn.Parameter(cls_pos.clone().expand(1, C, D).contiguous())
        if distinct_init:
            nn.init.trunc_normal_(self.pos_embed_cls, std=0.02)
        self.pos_embed_pat = nn.Parameter(resize_pos_grid(pat_pos, self.train_grid, pos_resize).contiguous())
        self.head = nn.Conv2d(D, C, kernel_size=3, stride=1, padding=1) if patch_head else None
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for blk in self.blocks:
            if not hasattr(blk, "attn") or not hasattr(blk.attn, "qkv"):
                raise ValueError("only standard timm ViT blocks (attn.qkv) are supported")
            blk.attn.fused_attn = True  # untapped layers never materialise attention

    # ------------------------------------------------------------------ embedding
    @property
    def num_prefix(self) -> int:
        """Tokens before the patch tokens (C class tokens here; subclasses may add more)."""
        return self.num_classes

    def prefix_tokens(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The (B, num_prefix, D) tokens placed before the patches, position embedding included."""
        return (self.cls_tokens + self.pos_embed_cls).expand(batch, -1, -1).to(dtype)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B,3,H,W) -> patch tokens (B, M, D) with their position embedding (bicubic to the grid).
        Sizes that are not a multiple of the patch are floored by the patch convolution, as the authors."""
        p = self.patch_embed.proj(x)  # (B, D, h, w)
        h, w = p.shape[-2:]
        tokens = self.patch_embed.norm(p.flatten(2).transpose(1, 2))
        pos = self.pos_embed_pat
        if (h, w) != tuple(pos.shape[-2:]):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return tokens + pos.flatten(2).transpose(1, 2).to(tokens.dtype), (h, w)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B,3,H,W) -> tokens (B, num_prefix + M, D) and the patch grid."""
        tokens, grid = self.embed_patches(x)
        tokens = torch.cat([self.prefix_tokens(x.shape[0], tokens.dtype), tokens], dim=1)
        return self.norm_pre(tokens), grid

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer must not decay (besides 1-D ones): the class tokens, and the position
        embeddings unless ``decay_pos_embed`` (the authors' MCTformer+ decays them, V1/V2 do not)."""
        return {"cls_tokens"} | (set() if self.decay_pos_embed else {"pos_embed_cls", "pos_embed_pat"})

    def output_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The backbone's final LayerNorm when ``final_norm`` is set. The authors' MCTformer-V1/V2/+ and
        CTI never apply it (METHODS.md §16.1): class scores and the PatchCAM see the raw residual stream."""
        return self.norm(tokens) if self.final_norm else tokens

    def patch_logits_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.head is None:
            return None
        B, _, D = tokens.shape
        pat = tokens[:, self.num_prefix:].transpose(1, 2).reshape(B, D, grid[0], grid[1])
        return self.head(pat)

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, return_layer_tokens: bool = False) -> dict:
        """Training forward with fused attention. Returns class-token logits (mean over D, Eq. 4),
        PatchCAM logits pooled to class scores (V2/+), the output tokens (B, prefix + M, D) and grid (for
        methods built on top, e.g. OTPL), and optionally every layer's class tokens (CCT)."""
        tokens, grid = self.embed(x)
        res = run_blocks(self.blocks, tokens, self.num_classes, keep_layer_tokens=return_layer_tokens)
        return self.head_outputs(self.output_norm(res.tokens), grid, res.layer_tokens if return_layer_tokens else None)

    def head_outputs(self, tokens: torch.Tensor, grid: tuple[int, int], layer_tokens: list | None = None) -> dict:
        """What every class-token forward returns from its output tokens: ``cls_logits`` (the mean of each
        of the first C tokens), ``tokens``, ``grid``, with a head ``patch_map`` and its pooled
        ``patch_logits``, and ``layer_cls_tokens`` when given."""
        out = {"cls_logits": tokens[:, : self.num_classes].float().mean(-1), "tokens": tokens, "grid": grid}
        fmap = self.patch_logits_map(tokens, grid)
        if fmap is not None:
            out["patch_map"] = fmap
            out["patch_logits"] = pool_patch_scores(fmap, self.pooling, self.gwrp_decay)
        if layer_tokens is not None:
            out["layer_cls_tokens"] = layer_tokens
        return out

    # ------------------------------------------------------------------ maps
    @torch.no_grad()
    def forward_maps(self, x: torch.Tensor, last_k: int, affinity: bool, layer_reduce: str = "mean",
                     affinity_layers: int = 0) -> MapOutputs:
        """Forward pass that also returns class-to-patch attention of the last ``last_k`` layers
        (reduced by ``layer_reduce``), the PatchCAM, and optionally the patch affinity: the head-mean
        patch-to-patch attention summed over the last ``affinity_layers`` layers (0 = all).

        Only the needed attention rows are computed explicitly; other layers use fused attention."""
        tokens, grid = self.embed(x)
        C = self.num_classes
        tokens, rows, affinity_map = self.map_pass(tokens, C, last_k, affinity, layer_reduce, affinity_layers)
        fmap = self.patch_logits_map(tokens, grid)
        patchcam = F.relu(fmap.float()) if fmap is not None else None
        return MapOutputs(attention=rows.reshape(x.shape[0], C, *grid), patchcam=patchcam, affinity=affinity_map,
                          cls_logits=tokens[:, :C].float().mean(-1), grid=grid)

    def map_pass(self, tokens: torch.Tensor, prefix: int, last_k: int, affinity: bool, layer_reduce: str,
                 affinity_layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The blocks of a map forward (every class-token model's): ``(output tokens, prefix-to-patch
        attention (B, prefix, M) summed — or averaged — over the last ``last_k`` layers, patch affinity
        (B, M, M) summed over the last ``affinity_layers`` layers (0 = all) or None)``."""
        L = len(self.blocks)
        last_k = min(max(last_k, 1), L)
        aff_from = 0 if affinity_layers <= 0 else L - min(affinity_layers, L)
        res = run_blocks(self.blocks, tokens, prefix, row_layers=range(L - last_k, L),
                         full_layers=range(aff_from, L) if affinity else ())
        rows = res.rows[:, :, prefix:]
        if layer_reduce == "mean":
            rows = rows / last_k
        full = res.full[:, prefix:, prefix:] if res.full is not None else None
        return self.output_norm(res.tokens), rows, full


def _patch_size(backbone: nn.Module) -> int:
    ps = backbone.patch_embed.patch_size
    ps = ps if isinstance(ps, int) else ps[0]
    return int(ps)


def resize_pos_grid(pos: torch.Tensor, grid: tuple[int, int], mode: str = "auto") -> torch.Tensor:
    """Resize a (1, D, gh, gw) patch position-embedding grid.

    ``auto``: nearest-neighbour copy when the target is an integer multiple (MCTformer+ copies each
    14×14 embedding 2×2 for 448 px), bicubic otherwise; identity at the same size."""
    src = tuple(pos.shape[-2:])
    grid = tuple(grid)
    if src == grid:
        return pos.clone()
    integer = grid[0] % src[0] == 0 and grid[1] % src[1] == 0 and grid[0] // src[0] == grid[1] // src[1]
    if mode == "nearest" or (mode == "auto" and integer):
        return F.interpolate(pos, size=grid, mode="nearest")
    return F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)


def num_patches_for(img_size: int, patch: int) -> int:
    return (img_size // patch) ** 2


__all__ = ["ClassTokenViT", "MapOutputs", "explicit_attention", "gwrp", "pool_patch_scores", "resize_pos_grid",
           "num_patches_for"]
