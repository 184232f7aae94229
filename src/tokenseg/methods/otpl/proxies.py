"""OTPL's proxy machinery (METHODS.md §12): OT assignment, top-K proxies, the contrastive loss, proxy CAMs.

Everything is batched over images and prototypes with masks (no Python loop over either, no host sync):

* :func:`classifier_cam` — the classifier CAM ``M^cls`` (B, C+1, M) with background in column 0;
* :func:`assign` — entropic OT between patch features and prototypes with the CAM-derived target
  marginal (``tokenseg.core.ot.sinkhorn``, log domain), the top-K rows of each plan column
  (``tokenseg.core.ot.topk_per_column``), and the plan / CAM argmax of every patch;
* :class:`ProxyConv` — ``P_c = Conv(Concat[Q_c, H_c])`` initialised so that ``P_c = Q_c``;
* :func:`proxy_patch_contrastive` — L_ppc (Eq. 19), positives where the CAM and the plan agree;
* :func:`proxy_cam` — ``ReLU(cos(F_i, P_c))``, max-normalised;

The models that use them are in :mod:`.model`.

Column layout everywhere: N = C + 1 prototypes, column 0 background, column c + 1 class c; a disabled
background column is masked out of the OT (``col_mask``) but still competes in the CAM argmax, so
background patches never become positives.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core import ot
from ...core.errors import TokensegError

__all__ = ["Assignment", "classifier_cam", "cam_argmax", "cosine", "assign", "ProxyConv", "positives",
           "proxy_patch_contrastive", "proxy_cam", "make_proxies", "masked_average", "split_class_tokens",
           "pool_to_grid"]

_TINY = 1e-12


# ------------------------------------------------------------------------------------------ pieces
def classifier_cam(fg: torch.Tensor, labels: torch.Tensor, bg_power: float = 1.0, norm: str = "max") -> torch.Tensor:
    """``M^cls`` from foreground scores (B, C, M), normalised per image and class — ``max``: ReLU then
    x/(max+1e-5) (the SIPE/POT max-norm; all 0 while a class's logits are all negative), ``minmax``:
    (x−min)/(max−min+1e-5) — absent classes 0; background ``(1 − max_c)^bg_power`` in column 0 [spec
    §12.1: "background 1 − max"; the power is an option]. Returns (B, C+1, M) fp32, no gradient."""
    m = fg.detach().float()
    if norm == "minmax":
        lo = m.amin(-1, keepdim=True)
        m = (m - lo) / (m.amax(-1, keepdim=True) - lo + 1e-5)
    else:
        m = F.relu(m)
        m = m / (m.amax(-1, keepdim=True) + 1e-5)
    m = m * labels.float()[..., None]
    bg = (1 - m.amax(1, keepdim=True)).clamp_min(0)
    if bg_power != 1.0:
        bg = bg ** bg_power
    return torch.cat([bg, m], 1)


def cam_argmax(cam: torch.Tensor, cam_mask: torch.Tensor) -> torch.Tensor:
    """(B, N, M) scores, (B, N) competing columns -> (B, M) argmax over those columns (ties: lowest
    index, so background wins a tie, as in the seed evaluation)."""
    return cam.masked_fill(~cam_mask[..., None], float("-inf")).argmax(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, D), (B, N, D) -> (B, M, N) cosine similarities, fp32."""
    return F.normalize(a.float(), dim=-1, eps=_TINY) @ F.normalize(b.float(), dim=-1, eps=_TINY).transpose(1, 2)


def masked_average(x: torch.Tensor, assign_idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling (Eq. 13): x (B, M, D), the column of every row (B, M) -> the mean row of
    each of the n columns (B, n, D) and the row counts (B, n). Empty columns give 0."""
    # a comparison, not F.one_hot: one_hot range-checks its input on the host (a sync on CPU tensors)
    onehot = (assign_idx[..., None] == torch.arange(n, device=x.device)).to(x.dtype)  # (B, M, n)
    counts = onehot.sum(1)  # (B, n)
    sums = onehot.transpose(1, 2) @ x
    return sums / counts.clamp_min(1)[..., None], counts


class Assignment(NamedTuple):
    """What the OT step decides for a batch (no gradient): the plan (B, M, N), the top-K rows of each
    column ``idx`` (B, N, K) with ``ok`` (B, N, K) marking usable slots, and each patch's plan argmax and
    CAM argmax (B, M)."""
    plan: torch.Tensor
    idx: torch.Tensor
    ok: torch.Tensor
    plan_arg: torch.Tensor
    cam_arg: torch.Tensor


@torch.no_grad()
def assign(feats: torch.Tensor, protos: torch.Tensor, cam: torch.Tensor, col_mask: torch.Tensor,
           cam_arg: torch.Tensor, top_k: int, eps: float = 0.1, iters: int = 100, marginal: str = "cam",
           marginal_mix: float = 0.0) -> Assignment:
    """Entropic OT between the patches and the prototypes (Eq. 14), then the top-K patches per prototype.

    ``max Σ T S`` with ``S = cos(F_i, Q_j)`` is solved as ``min <T, 1 − S>`` (same plan) by the
    log-domain Sinkhorn of :mod:`tokenseg.core.ot` with ε = ``eps`` and a fixed ``iters`` iterations (no host
    sync). Rows: uniform 1/M. Columns (``col_mask``): ``x_j ∝ Σ_i M^cls_ij`` (``marginal="cam"``, [I] the
    spec's reading of "derived from CAM predictions") or uniform; ``marginal_mix`` blends in the uniform
    marginal so that a present class the CAM misses still receives patches [I]."""
    cols = col_mask.float()
    uniform = cols / cols.sum(-1, keepdim=True).clamp_min(1)
    if marginal == "cam":
        mass = (cam.clamp_min(0) * cols[..., None]).sum(-1)
        b = mass / mass.sum(-1, keepdim=True).clamp_min(_TINY)
        if marginal_mix > 0:
            b = (1 - marginal_mix) * b + marginal_mix * uniform
    elif marginal == "uniform":
        b = uniform
    else:
        raise TokensegError(f"otpl.marginal must be cam or uniform, got {marginal!r}")
    cost = 1 - cosine(feats, protos)
    plan = ot.sinkhorn(cost, None, b, eps=eps, iters=iters, col_mask=col_mask)
    k = min(top_k, plan.shape[1])  # a tiny view (fewer patches than K): the missing slots stay unused
    idx, ok = ot.topk_per_column(plan, k, col_mask=col_mask)
    if k < top_k:
        idx = torch.cat([idx, idx.new_zeros(*idx.shape[:2], top_k - k)], -1)
        ok = torch.cat([ok, ok.new_zeros(*ok.shape[:2], top_k - k)], -1)
    ok = ok & (b > 0)[..., None]  # a column without mass has no "most related" patches
    return Assignment(plan, idx, ok, plan.argmax(-1), cam_arg)


class ProxyConv(nn.Module):
    """``P_c = Conv(Concat[Q_c, H_c])`` (Eq. 16): a Conv1d over the K + 1 stacked tokens (channels),
    sliding along D, one output channel, shared by every class [I: the spec's reading; kernel 1 is a
    learned weighted sum of the K + 1 tokens plus a bias]. Initialised to the identity on the Q channel
    (centre tap 1, everything else 0), so that ``P_c = Q_c`` at the start [I, keeps early training stable]."""

    def __init__(self, top_k: int, kernel: int = 1, bias: bool = True) -> None:
        super().__init__()
        if top_k < 1 or kernel < 1 or kernel % 2 == 0:
            raise TokensegError(f"otpl: top_k must be >= 1 and proxy_kernel odd, got {top_k}, {kernel}")
        self.top_k = top_k
        self.conv = nn.Conv1d(top_k + 1, 1, kernel, padding=kernel // 2, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, self.conv.kernel_size[0] // 2] = 1.0
            if self.conv.bias is not None:
                self.conv.bias.zero_()

    def forward(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """q (B, N, D), h (B, N, K, D) -> proxies (B, N, D)."""
        B, N, D = q.shape
        x = torch.cat([q[:, :, None], h.to(q.dtype)], 2).reshape(B * N, self.top_k + 1, D)
        return self.conv(x).view(B, N, D)


def positives(asg: Assignment, loss_cols: torch.Tensor) -> torch.Tensor:
    """R_c^+ (Eq. 18) as a (B, N, M) mask: patch i is a positive of column j when its CAM argmax and its
    plan argmax are both j, for the columns of ``loss_cols`` (B, N)."""
    j = torch.arange(loss_cols.shape[1], device=loss_cols.device)[None, :, None]
    return (asg.cam_arg[:, None] == j) & (asg.plan_arg[:, None] == j) & loss_cols[..., None]


def proxy_patch_contrastive(proxies: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor, tau: float = 0.1,
                            reduce: str = "sum") -> torch.Tensor:
    """L_ppc (Eq. 19): for each image and column with positives, ``−mean_{i∈R+} log softmax_i(P̂·F̂_i/τ)``
    over all M patches of the image (L2-normalised, [I]); ``reduce="sum"``: summed over the image's
    columns as Eq. 19 writes it, ``"mean"``: averaged [I]; then averaged over the images that have a
    positive (0 when none has). proxies (B, N, D), feats (B, M, D), pos (B, N, M) bool."""
    logits = cosine(proxies, feats) / tau  # (B, N, M)
    n = pos.sum(-1)  # (B, N)
    pos_f = pos.float()
    per = torch.logsumexp(logits, -1) - (logits * pos_f).sum(-1) / n.clamp_min(1)
    has = n > 0
    per = torch.where(has, per, 0.0)
    if reduce == "sum":
        per_image = per.sum(-1)
    elif reduce == "mean":
        per_image = per.sum(-1) / has.sum(-1).clamp_min(1)
    else:
        raise TokensegError(f"otpl.ppc_reduce must be sum or mean, got {reduce!r}")
    images = has.any(-1)
    return (per_image * images).sum() / images.sum().clamp_min(1)


def make_proxies(proxy: ProxyConv, s, feats: torch.Tensor, protos: torch.Tensor, cam: torch.Tensor,
                 col_mask: torch.Tensor, cam_arg: torch.Tensor, loss_cols: torch.Tensor | None = None) -> dict:
    """OT plan → top-K features H → proxies ``P = Conv(Concat[Q, H])`` and the L_ppc positives, for
    prototypes ``protos`` (B, N, D) over the OT columns ``col_mask`` (B, N) whose marginal comes from
    ``cam``; positives in the columns ``loss_cols`` (default ``col_mask``; the background column only
    with ``ppc_background``). ``s`` holds the otpl settings."""
    asg = assign(feats, protos, cam, col_mask, cam_arg, s.top_k, s.sinkhorn_eps, s.sinkhorn_iters,
                 s.marginal, s.marginal_mix)
    src = feats.detach() if s.detach_selected else feats
    h = ot.gather_rows(src, asg.idx) * asg.ok[..., None].to(src.dtype)
    proxies = proxy(protos, h)
    cols = col_mask if loss_cols is None else loss_cols & col_mask
    if not s.ppc_background:
        cols = torch.cat([torch.zeros_like(cols[:, :1]), cols[:, 1:]], 1)
    return {"otpl_proxies": proxies, "otpl_features": feats, "otpl_positives": positives(asg, cols),
            "otpl_cols": cols}


def proxy_cam(proxies: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``ReLU(cos(F_i, P_c))`` max-normalised per image and proxy: (B, N, D), (B, M, D) -> (B, N, M)."""
    m = F.relu(cosine(proxies, feats))
    return m / (m.amax(-1, keepdim=True) + 1e-5)


def pool_to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, s, s') score maps -> (B, N, gh·gw) on the feature grid (area average when the sizes divide,
    bilinear with antialiasing otherwise)."""
    gh, gw = grid
    h, w = maps.shape[-2:]
    if (h, w) == (gh, gw):
        out = maps
    elif h % gh == 0 and w % gw == 0:
        out = F.adaptive_avg_pool2d(maps.float(), (gh, gw))
    else:
        out = F.interpolate(maps.float(), size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    return out.flatten(2).float()


def split_class_tokens(tokens: torch.Tensor, prefix: int, num_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A class-token base's output tokens (B, prefix + M, D) -> (class tokens (B, C, D), background token
    (B, D) or None, patch tokens (B, M, D)). ``prefix == C``: C class tokens (MCTformer); ``prefix == C + 1``:
    a background token first, then C class tokens (CTI's layout, METHODS.md §8.1)."""
    feats = tokens[:, prefix:]
    if prefix == num_classes:
        return tokens[:, :prefix], None, feats
    if prefix == num_classes + 1:
        return tokens[:, 1:prefix], tokens[:, 0], feats
    raise TokensegError(f"otpl: the base model puts {prefix} tokens before the patches; OTPL needs its C={num_classes} "
                        f"class tokens (MCTformer) or a background token then C class tokens (CTI)")
