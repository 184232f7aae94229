"""Affinity random walk on a patch / feature grid (MCTformer Eq. 3, PSA, METHODS.md §6, §7.1).

Both refinements are one operation on score maps ``v`` (K, M) over M grid cells:

    G = row_normalise((W / max W)^β),   v ← v Gᵀ   applied ``steps`` times,

i.e. cell ``i`` gathers ``Σ_j G[i, j] v[j]``. With the transformer's patch-to-patch attention as
``W`` (row ``i`` = where query ``i`` attends), β = 1 and one step this is MCTformer's PatchAffinity
refinement ``A_ref = Â_p2p · A`` up to the constant row sum (the summed attention rows all sum to the
number of layers). With PSA's symmetric AffinityNet affinities, ``G`` is the transpose of PSA's
column-normalised ``T = D⁻¹ aff^β`` and ``steps = 2^logt`` gives PSA's ``cam · T^(2^logt)``.
Repeated application costs ``steps · K · nnz(G)`` instead of ``logt`` dense M×M squarings.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def transition_matrix(affinity: torch.Tensor, beta: float = 1.0, symmetric: bool = False) -> torch.Tensor:
    """Row-stochastic (M, M) matrix from non-negative affinities (dense or sparse COO)."""
    if affinity.is_sparse:
        a = affinity.coalesce()
        idx, val = a.indices(), a.values().float().clamp_min(0)
        if symmetric:
            idx = torch.cat([idx, idx.flip(0)], 1)
            val = torch.cat([val, val]) * 0.5
            a = torch.sparse_coo_tensor(idx, val, a.shape, check_invariants=False).coalesce()
            idx, val = a.indices(), a.values()
        top = val.max().clamp_min(1e-12) if val.numel() else torch.tensor(1.0)
        val = (val / top) ** beta
        rows = torch.zeros(a.shape[0], dtype=val.dtype).index_add_(0, idx[0], val)
        val = val / rows[idx[0]].clamp_min(1e-12)
        return torch.sparse_coo_tensor(idx, val, a.shape, check_invariants=False).coalesce()
    a = affinity.float().clamp_min(0)
    if symmetric:
        a = 0.5 * (a + a.transpose(-1, -2))
    a = (a / a.amax().clamp_min(1e-12)) ** beta
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def random_walk(maps: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """Propagate (K, M) maps ``steps`` times through a row-stochastic (M, M) ``transition``."""
    v = maps.float()
    if transition.is_sparse:
        t = transition.float()
        for _ in range(steps):
            v = torch.sparse.mm(t, v.T).T
        return v
    t = transition.float()
    for _ in range(steps):
        v = v @ t.T
    return v


def grid_scores(maps: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-average (K, H, W) full-resolution maps onto an (h, w) grid -> (K, h*w)."""
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32) if isinstance(maps, np.ndarray) else maps).float()
    g = F.adaptive_avg_pool2d(m[None], grid)[0]
    return g.reshape(m.shape[0], -1)


def upsample_scores(v: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(K, h*w) grid scores -> (K, H, W) bilinear (align_corners=False)."""
    g = v.reshape(v.shape[0], *grid)
    return F.interpolate(g[None], size=size, mode="bilinear", align_corners=False)[0]


def walk_maps(scores: np.ndarray, affinity: torch.Tensor, grid: tuple[int, int], beta: float, steps: int,
              symmetric: bool = False) -> np.ndarray:
    """Full-resolution (K, H, W) scores (background channel included) -> walked (K, H, W) scores:
    pooled to the affinity's grid, propagated, upsampled back."""
    H, W = scores.shape[1:]
    v = grid_scores(scores, grid)
    t = transition_matrix(affinity, beta, symmetric=symmetric)
    v = random_walk(v, t, steps)
    return upsample_scores(v, grid, (H, W)).numpy()
