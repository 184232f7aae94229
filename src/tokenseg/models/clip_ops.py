"""CLIP's towers as functions: cached text features, the input size and normalisation, and the visual
tower's pieces (embedding, blocks, q/k/v, pooling) that CLIP-ES and MMCST run step by step."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import TokensegError
from ..core.files import write_bytes_atomic
from .clip import ClipModel, OPENAI_MEAN, OPENAI_STD


# --------------------------------------------------------------------------------------------
# Text features (cached)
# --------------------------------------------------------------------------------------------

def text_features(model: ClipModel, names: Sequence[str], template: str | Sequence[str] = "a clean origami {}.",
                  cache_dir: str | os.PathLike | None = None, *, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings (len(names), E), float32 on the CPU.

    As CLIP-ES's zero-shot classifier: each ``template.format(name)`` embedded and normalised, the mean
    over templates re-normalised. Cached under ``cache_dir/clip_text/`` per (model fingerprint,
    templates, names) and written atomically; a cache file whose stored names differ is recomputed."""
    templates = [template] if isinstance(template, str) else list(template)
    names = [str(n) for n in names]
    if not templates or any("{}" not in t for t in templates):
        raise TokensegError(f"clip_es.template: every template needs a '{{}}' for the class name, got {templates}")
    if not names:
        return torch.zeros(0, model.visual.output_dim)
    path = text_cache_path(model, names, templates, cache_dir) if cache_dir else None
    if path is not None:
        cached = _read_text_cache(path, names, templates)
        if cached is not None:
            return cached
    texts = [t.format(n) for n in names for t in templates]
    device = next(model.text.parameters()).device if model.has_text else torch.device("cpu")
    emb = torch.cat([model.encode_text(model.tokenize(texts[i:i + batch_size]).to(device)).float()
                     for i in range(0, len(texts), batch_size)])
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb = emb.view(len(names), len(templates), -1).mean(1)
    emb = (emb / emb.norm(dim=-1, keepdim=True)).cpu()
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, features=emb.numpy(), names=np.array(json.dumps(names)),
                 templates=np.array(json.dumps(templates)))
        write_bytes_atomic(path, buf.getvalue())
    return emb


def text_cache_path(model: ClipModel, names: Sequence[str], templates: Sequence[str],
                    cache_dir: str | os.PathLike) -> Path:
    """Where the text features of ``names`` under ``templates`` for these weights are cached (an ``.npz``
    of ``features``, and the JSON ``names`` / ``templates`` they are for): one file per (weights,
    templates, names), so features made elsewhere (a machine with the text tower) can be placed here."""
    key = hashlib.sha256(json.dumps({"v": 1, "model": model.fingerprint(), "templates": list(templates),
                                     "names": [str(n) for n in names]}).encode()).hexdigest()[:32]
    return Path(cache_dir).expanduser() / "clip_text" / f"{key}.npz"


def _read_text_cache(path: Path, names: list[str], templates: list[str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["names"])) != names or json.loads(str(z["templates"])) != templates:
                return None
            return torch.from_numpy(z["features"].astype(np.float32))
    except Exception:  # a damaged cache file is recomputed (and rewritten atomically)
        return None


# --------------------------------------------------------------------------------------------
# Input and the visual forward
# --------------------------------------------------------------------------------------------

def clip_input_size(height: int, width: int, patch: int = 16) -> tuple[int, int]:
    """CLIP-ES's network input: each side up to the next multiple of the patch size."""
    return int(math.ceil(height / patch) * patch), int(math.ceil(width / patch) * patch)


def clip_input(image, patch: int = 16, mean: Sequence[float] = OPENAI_MEAN,
               std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """(3, H', W') float32: PIL bicubic resize of the RGB image to :func:`clip_input_size`, /255, CLIP
    mean/std — what CLIP-ES's torchvision transform does (PIL resizes the uint8 image)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    h, w = clip_input_size(img.height, img.width, patch)
    arr = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return t.sub_(m).div_(s)


def resize_clip_pos_embed(pos: torch.Tensor, grid: tuple[int, int], fp16: bool = True) -> torch.Tensor:
    """(1 + g², D) CLIP position embedding → (1 + h·w, D): the patch part resized bilinearly
    (align_corners False) to the token grid, the class position kept.

    ``fp16``: round the result to float16 as CLIP-ES's ``upsample_pos_emb`` does (it stores the grid
    as a half Parameter, which is then cast back to the input's dtype) — their default."""
    cls, patches = pos[:1], pos[1:]
    g = int(round(patches.shape[0] ** 0.5))
    if g * g != patches.shape[0]:
        raise TokensegError(f"position embedding with {patches.shape[0]} patch rows is not a square grid")
    grid_t = patches.float().T.reshape(1, -1, g, g)
    grid_t = F.interpolate(grid_t, size=tuple(grid), mode="bilinear", align_corners=False)
    out = torch.cat([cls.float(), grid_t.reshape(grid_t.shape[1], -1).T], 0)
    return out.half().float() if fp16 else out


def layer_norm(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32 and cast back (CLIP's fp16 LayerNorm, and open_clip's Fp32 one)."""
    return F.layer_norm(x.float(), mod.normalized_shape, mod.weight.float() if mod.weight is not None else None,
                        mod.bias.float() if mod.bias is not None else None, mod.eps).to(x.dtype)


def linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mod`` in its weight dtype (the low-precision copy of a tower computes its products in bf16/fp16
    while the residual stream stays fp32)."""
    return F.linear(x.to(mod.weight.dtype), mod.weight, mod.bias)


def visual_embed(visual: nn.Module, x: torch.Tensor, pos_fp16: bool = True) -> torch.Tensor:
    """Patch conv, class token, position embedding resized to this input's grid, ln_pre → (B, N, D)
    fp32 (the residual stream)."""
    p = int(visual.conv1.kernel_size[0])
    if x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
    t = visual.conv1(x.to(visual.conv1.weight.dtype)).float()
    grid = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
    t = torch.cat([cls, t], dim=1)
    t = t + resize_clip_pos_embed(visual.positional_embedding, grid, pos_fp16).to(device=t.device, dtype=t.dtype)
    return layer_norm(visual.ln_pre, t) if isinstance(visual.ln_pre, nn.LayerNorm) else visual.ln_pre(t)


def block_qkv(blk: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The packed q, k, v projection of ``nn.MultiheadAttention`` applied to ln_1's output."""
    w = blk.attn.in_proj_weight
    return F.linear(z.to(w.dtype), w, blk.attn.in_proj_bias)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, three_d = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def block_finish(blk: nn.Module, x: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, MLP residual — the rest of an open_clip ResidualAttentionBlock
    (the residual stream keeps x's dtype; a low-precision branch is promoted inside the add)."""
    x = torch.add(x, blk.ls_1(linear(blk.attn.out_proj, heads_out)))
    h = blk.mlp.gelu(linear(blk.mlp.c_fc, layer_norm(blk.ln_2, x)))
    return torch.add(x, blk.ls_2(linear(blk.mlp.c_proj, h)))


@torch.no_grad()
def visual_blocks(visual: nn.Module, x: torch.Tensor, stop: int, attn_layers: Iterable[int] = (),
                  blocked: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run blocks ``0..stop-1`` without gradient; return the tokens and the sum over ``attn_layers``
    of the head-mean attention (B, N, N) fp32 (None if no layer asked). Only those layers compute
    attention explicitly (on the CPU in cache-sized blocks); the others use fused attention."""
    from .classtoken import explicit_attention

    want = set(attn_layers)
    acc = None
    for i, blk in enumerate(visual.transformer.resblocks[:stop]):
        z = layer_norm(blk.ln_1, x)
        heads = blk.attn.num_heads
        q, k, v = split_heads(block_qkv(blk, z), heads)
        if i in want:
            out, probs = explicit_attention(q * (q.shape[-1] ** -0.5), k, v, blocked=blocked)
            acc = probs if acc is None else acc.add_(probs)
        else:
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = block_finish(blk, x, out)
    return x, acc


def pooled_image_features(visual: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """CLIP-ES's image feature: ln_post on every token, the mean of the patch tokens (not the class
    token), the projection → (B, E), not normalised."""
    t = layer_norm(visual.ln_post, y)[:, 1:].mean(1)
    return t @ visual.proj.to(t.dtype)
