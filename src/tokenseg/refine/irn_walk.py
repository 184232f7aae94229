"""IRN's random walk (stage 3 of :mod:`.irn`): boundary affinities, the transition operator, the walk.

The transition operator is never dense: every pixel has at most 69 neighbours (radius 5), stored as
69 weight planes; one step is 69 shifted multiply-adds over a flat zero-padded grid (``walk=banded``),
or one torch sparse CSR product (``walk=sparse``). The authors square a dense HW×HW matrix 8 times
(527 MiB per matrix and 26 TFLOP for a 500×375 image). In float64 (``walk_dtype``, default) both give
the same walk to 1e-12 (tested against that dense reference); float32 is faster and drifts by up to
~1e-4 over 256 steps, like the authors' own float32 squaring (~3e-5). Images are batched
(``infer_batch``) through the network and the walk.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from .irn_net import path_max, search_directions

WALK_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def walk_offsets(radius: int) -> list[tuple[int, int]]:
    """Neighbour offsets of the walk: the self-loop, IRN's forward half-disc and its mirror."""
    fwd = list(search_directions(radius))
    return [(0, 0)] + fwd + [(-dy, -dx) for dy, dx in fwd]


def boundary_bands(edge: torch.Tensor, radius: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pair affinities ``a(p, p + o) = 1 − max_path edge`` for every offset ``o`` of
    :func:`walk_offsets` and every cell ``p``: (B, n_offsets, h, w); 1 for the self-loop; 0 where
    ``p + o`` is outside the grid or outside ``valid`` (B, h, w) (images of a batch padded to one size)."""
    B, h, w = edge.shape
    r = radius - 1
    valid = torch.ones_like(edge, dtype=torch.bool) if valid is None else valid
    e = F.pad(edge.masked_fill(~valid, 1.0), (r, r, r, r), value=1.0)  # a path to outside has affinity 0
    fwd = (1.0 - path_max(e, radius, r, r, h, w)) * valid[:, None]
    padded = F.pad(fwd, (r, r, r, r))
    rev = [padded[:, k, r - dy:r - dy + h, r - dx:r - dx + w] for k, (dy, dx) in enumerate(search_directions(radius))]
    return torch.cat([valid[:, None].to(edge.dtype), fwd, torch.stack(rev, 1)], 1)


def flush_level(dtype: torch.dtype) -> float:
    """Values below this are set to 0 during the walk so that no product is subnormal: a^10 of small
    affinities and the far tails of a walk are, and subnormal arithmetic runs ~20× slower on x86
    CPUs (the authors' GPU flushes them to zero). The change is below 1e-150 (float64) / 1e-18 (float32)."""
    return 2.0 * torch.finfo(dtype).tiny ** 0.5


def transition_bands(bands: torch.Tensor, beta: float) -> torch.Tensor:
    """Row-normalised ``a^β`` (the transpose of IRN's column-normalised ``T``; ``a`` is symmetric):
    ``W[p, o] = a(p, p + o)^β / Σ_o' a(p, p + o')^β``."""
    a = bands.clamp(0.0, 1.0).pow(beta)
    a = torch.threshold(a, flush_level(a.dtype), 0.0)
    w = a / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.threshold(w, flush_level(a.dtype), 0.0)


def walk_banded(x: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int]], steps: int) -> torch.Tensor:
    """``steps`` walk steps ``v(p) ← Σ_o W[p, o] v(p + o)`` for (B, K, h, w) maps and (B, n, h, w)
    weights: the grid is zero-padded by the largest offset and flattened, so every offset is one
    contiguous shifted slice and a step is ``n`` fused multiply-adds over all images and classes."""
    B, K, h, w = x.shape
    n = len(offsets)
    R = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    Wp = w + 2 * R
    L = h * Wp
    base = R + R * Wp  # flat index of (row R, column 0); a margin of R at both ends keeps slices in range
    total = (h + 2 * R) * Wp + 2 * R
    wf = x.new_zeros(n, B, 1, h, Wp)
    wf[..., R:R + w] = weights.to(x.dtype).permute(1, 0, 2, 3)[:, :, None]
    wf = wf.reshape(n, B, 1, L)
    bufs = [x.new_zeros(B, K, total), x.new_zeros(B, K, total)]
    bufs[0][:, :, base:base + L].view(B, K, h, Wp)[..., R:R + w] = x
    views = [[b[:, :, base + dy * Wp + dx:base + dy * Wp + dx + L] for dy, dx in offsets] for b in bufs]
    flush = flush_level(x.dtype) if bool((x >= 0).all()) else None  # maps are >= 0 (seeds, CAMs)
    cur = 0
    for _ in range(steps):
        src, dst = views[cur], bufs[1 - cur][:, :, base:base + L]
        torch.mul(src[0], wf[0], out=dst)
        for k in range(1, n):
            dst.addcmul_(src[k], wf[k])
        if flush is not None:
            torch.threshold_(dst, flush, 0.0)
        cur = 1 - cur
    return bufs[cur][:, :, base:base + L].reshape(B, K, h, Wp)[..., R:R + w].clone()


def sparse_transition(weights: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The walk's (B·h·w)² transition matrix as a torch sparse CSR tensor (block-diagonal over images)."""
    B, n, h, w = weights.shape
    idx = torch.arange(B * h * w, device=weights.device).reshape(B, h, w)
    rows, cols, vals = [], [], []
    for k, (dy, dx) in enumerate(offsets):
        y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
        if y0 >= y1 or x0 >= x1:
            continue
        v = weights[:, k, y0:y1, x0:x1]
        keep = v != 0
        rows.append(idx[:, y0:y1, x0:x1][keep])
        cols.append(idx[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx][keep])
        vals.append(v[keep])
    size = (B * h * w, B * h * w)
    coo = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), size,
                                  check_invariants=False).coalesce()
    return coo.to_sparse_csr()


def walk_sparse(x: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int]], steps: int) -> torch.Tensor:
    """The same walk as :func:`walk_banded` through one sparse CSR matrix product per step."""

    B, K, h, w = x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        t = sparse_transition(weights.to(x.dtype), offsets)
        v = x.permute(0, 2, 3, 1).reshape(B * h * w, K)
        flush = flush_level(x.dtype) if bool((x >= 0).all()) else None
        for _ in range(steps):
            v = torch.sparse.mm(t, v)
            if flush is not None:
                torch.threshold_(v, flush, 0.0)
    return v.reshape(B, h, w, K).permute(0, 3, 1, 2).contiguous()


def propagate(x: torch.Tensor, edge: torch.Tensor, valid: torch.Tensor | None = None, radius: int = 5,
              beta: float = 10.0, exp_times: int = 8, impl: str = "banded") -> torch.Tensor:
    """IRN's ``propagate_to_edge``: walk (B, K, h, w) maps ⊙ (1 − edge) ``2^exp_times`` steps on the
    boundary affinities of (B, h, w) ``edge`` (cells outside ``valid`` are cut off)."""
    if valid is not None:
        x = x * valid[:, None]
    x = x * (1.0 - edge)[:, None]
    weights = transition_bands(boundary_bands(edge, radius, valid), beta)
    walk = walk_sparse if impl == "sparse" else walk_banded
    return walk(x, weights, walk_offsets(radius), 2 ** exp_times)


WALK_CACHE_BYTES = 8 << 20


def walk_chunk(batch: int, h: int, w: int, radius: int, dtype: torch.dtype, device: torch.device) -> int:
    """Images per walk call: all of them on a GPU (fewer kernel launches); on a CPU as many as keep
    the 69 weight planes within ~8 MiB, since each step streams them (measured on 2 cores: four
    500×375 images at once ran 1.7× slower per image in float64 than one at a time)."""
    if device.type != "cpu":
        return batch
    per_image = len(walk_offsets(radius)) * h * (w + 2 * (radius - 1)) * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(batch, WALK_CACHE_BYTES // per_image))


__all__ = ["WALK_DTYPES", "walk_offsets", "boundary_bands", "flush_level", "transition_bands", "walk_banded",
           "sparse_transition", "walk_sparse", "propagate", "walk_chunk"]
