"""Batched entropic optimal transport and k-means for OTPL (METHODS.md §12) and POT (§11).

Every function takes a leading batch dimension of *independent* problems plus boolean masks for padded
rows / columns / points, so that all images × classes of a batch, each of its own size, are solved by one
call with no Python loop over problems. Inputs may be fp16 / bf16 / fp32 (computed in fp32) or fp64
(kept in fp64, for reference tests). Nothing here carries a gradient: the spec runs the solvers under
``no_grad`` (§11.2 "no gradient through the solver"), and a masked log-domain solver would only produce
NaN gradients.

``sinkhorn``        log-domain Sinkhorn, stable for small ε; fixed iterations with no host sync, or a
                    tolerance checked every few iterations.
``sinkhorn_code``   the released POT code's solver as it runs (``Net.Sinkhorn`` in
                    ``network/resnet50_POT.py`` [C:POT@d0ecbbf]): K = exp(−C/ε), alternating scalings from
                    ones, at most 100 iterations, stop when mean |Δr| < 1e‑2.
``kmeans``          Lloyd's k-means (cosine or euclidean), with the stop rule and initialisation of
                    ``kmeans_pytorch`` 0.3, the library POT calls; ``kmeans_pytorch_init`` draws the same
                    initial points as that library for a given numpy random state.
``topk_per_column`` / ``gather_rows``  the top-K rows of each plan column (OTPL Eq. 15) and their features.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .errors import TokensegError

__all__ = ["OTResult", "KMeansResult", "sinkhorn", "sinkhorn_code", "kmeans", "kmeans_pytorch_init",
           "topk_per_column", "gather_rows"]

_NEG_INF = float("-inf")


class OTResult(NamedTuple):
    """A plan with its dual potentials: ``plan = exp((f_i + g_j − C_ij)/ε)`` on valid entries; f (g) is
    −inf on rows (columns) that carry no mass (masked or zero marginal). ``n_iter`` is the number of
    iterations run (a Python int: with ``tol=None`` it is ``iters`` and costs no sync)."""
    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: int


class KMeansResult(NamedTuple):
    """labels (G, N) long, −1 for masked points; centroids (G, k, D); counts (G, k) long."""
    labels: torch.Tensor
    centroids: torch.Tensor
    counts: torch.Tensor


# ----------------------------------------------------------------------------------------- checks
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (reference tests); everything else (fp16, bf16, fp32) is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_cost(cost: torch.Tensor, name: str = "cost") -> None:
    if not torch.is_tensor(cost) or cost.dim() != 3:
        raise TokensegError(f"ot: {name} must be a (B, M, N) tensor, got "
                            f"{tuple(cost.shape) if torch.is_tensor(cost) else type(cost).__name__}")
    if not cost.is_floating_point():
        raise TokensegError(f"ot: {name} must be floating point, got {cost.dtype}")


def _mask(mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise TokensegError(f"ot: {name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _marginal(w: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Zero outside ``valid``; ``None`` means uniform over the valid entries. Not renormalised."""
    if w is None:
        n = valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
        return valid.to(dtype) / n
    if tuple(w.shape) != tuple(valid.shape):
        raise TokensegError(f"ot: marginal {name} must have shape {tuple(valid.shape)}, got {tuple(w.shape)}")
    w = w.to(device=valid.device, dtype=dtype)
    # a padded entry may hold anything (NaN included): select, don't multiply
    return torch.where(valid, w, torch.zeros((), dtype=dtype, device=w.device))


# ----------------------------------------------------------------------------------------- Sinkhorn
@torch.no_grad()
def sinkhorn(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
             eps: float = 0.1, iters: int = 100, tol: float | None = None,
             row_mask: torch.Tensor | None = None, col_mask: torch.Tensor | None = None,
             check_every: int = 10, return_potentials: bool = False) -> torch.Tensor | OTResult:
    """Entropic OT ``min <P, C> + ε Σ P (log P − 1)`` s.t. ``P 1 = a, Pᵀ 1 = b``, per batch entry.

    cost (B, M, N); a (B, M), b (B, N) (None = uniform), both renormalised to sum 1 over their valid
    entries (negative entries count as 0); row_mask (B, M), col_mask (B, N) mark the valid rows /
    columns: padded entries get zero mass and their cost/marginal values are never read. A problem with no valid row or column, or zero total
    mass on either side, gets an all-zero plan.

    Log-domain updates (``log u = log a − LSE_j(−C/ε + log v)`` and the same for v), so ε ≪ cost scale
    does not under/overflow. ``tol=None`` runs exactly ``iters`` iterations with no host sync; with a
    tol, every ``check_every`` iterations the worst problem's row-marginal L1 error (columns are exact
    after each v update) is read back and the loop stops once it is below ``tol`` (at most ``iters``).

    Returns the plan (B, M, N) in fp32 (fp64 for fp64 input), or an :class:`OTResult` with the dual
    potentials ``f = ε log u``, ``g = ε log v`` when ``return_potentials``.
    """
    _check_cost(cost)
    if eps <= 0:
        raise TokensegError(f"ot.sinkhorn: eps must be > 0, got {eps}")
    if iters < 1 or check_every < 1:
        raise TokensegError(f"ot.sinkhorn: iters and check_every must be ≥ 1, got {iters}, {check_every}")
    B, M, N = cost.shape
    dt, dev = _compute_dtype(cost), cost.device
    rows = _mask(row_mask, (B, M), dev, "row_mask")
    cols = _mask(col_mask, (B, N), dev, "col_mask")
    a = _marginal(a, rows, dt, "a").clamp_min(0)  # a negative mass counts as none (checking would sync)
    b = _marginal(b, cols, dt, "b").clamp_min(0)
    a_sum, b_sum = a.sum(-1, keepdim=True), b.sum(-1, keepdim=True)
    ok = (a_sum > 0) & (b_sum > 0) & rows.any(-1, keepdim=True) & cols.any(-1, keepdim=True)  # (B, 1)
    rows, cols = rows & ok, cols & ok
    # rows / columns that carry mass; the others stay at log u = −inf (exactly zero in the plan)
    live_r = rows & (a > 0)
    live_c = cols & (b > 0)
    log_a = torch.where(live_r, (a / a_sum.clamp_min(torch.finfo(dt).tiny)).log(), _NEG_INF)
    log_b = torch.where(live_c, (b / b_sum.clamp_min(torch.finfo(dt).tiny)).log(), _NEG_INF)

    # one (B, N, M) layout for both updates: logsumexp over a long contiguous M, or over N with M
    # innermost (vectorised), runs 3-5× faster on a CPU than over a short innermost N
    valid_t = live_c[:, :, None] & live_r[:, None, :]
    log_kt = torch.where(valid_t, -cost.to(dt).transpose(1, 2) / eps, _NEG_INF)  # (B, N, M)

    log_u = torch.zeros(B, M, dtype=dt, device=dev)
    log_v = torch.zeros(B, N, dtype=dt, device=dev)
    n_iter = 0
    for it in range(iters):
        log_u = torch.where(live_r, log_a - torch.logsumexp(log_kt + log_v[:, :, None], dim=1), _NEG_INF)
        log_v = torch.where(live_c, log_b - torch.logsumexp(log_kt + log_u[:, None, :], dim=2), _NEG_INF)
        n_iter = it + 1
        if tol is not None and n_iter % check_every == 0 and n_iter < iters:
            row_sum = (log_u + torch.logsumexp(log_kt + log_v[:, :, None], dim=1)).exp()
            err = torch.where(live_r, row_sum - log_a.exp(), 0.0).abs().sum(-1)
            if bool(err.max() < tol):  # the only host sync, every check_every iterations
                break
    plan = (log_kt + log_u[:, None, :] + log_v[:, :, None]).exp()
    plan = torch.where(valid_t, plan, 0.0).transpose(1, 2).contiguous()
    if not return_potentials:
        return plan
    return OTResult(plan, eps * log_u, eps * log_v, n_iter)


@torch.no_grad()
def sinkhorn_code(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  eps: float = 0.1, max_iter: int = 100, thresh: float = 1e-2,
                  row_mask: torch.Tensor | None = None, col_mask: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None, check_every: int = 10,
                  return_iters: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The released POT code's Sinkhorn (``Net.Sinkhorn``, §11.2 / §11.4), batched.

    Their semantics, for one call on a stack of problems: ``K = exp(−C/ε)``; ``r = 1, c = 1``; repeat at
    most ``max_iter`` times: ``r0 = r; r = a / (K c); c = b / (Kᵀ r)``; stop when ``mean |r − r0| <
    thresh``, the mean running over *every* row of *every* problem in that call (they pass all classes of
    one image at once, so one image's problems stop together); ``T = diag(r) K diag(c)``.

    ``groups`` (B,) ints reproduces that: problems with the same id share one stop decision, the mean
    taken over their valid rows. Default: each problem stops on its own. A group that has stopped is
    frozen, so the result does not depend on ``check_every`` (how often ``any group still running`` is
    read back to end the loop early).

    Marginals are used as given (zeroed outside the masks; None = uniform 1/M, 1/N over the valid
    entries, as the code fills them), not renormalised. Padded entries get K = 0, r = c = 0.
    No log-domain stabilisation, as in the code: with C/ε ≳ 87 (fp32) K underflows and r becomes inf/NaN,
    which is what their solver returns too. Use :func:`sinkhorn` for a stable solve.
    Divergence [I]: the code runs under CUDA autocast, so its matmuls are fp16; here everything is fp32.

    Returns the plan (B, M, N), and with ``return_iters`` also the iterations each problem ran (B,).
    """
    _check_cost(cost)
    if eps <= 0:
        raise TokensegError(f"ot.sinkhorn_code: eps must be > 0, got {eps}")
    if max_iter < 1 or check_every < 1:
        raise TokensegError(f"ot.sinkhorn_code: max_iter and check_every must be ≥ 1, got {max_iter}, {check_every}")
    B, M, N = cost.shape
    dt, dev = _compute_dtype(cost), cost.device
    rows = _mask(row_mask, (B, M), dev, "row_mask")
    cols = _mask(col_mask, (B, N), dev, "col_mask")
    u = _marginal(a, rows, dt, "a")
    v = _marginal(b, cols, dt, "b")
    valid = rows[:, :, None] & cols[:, None, :]
    K = torch.where(valid, (-cost.to(dt) / eps).exp(), 0.0)
    Kt = K.transpose(1, 2)
    zero = torch.zeros((), dtype=dt, device=dev)

    if groups is None:
        gid, n_groups = torch.arange(B, device=dev), B
    else:
        if tuple(groups.shape) != (B,):
            raise TokensegError(f"ot.sinkhorn_code: groups must have shape ({B},), got {tuple(groups.shape)}")
        _, gid = torch.unique(groups.to(dev), return_inverse=True)  # one sync, before the loop
        n_groups = int(gid.max()) + 1 if B else 0
    rows_per_group = torch.zeros(n_groups, dtype=dt, device=dev).index_add_(0, gid, rows.sum(-1).to(dt))

    r = rows.to(dt)  # r = ones_like(u) on the valid rows
    c = cols.to(dt)
    active = torch.ones(n_groups, dtype=torch.bool, device=dev)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    for it in range(max_iter):
        run = active[gid]  # (B,)
        r_new = torch.where(rows, u / torch.bmm(K, c.unsqueeze(-1)).squeeze(-1), zero)
        c_new = torch.where(cols, v / torch.bmm(Kt, r_new.unsqueeze(-1)).squeeze(-1), zero)
        err = torch.zeros(n_groups, dtype=dt, device=dev).index_add_(0, gid, (r_new - r).abs().sum(-1))
        err = err / rows_per_group.clamp_min(1)
        r = torch.where(run[:, None], r_new, r)
        c = torch.where(run[:, None], c_new, c)
        n_iter += run.long()
        active = active & ~(err < thresh)  # NaN never stops, as `err.item() < thresh` in the code
        if (it + 1) % check_every == 0 and it + 1 < max_iter and not bool(active.any()):
            break
    plan = r[:, :, None] * K * c[:, None, :]
    return (plan, n_iter) if return_iters else plan


# ----------------------------------------------------------------------------------------- k-means
def _normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def _random_init(x: torch.Tensor, valid: torch.Tensor, keys: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct valid points per group, those with the largest random ``keys`` (a uniformly random
    subset in random order: kmeans_pytorch's rule, with torch's RNG). Groups with n < k valid points
    take all n; their remaining clusters are dead (zero centroid, never assigned)."""
    G, N, D = x.shape
    keys = torch.where(valid, keys, -1.0)  # masked points sort last
    kk = min(k, N)
    idx = keys.topk(kk, dim=1).indices  # (G, kk)
    cent = torch.gather(x, 1, idx[:, :, None].expand(G, kk, D))
    alive = torch.gather(valid, 1, idx)
    if kk < k:
        cent = torch.cat([cent, x.new_zeros(G, k - kk, D)], 1)
        alive = torch.cat([alive, alive.new_zeros(G, k - kk)], 1)
    return torch.where(alive[:, :, None], cent, 0.0), alive


def kmeans_pytorch_init(x: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                        rng: np.random.RandomState | np.random.Generator | None = None,
                        x_index: torch.Tensor | None = None) -> torch.Tensor:
    """Initial centroids (G, k, D) drawn exactly as ``kmeans_pytorch.kmeans`` draws them when called
    once per group in order on that group's valid points (``rng.choice(n, k, replace=False)``; the
    library uses the global ``np.random``, the default here). Groups with fewer than k valid points are
    skipped as the POT code skips them (no draw; zero centroids). ``x_index`` as in :func:`kmeans`.
    For reproducing a run of the released code only: it loops over groups on the host (index draws
    only, no feature math)."""
    if x.dim() != 3:
        raise TokensegError(f"ot.kmeans_pytorch_init: x must be (G, N, D), got {tuple(x.shape)}")
    N, D = x.shape[1:]
    G = x.shape[0] if x_index is None else x_index.shape[0]
    valid = _mask(mask, (G, N), x.device, "mask").cpu()
    rng = np.random if rng is None else rng
    idx = torch.zeros(G, k, dtype=torch.long)
    keep = torch.zeros(G, dtype=torch.bool)
    for g in range(G):
        pos = torch.nonzero(valid[g]).squeeze(1)
        if len(pos) < k:
            continue
        idx[g] = pos[torch.from_numpy(np.asarray(rng.choice(len(pos), k, replace=False), dtype=np.int64))]
        keep[g] = True
    idx, keep = idx.to(x.device), keep.to(x.device)
    rows = torch.arange(G, device=x.device) if x_index is None else x_index.to(x.device, torch.long)
    cent = x[rows[:, None], idx].to(_compute_dtype(x))
    return torch.where(keep[:, None, None], cent, 0.0)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, mask: torch.Tensor | None = None, iters: int = 100,
           init: torch.Tensor | None = None, distance: str = "cosine", tol: float | None = 1e-4,
           generator: torch.Generator | None = None, check_every: int | None = None,
           x_index: torch.Tensor | None = None, compact: bool = True) -> KMeansResult:
    """Lloyd's k-means on G independent groups of points, x (G, N, D), mask (G, N) valid points.

    ``distance="cosine"``: assign each point to the centroid of largest cosine similarity;
    ``"euclidean"``: smallest squared distance. Either way the update is the plain mean of the assigned
    (raw, unnormalised) points, as ``kmeans_pytorch`` (which POT calls with cosine) does.

    init: None = k distinct valid points per group drawn uniformly with ``generator`` (the library's rule,
    with torch's RNG; :func:`kmeans_pytorch_init` draws the library's exact points), or a (G, k, D)
    tensor of initial centroids.

    Stop rule, per group: after each update, stop when ``(Σ_k ‖c_k − c_k_prev‖)² < tol`` (kmeans_pytorch,
    tol 1e‑4); a stopped group is frozen. ``iters`` caps the iterations [I: the library has no cap and
    never ends once a centroid is NaN]. ``tol=None``: exactly ``iters`` iterations; with a tol, how many
    groups still run is read back every ``check_every`` iterations (default: every iteration on a CPU,
    where a sync is free; every 4th elsewhere), and the batch shrinks to them once they are at most half.

    ``x_index`` (G,): group g clusters points of ``x[x_index[g]]`` (x is then (B, N, D)), so that one
    image's features serve all its classes without a (G, N, D) copy. ``compact``: first gather each
    group's valid points to the front (one host sync for the largest count), so that a group costs its
    valid points, not N; ``compact=False`` with ``tol=None`` syncs never. Results are the same.

    Returned labels are the assignment from which the returned centroids were computed (as the library
    returns them); at convergence it is the nearest-centroid assignment. Ties go to the lower index.

    Edge cases: an empty cluster keeps its previous centroid [I: kmeans_pytorch sets it to NaN and
    then loops forever; scikit-learn relocates it]. A group with 0 < n < k valid points and random init
    makes every point its own cluster; clusters n..k−1 are dead (zero centroid, count 0, never assigned).
    A group with no valid point: labels −1, counts 0, centroids = init (zero for random init). The POT
    code skips groups with n < k altogether (its centres stay zero): test ``mask.sum(1) >= k`` to do so.
    """
    if not torch.is_tensor(x) or x.dim() != 3 or not x.is_floating_point():
        raise TokensegError(f"ot.kmeans: x must be a floating (G, N, D) tensor, got "
                            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if distance not in ("cosine", "euclidean"):
        raise TokensegError(f"ot.kmeans: distance must be 'cosine' or 'euclidean', got {distance!r}")
    dt, dev = _compute_dtype(x), x.device
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 4
    if k < 1 or iters < 1 or check_every < 1:
        raise TokensegError(f"ot.kmeans: k, iters and check_every must be ≥ 1, got {k}, {iters}, {check_every}")
    if x_index is not None:
        if x_index.dim() != 1:
            raise TokensegError(f"ot.kmeans: x_index must be (G,), got {tuple(x_index.shape)}")
        x_index = x_index.to(device=dev, dtype=torch.long)
    G = x.shape[0] if x_index is None else x_index.shape[0]
    N, D = x.shape[1:]
    valid = _mask(mask, (G, N), dev, "mask")
    if init is not None and tuple(init.shape) != (G, k, D):
        raise TokensegError(f"ot.kmeans: init must have shape {(G, k, D)}, got {tuple(init.shape)}")
    keys = None
    if init is None:  # drawn over the original positions, so compact or not picks the same points
        gen_dev = generator.device if generator is not None else dev
        keys = torch.rand(G, N, generator=generator, device=gen_dev).to(dev)

    pos = None  # (G, n) original position of each packed point
    if compact and N > 0:
        n = max(int(valid.sum(1).max()), 1)  # the one host sync of compaction
        if n < N:
            pos = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :n]  # valid first, in order
            valid = torch.gather(valid, 1, pos)
            keys = None if keys is None else torch.gather(keys, 1, pos)
    if pos is None:
        pts = x if x_index is None else x[x_index]
        # padded points may hold anything, NaN included: zero them (0 · NaN would reach the sums)
        pts = torch.where(valid[:, :, None], pts.to(dt), 0.0)
    else:
        # padding slots re-read the group's first valid point, so the packed tensor holds only finite
        # valid data (they are masked out of every sum) and needs no extra pass to be cleaned [I]
        src = torch.where(valid, pos, pos[:, :1])
        rows = torch.arange(G, device=dev) if x_index is None else x_index
        flat = (rows[:, None] * N + src).reshape(-1)
        pts = x.reshape(-1, D).index_select(0, flat).view(G, -1, D).to(dt)
    if init is None:
        cent, alive = _random_init(pts, valid, keys, k)
    else:
        cent = init.to(device=dev, dtype=dt).clone()
        alive = torch.ones(G, k, dtype=torch.bool, device=dev)
    labels, cent, counts = _lloyd(pts, valid, cent, alive, iters, distance, tol, check_every)
    if pos is not None:
        labels = torch.full((G, N), -1, dtype=torch.long, device=dev).scatter_(1, pos, labels)
    return KMeansResult(labels, cent, counts)


def _lloyd(x: torch.Tensor, valid: torch.Tensor, cent: torch.Tensor, alive: torch.Tensor, iters: int,
           distance: str, tol: float | None, check_every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched Lloyd loop. With a tol, groups that have stopped are frozen, and once at most half
    of the working set still runs (seen at a check), the working set shrinks to the running groups, so
    a few slow groups do not make every group pay for their iterations."""
    G, N, _ = x.shape
    k = cent.shape[1]
    dev = x.device
    out_labels = torch.full((G, N), -1, dtype=torch.long, device=dev)
    out_cent = cent.clone()
    out_counts = torch.zeros(G, k, dtype=torch.long, device=dev)
    ids = torch.arange(G, device=dev)  # the working set's groups
    labels, counts = out_labels.clone(), out_counts.clone()
    active = torch.ones(G, dtype=torch.bool, device=dev)
    neg_inf = torch.tensor(_NEG_INF, dtype=x.dtype, device=dev)

    def flush() -> None:
        out_labels[ids], out_cent[ids], out_counts[ids] = labels, cent, counts

    for it in range(iters):
        if distance == "cosine":  # cos(x, c) = x·ĉ / ‖x‖: the positive 1/‖x‖ does not change the argmax
            score = torch.bmm(x, _normalise(cent).transpose(1, 2))  # (G, N, k)
        else:  # −‖x − c‖² up to the per-point constant ‖x‖², which does not change the argmax
            score = 2 * torch.bmm(x, cent.transpose(1, 2)) - (cent * cent).sum(-1)[:, None, :]
        score = torch.where(alive[:, None, :], score, neg_inf)
        new_labels = torch.where(valid, score.argmax(-1), -1)
        onehot = torch.nn.functional.one_hot(new_labels.clamp_min(0), k).to(x.dtype) * valid[:, :, None]
        n_k = onehot.sum(1)  # (G, k)
        sums = torch.bmm(onehot.transpose(1, 2), x)  # (G, k, D)
        new_cent = torch.where(n_k[:, :, None] > 0, sums / n_k.clamp_min(1)[:, :, None], cent)
        shift = (new_cent - cent).norm(dim=-1).sum(-1)  # (G,)
        run = active[:, None]
        labels = torch.where(run, new_labels, labels)
        counts = torch.where(run, n_k.round().long(), counts)
        cent = torch.where(run[:, :, None], new_cent, cent)
        if tol is None:
            continue
        active = active & ~(shift * shift < tol)
        if (it + 1) % check_every == 0 and it + 1 < iters:
            n_run = int(active.sum())  # host sync, every check_every iterations
            if n_run == 0:
                break
            if n_run <= len(ids) // 2:
                flush()
                keep = torch.nonzero(active).squeeze(1)
                ids, x, valid, cent, alive = ids[keep], x[keep], valid[keep], cent[keep], alive[keep]
                labels, counts, active = labels[keep], counts[keep], active[keep]
    flush()
    return out_labels, out_cent, out_counts


# ----------------------------------------------------------------------------------------- helpers
def topk_per_column(plan: torch.Tensor, k: int, row_mask: torch.Tensor | None = None,
                    col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the k rows with the largest plan mass in each column (OTPL Eq. 15), batched.

    plan (B, M, N) → (idx, ok), both (B, N, k): ``idx[b, j]`` lists rows in decreasing mass; masked rows
    are never chosen before valid ones, and ``ok`` is False where a column has fewer than k valid rows
    (or is itself masked), so those slots must be ignored. Ties: torch.topk's order (unspecified)."""
    _check_cost(plan, "plan")
    B, M, N = plan.shape
    if not 1 <= k <= M:
        raise TokensegError(f"ot.topk_per_column: k must be in [1, {M}] (the number of rows), got {k}")
    rows = _mask(row_mask, (B, M), plan.device, "row_mask")
    cols = _mask(col_mask, (B, N), plan.device, "col_mask")
    p = torch.where(rows[:, :, None], plan.float(), _NEG_INF).transpose(1, 2)  # (B, N, M)
    idx = p.topk(k, dim=2).indices  # (B, N, k)
    ok = torch.gather(rows[:, None, :].expand(B, N, M), 2, idx) & cols[:, :, None]
    return idx, ok


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, M, D), idx (B, N, k) row indices → (B, N, k, D): the features of the selected rows."""
    B, M, D = x.shape
    _, N, k = idx.shape
    return torch.gather(x, 1, idx.reshape(B, N * k, 1).expand(B, N * k, D)).view(B, N, k, D)
