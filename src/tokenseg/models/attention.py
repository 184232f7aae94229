"""Running timm ViT blocks while tapping their attention — only where a recipe or a loss reads it.

:func:`run_blocks` is the one block loop of every token method (MCTformer, CTI, MMCST, OTPL): blocks
whose attention nobody reads run timm's fused attention (``scaled_dot_product_attention``, no attention
matrix exists); in the others the attention probabilities are computed explicitly and reduced on the fly
(head mean, summed over the tapped layers) instead of being stacked as L×B×H×N×N. Two regimes:

* ``grad=False`` (maps): residual adds in place, and on the CPU the full attention runs per head on
  cache-sized blocks of query rows in buffers allocated once (:func:`explicit_attention`);
* ``grad=True`` (training losses that read attention, e.g. CTI's BG-CAM loss): the same quantities built
  from differentiable, out-of-place operations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows per block on the CPU: one head's rows×N scores take about this many floats (4 MiB), so QKᵀ,
# softmax, AV and the head sum run on data that stays in cache, in buffers allocated once. Computing the
# whole H×N×N at once (N≈1150 at 1.25× VOC size) writes 32 MB per layer into fresh memory: QKᵀ then runs
# at about half the machine's matmul rate and every page is faulted in (~1.7× slower per layer).
_CPU_BLOCK_FLOATS = 1 << 20


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       blocked: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ) v as (B, N, H·d) with the head-mean probabilities (B, N, N) in fp32; q is already
    scaled. No autograd (in-place buffers).

    ``blocked`` (default: on the CPU) runs per sample, block of query rows and head (each row's softmax
    is independent, so this equals the whole product up to float rounding); otherwise (GPUs) one
    batched product."""
    B, H, N, d = q.shape
    if not (q.device.type == "cpu" if blocked is None else blocked):
        probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, N, H * d), head_mean(probs)
    out = torch.empty(B, H, N, d, dtype=q.dtype, device=q.device)
    mean = torch.empty(B, N, N, dtype=torch.float32, device=q.device)
    rows = max(16, _CPU_BLOCK_FLOATS // N)
    scratch = torch.empty(min(rows, N) * N, dtype=q.dtype, device=q.device)
    for b in range(B):
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            acc = mean[b, r0:r1]  # the head sum, accumulated in fp32
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
    return out.transpose(1, 2).reshape(B, N, H * d), mean


def head_mean(probs: torch.Tensor) -> torch.Tensor:
    """Mean over heads (dim 1) in fp32. A half-precision tensor is summed head by head into fp32: a
    dim-1 reduction of a bf16 tensor first upcasts all of it (~9× slower on the CPU)."""
    if probs.dtype == torch.float32:
        return probs.mean(1)
    hm = probs[:, 0].float()
    for h in range(1, probs.shape[1]):
        hm = hm + probs[:, h]
    return hm / probs.shape[1]


def attention_with_maps(attn: nn.Module, x: torch.Tensor, rows: int, want_rows: bool, want_full: bool,
                        grad: bool = False):
    """timm ``Attention`` forward that also returns attention probabilities, head-averaged.

    ``want_full``: the full (B, N, N) head-mean attention (the output is computed from it).
    ``want_rows``: only the first ``rows`` query rows (B, rows, N); the output uses fused attention.
    Returns ``(output, row_attention | None, full_attention | None)``."""
    B, N, _ = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    row_att = full = None
    if want_full:
        if grad:
            probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
            out, full = (probs @ v).transpose(1, 2).reshape(B, N, -1), head_mean(probs)
        else:
            out, full = explicit_attention(q * attn.scale, k, v)
        row_att = full[:, :rows] if want_rows else None
    else:
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        if want_rows:
            row_att = head_mean(((q[:, :, :rows] * attn.scale) @ k.transpose(-2, -1)).softmax(-1))
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    out = attn.proj(out)
    out = attn.proj_drop(out)
    return out, row_att, full


@dataclass
class BlockOutputs:
    """What :func:`run_blocks` returns; attention sums are fp32 and None when nothing was tapped."""

    tokens: torch.Tensor  # (B, N, D) after the last block run
    rows: torch.Tensor | None = None  # (B, prefix, N): head-mean attention of the prefix rows, summed
    full: torch.Tensor | None = None  # (B, N, N): head-mean attention, summed over the full-tap layers
    layer_tokens: list[torch.Tensor] = field(default_factory=list)  # prefix tokens after each block run


def run_blocks(blocks, tokens: torch.Tensor, prefix: int, row_layers=(), full_layers=(), start: int = 0,
               stop: int | None = None, grad: bool = False, keep_layer_tokens: bool = False) -> BlockOutputs:
    """Run ``blocks[start:stop]`` on ``tokens`` ((B, N, D), the first ``prefix`` being class/extra tokens).

    ``row_layers`` / ``full_layers`` are absolute block indices whose prefix-row / full head-mean attention
    is summed into the result. Untapped blocks run timm's own forward (fused attention). ``grad=False``
    writes the residual stream in place (call under ``torch.no_grad``)."""
    stop = len(blocks) if stop is None else stop
    row_layers, full_layers = set(row_layers), set(full_layers)
    rows_sum = full_sum = None
    layer_tokens = []
    for li in range(start, stop):
        blk = blocks[li]
        want_rows, want_full = li in row_layers, li in full_layers
        if not (want_rows or want_full):
            tokens = blk(tokens)
        else:
            out, row_att, full = attention_with_maps(blk.attn, blk.norm1(tokens), prefix, want_rows, want_full, grad)
            if grad:
                tokens = tokens + blk.drop_path1(blk.ls1(out))
                tokens = tokens + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(tokens))))
            else:  # in place: one (B, N, D) buffer less per layer
                tokens += blk.drop_path1(blk.ls1(out))
                tokens += blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(tokens))))
            if want_rows:
                r = row_att.float()
                rows_sum = r if rows_sum is None else rows_sum + r
            if want_full:
                f = full.float()
                full_sum = f if full_sum is None else full_sum + f
        if keep_layer_tokens:
            layer_tokens.append(tokens[:, :prefix])
    return BlockOutputs(tokens, rows_sum, full_sum, layer_tokens)


__all__ = ["explicit_attention", "head_mean", "attention_with_maps", "run_blocks", "BlockOutputs"]
