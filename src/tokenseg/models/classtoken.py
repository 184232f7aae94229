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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        self.final_norm = final_norm
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

    # ------------------------------------------------------------------ embedding
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image (B,3,H,W) -> tokens (B, C+M, D). Sizes that are not a multiple of the patch are floored
        by the patch convolution, as in the authors' code."""
        p = self.patch_embed.proj(x)  # (B, D, h, w)
        h, w = p.shape[-2:]
        tokens = p.flatten(2).transpose(1, 2)
        tokens = self.patch_embed.norm(tokens)
        pos = self.pos_embed_pat
        if (h, w) != tuple(pos.shape[-2:]):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2).to(tokens.dtype)
        cls = (self.cls_tokens + self.pos_embed_cls).expand(x.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([cls, tokens], dim=1), (h, w)

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
        pat = tokens[:, self.num_classes:].transpose(1, 2).reshape(B, D, grid[0], grid[1])
        return self.head(pat)

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, return_layer_tokens: bool = False) -> dict:
        """Training forward with fused attention. Returns class-token logits (mean over D, Eq. 4),
        PatchCAM logits pooled to class scores (V2/+), and optionally every layer's class tokens (CCT)."""
        tokens, grid = self.embed(x)
        layer_cls = []
        for blk in self.blocks:
            tokens = blk(tokens)
            if return_layer_tokens:
                layer_cls.append(tokens[:, : self.num_classes])
        tokens = self.output_norm(tokens)
        out = {"cls_logits": tokens[:, : self.num_classes].float().mean(-1)}
        fmap = self.patch_logits_map(tokens, grid)
        if fmap is not None:
            out["patch_map"] = fmap
            out["patch_logits"] = pool_patch_scores(fmap, self.pooling, self.gwrp_decay)
        if return_layer_tokens:
            out["layer_cls_tokens"] = layer_cls
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
        C, L = self.num_classes, len(self.blocks)
        last_k = min(max(last_k, 1), L)
        aff_from = 0 if affinity_layers <= 0 else L - min(affinity_layers, L)
        c2p = None
        p2p = None
        for li, blk in enumerate(self.blocks):
            want_c2p = li >= L - last_k
            want_p2p = affinity and li >= aff_from
            h = blk.norm1(tokens)
            attn_out, cls_rows, head_mean = _attention_with_maps(blk.attn, h, C, want_c2p, want_p2p)
            tokens += blk.drop_path1(blk.ls1(attn_out))  # in place: no grad here, one buffer less per layer
            tokens += blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(tokens))))
            if want_c2p:
                rows = cls_rows[:, :, C:].float()
                c2p = rows if c2p is None else c2p + rows
            if want_p2p:
                pp = head_mean[:, C:, C:].float()
                p2p = pp if p2p is None else p2p + pp
        if layer_reduce == "mean":
            c2p = c2p / last_k
        tokens = self.output_norm(tokens)
        B = x.shape[0]
        attention = c2p.reshape(B, C, grid[0], grid[1])
        fmap = self.patch_logits_map(tokens, grid)
        patchcam = F.relu(fmap.float()) if fmap is not None else None
        return MapOutputs(attention=attention, patchcam=patchcam, affinity=p2p,
                          cls_logits=tokens[:, :C].float().mean(-1), grid=grid)


# Rows per block on the CPU: one head's rows×N scores take about this many floats (4 MiB), so QKᵀ,
# softmax, AV and the head sum run on data that stays in cache, in buffers allocated once. Computing the
# whole H×N×N at once (N≈1150 at 1.25× VOC size) writes 32 MB per layer into fresh memory: QKᵀ then runs
# at about half the machine's matmul rate and every page is faulted in (~1.7× slower per layer).
_CPU_BLOCK_FLOATS = 1 << 20


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       blocked: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ) v as (B, N, H·d) with the head-mean probabilities (B, N, N) in fp32; q is already
    scaled.

    ``blocked`` (default: on the CPU) runs per sample, block of query rows and head (each row's softmax
    is independent, so this equals the whole product up to float rounding); otherwise (GPUs) one
    batched product."""
    B, H, N, d = q.shape
    if not (q.device.type == "cpu" if blocked is None else blocked):
        probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, N, H * d), _head_mean(probs)
    out = torch.empty(B, H, N, d, dtype=q.dtype, device=q.device)
    head_mean = torch.empty(B, N, N, dtype=torch.float32, device=q.device)
    rows = max(16, _CPU_BLOCK_FLOATS // N)
    scratch = torch.empty(min(rows, N) * N, dtype=q.dtype, device=q.device)
    for b in range(B):
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            acc = head_mean[b, r0:r1]  # the head sum, accumulated in fp32
            for h in range(H):
                # fp32: the first head's probabilities are written straight into the sum
                direct = h == 0 and q.dtype == torch.float32
                probs = acc if direct else scratch[: (r1 - r0) * N].view(r1 - r0, N)
                torch.mm(q[b, h, r0:r1], k[b, h].T, out=probs)
                torch.softmax(probs, -1, out=probs)
                torch.mm(probs, v[b, h], out=out[b, h, r0:r1])
                if h > 0:
                    acc += probs
                elif not direct:
                    acc.copy_(probs)
            acc.mul_(1.0 / H)
    return out.transpose(1, 2).reshape(B, N, H * d), head_mean


def _head_mean(probs: torch.Tensor) -> torch.Tensor:
    """Mean over heads (dim 1) in fp32. A half-precision tensor is summed head by head into fp32: a
    dim-1 reduction of a bf16 tensor first upcasts all of it (~9× slower on the CPU)."""
    if probs.dtype == torch.float32:
        return probs.mean(1)
    hm = probs[:, 0].float()
    for h in range(1, probs.shape[1]):
        hm += probs[:, h]
    return hm.div_(probs.shape[1])


def _attention_with_maps(attn: nn.Module, x: torch.Tensor, num_cls: int, want_cls_rows: bool,
                         want_full: bool):
    """timm ``Attention`` forward that also returns attention probabilities, head-averaged.

    ``want_full``: the full (B, N, N) head-mean attention (and the output is computed from it).
    ``want_cls_rows``: only the class-token query rows (B, C, N); the output uses fused attention.
    """
    B, N, _ = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_rows = head_mean = None
    if want_full:
        out, head_mean = explicit_attention(q * attn.scale, k, v)
        cls_rows = head_mean[:, :num_cls] if want_cls_rows else None
    else:
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        if want_cls_rows:
            cls_rows = ((q[:, :, :num_cls] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    out = attn.proj(out)
    out = attn.proj_drop(out)
    return out, cls_rows, head_mean


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
