"""POT's network (SIPE-style, METHODS.md §11.1) and its prototype stages (§11.2 paper, §11.4 code).

The network: a timm ResNet whose last stage (and, for output stride 8, the one before) runs at stride 1
without dilation, as the released code's ``resnet50(strides=(2, 2, 2, 1))``; 1×1 side convs (no bias) on
each stage concatenated with the image resized to it (bilinear, align_corners=True), each side
L2-normalised over channels and resized (bilinear) to the layer-3 grid, concatenated: ``F`` (768 channels
for ResNet-50: 128+128+256+256); a 1×1 classifier (no bias) on layer 4, GAP for the scores.

The prototype stages are batched over every (image, class) pair of a batch with no Python loop over
images or classes: a pair's points are a mask over its image's h·w grid, the k-means and the OT run on
all pairs at once (:mod:`tokenseg.core.ot`), and the per-pair products with the image's features use a
(B, S·K, D) stack of prototypes, S = the most classes one image has, so no (pairs, h·w, D) copy of
the features is ever made.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import TokensegError
from ...core.ot import kmeans, kmeans_pytorch_init, sinkhorn, sinkhorn_code

__all__ = ["POTNet", "PaperStage", "paper_stage", "code_stage", "code_fusion", "max_norm", "class_slots",
           "grid_size", "CODE_CLUSTERS"]

CODE_CLUSTERS = 2  # the released code's k-means K (§11.4)


# ----------------------------------------------------------------------------------------- network
def _unstride(stage: nn.Module) -> None:
    """Run a timm ResNet stage at stride 1 with no dilation (the code's strides=(2, 2, 2, 1)): stride-2
    convs of its first block get stride 1; an average-pool shortcut (``avg_down`` variants) goes."""
    block = stage[0]
    for name, mod in list(block.named_modules()):
        if isinstance(mod, nn.Conv2d) and mod.stride != (1, 1):
            mod.stride = (1, 1)
        elif isinstance(mod, nn.AvgPool2d) and mod.stride not in (1, (1, 1)):
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())


def grid_size(size: int, stride: int) -> int:
    """The feature grid of a side of ``size`` pixels at ``stride``: each stride-2 layer (padded conv or
    pool) gives ⌈s/2⌉ (512 → 32 at stride 16, 96 → 12 at stride 8)."""
    for _ in range(int(round(math.log2(stride)))):
        size = (size + 1) // 2
    return size


class POTNet(nn.Module):
    """The SIPE-style network. ``forward(x)`` → ``cls_logits`` (B, C) (GAP of the CAM), ``cam`` (B, C,
    h, w) raw classifier CAM on layer 4, ``features`` (B, D, h, w) the hierarchical feature ``F``.

    ``freeze_stem``: conv1 / bn1 get no gradient (the code); ``freeze_bn``: every BatchNorm of the
    backbone uses its running statistics in training too (the code's ``FixedBatchNorm``), which only
    makes sense from ImageNet weights."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool | str = False, output_stride: int = 16,
                 freeze_stem: bool = True, freeze_bn: bool = True, backbone_kwargs: dict | None = None,
                 side_channels: tuple[int, int, int, int] = (128, 128, 256, 256)) -> None:
        super().__init__()
        import timm

        from ...models.backbone import create_timm

        if output_stride not in (8, 16):
            raise TokensegError(f"pot.output_stride must be 16 or 8, got {output_stride}")
        if not timm.is_model(backbone):
            raise TokensegError(f"pot.backbone: unknown timm model {backbone!r}")
        weights = ""
        if isinstance(pretrained, str) and pretrained:
            if not Path(pretrained).is_file():
                raise TokensegError(f"model.pretrained: weights file {pretrained} not found")
            weights, pretrained = pretrained, False
        try:
            body = create_timm(backbone, bool(pretrained), weights, key="model", num_classes=0, global_pool="",
                               **dict(backbone_kwargs or {}))
        except TokensegError as exc:
            if "could not download" not in str(exc):
                raise
            raise TokensegError(f"model.pretrained=true: could not download ImageNet weights for {backbone!r}. "
                                f"Offline, set model.pretrained=/path/to/weights.pth (a timm or torchvision "
                                f"ResNet file, e.g. resnet50-19c8e357.pth as the code loads), or "
                                f"model.pretrained=false to start from scratch") from exc
        if not all(hasattr(body, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")):
            raise TokensegError(f"pot.backbone {backbone!r} is not a timm ResNet (conv1, bn1, layer1..layer4)")
        _unstride(body.layer4)
        if output_stride == 8:
            _unstride(body.layer3)
        self.body = body
        chans = [body.feature_info[i]["num_chs"] for i in range(1, 5)]
        self.side1, self.side2, self.side3, self.side4 = (
            nn.Conv2d(c + 3, s, 1, bias=False) for c, s in zip(chans, side_channels))
        self.classifier = nn.Conv2d(chans[3], num_classes, 1, bias=False)
        self.patch_size = output_stride  # the map pipeline's size multiple
        self.output_stride = output_stride
        self.feature_dim = sum(side_channels)
        self.freeze_bn = freeze_bn
        if freeze_stem:
            for p in list(body.conv1.parameters()) + list(body.bn1.parameters()):
                p.requires_grad_(False)

    def new_modules(self) -> list[nn.Module]:
        """The layers the backbone does not have (10× lr in the code)."""
        return [self.side1, self.side2, self.side3, self.side4, self.classifier]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        b = self.body
        x0 = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        x1 = b.layer1(x0)
        x2 = b.layer2(x1)
        x3 = b.layer3(x2)
        x4 = b.layer4(x3)
        grid = x3.shape[-2:]
        parts = []
        for side, feat in zip((self.side1, self.side2, self.side3, self.side4), (x1, x2, x3, x4)):
            img = F.interpolate(x, feat.shape[-2:], mode="bilinear", align_corners=True).to(feat.dtype)
            s = side(torch.cat([feat, img], 1))
            s = s / (torch.norm(s, dim=1, keepdim=True) + 1e-5)
            parts.append(s if s.shape[-2:] == grid else F.interpolate(s, grid, mode="bilinear", align_corners=False))
        cam = self.classifier(x4)
        return {"cls_logits": cam.float().mean((2, 3)), "cam": cam, "features": torch.cat(parts, 1)}


# ----------------------------------------------------------------------------------------- helpers
def max_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x / (max over the last two dims + eps), per map: SIPE/POT's ``adaptive_max_pool2d`` norm."""
    return x / (x.flatten(-2).amax(-1)[..., None, None] + eps)


def _compute(x: torch.Tensor) -> torch.Tensor:
    """fp64 stays fp64 (reference tests); anything else is computed in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _unit(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class Slots(NamedTuple):
    """The (image, class) pairs of a batch and where each sits in its image's stack of S slots."""

    b: torch.Tensor  # (G,) image of each pair
    c: torch.Tensor  # (G,) class (channel) of each pair
    slot: torch.Tensor  # (G,) its rank among its image's pairs
    S: int  # the most pairs one image has (≥ 1)


def class_slots(present: torch.Tensor) -> Slots:
    """Pairs of a (B, C) presence mask, sorted by image then class (one host sync: their number)."""
    pairs = torch.nonzero(present > 0)
    b, c = pairs[:, 0], pairs[:, 1]
    counts = (present > 0).sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(b), device=present.device) - offsets[b]
    S = max(int(counts.max()) if len(counts) else 0, 1)
    return Slots(b, c, slot, S)


def _slot_prototypes(X: torch.Tensor, weights: torch.Tensor, sl: Slots) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums Σ_i w_gik X_bi and masses Σ_i w_gik of every pair's K clusters, batched per image:
    X (B, N, D), weights (G, N, K) → sums (G, K, D), masses (G, K). Differentiable in X."""
    B = X.shape[0]
    G, N, K = weights.shape
    w = torch.zeros(B, N, sl.S, K, dtype=X.dtype, device=X.device)
    w[sl.b, :, sl.slot] = weights.to(X.dtype)
    w = w.view(B, N, sl.S * K)
    sums = torch.bmm(w.transpose(1, 2), X).view(B, sl.S, K, -1)[sl.b, sl.slot]  # (G, K, D)
    return sums, weights.sum(1)


def _slot_cosines(X: torch.Tensor, xnorm: torch.Tensor, protos: torch.Tensor, sl: Slots) -> torch.Tensor:
    """cos(F_i, p_gk) for every point of each pair's image: X (B, N, D), xnorm (B, N, 1) its row norms,
    protos (G, K, D) → (G, N, K), through one (B, N, D)·(B, D, S·K) product divided by the norms (no
    per-pair copy of the features, no normalised copy of them either)."""
    B, N, D = X.shape
    G, K, _ = protos.shape
    stack = torch.zeros(B, sl.S, K, D, dtype=X.dtype, device=X.device)
    stack[sl.b, sl.slot] = _unit(protos).to(X.dtype)
    sim = (torch.bmm(X, stack.view(B, sl.S * K, D).transpose(1, 2)) / xnorm).view(B, N, sl.S, K)
    return sim[sl.b, :, sl.slot]  # (G, N, K)


def _points(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D, h, w) → contiguous (B, N, D) points (one copy: k-means gathers rows of it) and their norms."""
    X = _compute(features).flatten(2).transpose(1, 2).contiguous()
    return X, X.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _dense(values: torch.Tensor, sl: Slots, B: int, C: int) -> torch.Tensor:
    """(G, N) per pair → (B, C, N) with zeros for absent pairs, differentiable."""
    out = values.new_zeros(B, C, values.shape[-1])
    return out.index_put((sl.b, sl.c), values)


# ----------------------------------------------------------------------------------------- paper (§11.2)
class PaperStage(NamedTuple):
    """The paper pipeline's outputs. ``cam`` (B, C, h, w): M_pot, max-normalised over the valid pixels,
    zero for absent classes; ``background`` (B, 1, h, w) = 1 − max_c M_pot on valid pixels;
    ``confidence`` (B, C, h, w) = max_k of the row-normalised plan (the adaptive loss weight). For tests
    and diagnostics: ``plan`` (G, N, K), ``kmeans_labels`` (G, N), ``omega`` (G, N), ``marginal`` (G, K)
    and the pairs ``slots``."""

    cam: torch.Tensor
    background: torch.Tensor
    confidence: torch.Tensor
    plan: torch.Tensor
    kmeans_labels: torch.Tensor
    omega: torch.Tensor
    marginal: torch.Tensor
    slots: Slots


def _marginal(protos: torch.Tensor, counts: torch.Tensor, alive: torch.Tensor, how: str, temperature: float
              ) -> torch.Tensor:
    """The OT target marginal ν over a pair's K clusters (zero on dead clusters, sums to 1 on live ones).
    ``similarity`` [I]: softmax_k(cos(p_k, q)/T) with q the class prototype (mean of the confident
    features = the count-weighted mean of the p_k); ``relu``: ReLU(cos) normalised; ``size``: cluster
    sizes; ``uniform``: 1/K' (the released code's)."""
    w = counts.to(protos.dtype)
    q = (w[..., None] * protos).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (G, D)
    cos = (_unit(protos) * _unit(q)[:, None]).sum(-1)  # (G, K)
    if how == "similarity":
        nu = torch.softmax(torch.where(alive, cos / temperature, float("-inf")), -1)
    elif how == "relu":
        nu = torch.where(alive, F.relu(cos) + 1e-6, 0.0)
    elif how == "size":
        nu = torch.where(alive, w, 0.0)
    elif how == "uniform":
        nu = alive.to(protos.dtype)
    else:
        raise TokensegError(f"pot.marginal must be similarity, relu, size or uniform, got {how!r}")
    nu = torch.where(alive, nu, 0.0)
    return nu / nu.sum(-1, keepdim=True).clamp_min(1e-12)


def paper_stage(features: torch.Tensor, baseline: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
                pc, generator: torch.Generator | None = None, init: torch.Tensor | None = None) -> PaperStage:
    """Stages 1–3 of the paper (§11.2) for every present (image, class) pair of a batch at once.

    features (B, D, h, w) ``F``; baseline (B, C, h, w) the CAM that picks confident pixels (classifier
    CAM or CLIP-ES, in [0, 1]); present (B, C) multi-hot; valid (B, h, w) pixels inside the image (not
    crop padding). ``pc`` holds the options (``cfg.pot``): tau, clusters, kmeans_iters, marginal,
    marginal_temperature, solver, ot_eps, ot_iters, ot_thresh, update, update_region. ``init``: the
    k-means starting centroids (pairs, K, D) (default: K random confident points per pair, ``generator``).

    1. Ω = {i valid : baseline > τ}; cosine k-means (K clusters) on F over Ω (no gradient, as the
       library); the cluster prototypes p_k are the means of their points *with* gradient (the code's
       centres carry it too). A pair with 0 < |Ω| < K gets |Ω| clusters [I]; |Ω| = 0 gives no map.
    2. OT of all valid pixels (uniform μ) to the live clusters (ν from ``pc.marginal``), cost 1 − cos,
       the code's Sinkhorn (ε 0.1, ≤ 100 iterations, mean |Δr| < 1e‑2, one stop decision per image as
       their call over a stack of classes) or the log-domain one; no gradient through the solver.
    3. p'_k = Σ_i T_ik F_i / Σ_i T_ik over the update region (``soft``; ``hard``: argmax_k T;
       ``none``: keep p_k); A_k = ReLU(cos(F, p'_k)); M_pot = Σ_k (T_ik / Σ_k' T_ik') A_k(i), max-normalised.
       Update region [I] ``confident`` (Ω): over all pixels every pixel's full OT mass lands in some
       cluster, so each prototype would be mostly background (``all`` does that, the literal reading).
    """
    B, D, h, w = features.shape
    C = present.shape[1]
    N = h * w
    dev = features.device
    X, xnorm = _points(features)  # (B, N, D), (B, N, 1)
    vflat = valid.reshape(B, N).bool()
    sl = class_slots(present)
    G = len(sl.b)
    K = int(pc.clusters)
    if G == 0:
        # no present class: zero maps, still tied to the graph (DDP expects every parameter used)
        z = _compute(features).new_zeros(B, C, h, w) + 0.0 * _compute(features).sum()
        e = torch.zeros(0, N, K, device=dev)
        return PaperStage(z, (1.0 - z.amax(1, keepdim=True)) * valid[:, None].float(), z, e,
                          torch.zeros(0, N, dtype=torch.long, device=dev), torch.zeros(0, N, dtype=torch.bool,
                                                                                         device=dev),
                          torch.zeros(0, K, device=dev), sl)
    base = baseline.detach().to(X.dtype).reshape(B, C, N)
    omega = (base[sl.b, sl.c] > pc.tau) & vflat[sl.b]  # (G, N)

    # stage 1: clusters of the confident features
    km = kmeans(X.detach(), K, mask=omega, iters=pc.kmeans_iters, distance="cosine", tol=1e-4,
                generator=generator, x_index=sl.b, init=init)
    assign = F.one_hot(km.labels.clamp_min(0), K).to(X.dtype) * (km.labels >= 0)[..., None]  # (G, N, K)
    sums, counts = _slot_prototypes(X, assign, sl)
    alive = counts > 0
    protos = torch.where(alive[..., None], sums / counts.clamp_min(1)[..., None], 0.0)  # (G, K, D), with grad
    has = alive.any(-1)  # (G,)

    # stage 2: similarity-aware OT of every valid pixel to the pair's clusters
    with torch.no_grad():
        nu = _marginal(protos.detach(), counts, alive, pc.marginal, pc.marginal_temperature)
        cost = 1.0 - _slot_cosines(X.detach(), xnorm.detach(), protos.detach(), sl)  # (G, N, K)
        rows = vflat[sl.b] & has[:, None]
        if pc.solver == "code":
            plan = sinkhorn_code(cost, None, nu, eps=pc.ot_eps, max_iter=pc.ot_iters, thresh=pc.ot_thresh,
                                 row_mask=rows, col_mask=alive, groups=sl.b)
        else:
            plan = sinkhorn(cost, None, nu, eps=pc.ot_eps, iters=pc.ot_iters, row_mask=rows, col_mask=alive)
        plan = torch.nan_to_num(plan, nan=0.0, posinf=0.0)
        row = plan.sum(-1, keepdim=True)
        weight = torch.where(row > 0, plan / row.clamp_min(1e-30), 0.0)  # (G, N, K): T_ik / Σ_k' T_ik'

        # stage 3: prototypes from the allocated features
        if pc.update == "none":
            upd = None
        else:
            region = omega if pc.update_region == "confident" else rows
            t = plan if pc.update == "soft" else F.one_hot(plan.argmax(-1), K).to(plan.dtype) * (row > 0)
            upd = t * region[..., None]
            upd = upd / upd.sum(1, keepdim=True).clamp_min(1e-30)  # per-cluster weights summing to 1
    if upd is None:
        new = protos
    else:
        nsums, mass = _slot_prototypes(X, upd, sl)
        new = torch.where((mass > 0)[..., None], nsums / mass.clamp_min(1e-30)[..., None], protos)
    act = F.relu(_slot_cosines(X, xnorm, new, sl))  # (G, N, K), with grad
    m = (weight * act).sum(-1) * (rows & vflat[sl.b]).to(act.dtype)  # (G, N)
    m = m / (m.amax(-1, keepdim=True) + 1e-5)
    cam = _dense(m, sl, B, C).view(B, C, h, w)
    conf = _dense(weight.amax(-1) * rows, sl, B, C).view(B, C, h, w)
    bg = (1.0 - cam.amax(1, keepdim=True)) * valid[:, None].to(cam.dtype)
    return PaperStage(cam, bg, conf, plan, km.labels, omega, nu, sl)


# ----------------------------------------------------------------------------------------- code (§11.4)
def code_stage(features: torch.Tensor, cam_logits: torch.Tensor, present: torch.Tensor, valid: torch.Tensor,
               kmeans_iters: int = 100, generator: torch.Generator | None = None, clusters: int = CODE_CLUSTERS,
               training: bool = True, numpy_seed: int | None = None, per_image: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's ``get_seed_aff_x4`` for every image and channel at once [C:POT@d0ecbbf].

    The classifier CAM ``ReLU(cam)/max`` with background ``1 − max`` over *all* classes, masked by
    ``[1, y]`` and ``valid``; seeds = its argmax (background included) masked by ``[1, y]``: in training
    the argmax of the masked CAM (their ``Net`` passes the masked map), at inference (``training=False``,
    their ``CAM``) the argmax over *every* class, so a pixel won by an absent class seeds nothing; per image and channel (the
    background too) with ≥ K seed pixels, cosine k-means with K = 2 on ``F`` at the seeds; the map is
    the *mean* over clusters of cos(F, centre) (no ReLU), masked, max-normalised (the max over the whole
    grid, masked zeros included, as ``adaptive_max_pool2d``). The OT they solve next is never used and
    is skipped. k-means starts from K random seed pixels per channel: drawn with ``generator``, or, with
    ``numpy_seed``, as ``kmeans_pytorch`` draws them (``np.random.choice`` per channel in order) from
    ``RandomState(numpy_seed)`` — one stream for the batch, or a fresh one per image (``per_image``: their
    inference runs one image per call). Returns ``(maps (B, C+1, h, w), vm (B, C+1, h, w) the mask
    [valid, valid·y])``."""
    B, D, h, w = features.shape
    C = present.shape[1]
    N = h * w
    cam = F.relu(cam_logits.float())
    cam = max_norm(cam)
    ncam = torch.cat([1.0 - cam.amax(1, keepdim=True), cam], 1)
    if ncam.shape[-2:] != (h, w):
        ncam = F.interpolate(ncam, (h, w), mode="bilinear", align_corners=True)
    lab = torch.cat([torch.ones_like(present[:, :1]), present], 1).float()  # (B, C+1)
    vm = valid[:, None].float() * lab[:, :, None, None]
    if training:
        ncam = ncam * vm
    seeds = F.one_hot(ncam.argmax(1), C + 1).permute(0, 3, 1, 2).float() * vm  # (B, C+1, h, w)
    X, xnorm = _points(features)
    sl = class_slots(lab)
    mask = seeds.reshape(B, C + 1, N)[sl.b, sl.c] > 0  # (G, N)
    ok = mask.sum(1) >= clusters  # the code skips channels with fewer seeds than clusters
    mask = mask & ok[:, None]
    init = None if numpy_seed is None else _library_init(X, mask, sl, clusters, numpy_seed, per_image)
    km = kmeans(X.detach(), clusters, mask=mask, iters=kmeans_iters, distance="cosine", tol=1e-4,
                generator=generator, x_index=sl.b, init=init)
    assign = F.one_hot(km.labels.clamp_min(0), clusters).to(X.dtype) * (km.labels >= 0)[..., None]
    sums, counts = _slot_prototypes(X, assign, sl)
    centres = torch.where((counts > 0)[..., None], sums / counts.clamp_min(1)[..., None], 0.0)
    m = _slot_cosines(X, xnorm, centres, sl).mean(-1) * ok[:, None]  # (G, N)
    maps = _dense(m, sl, B, C + 1).view(B, C + 1, h, w) * vm
    return max_norm(maps), vm


def _library_init(X: torch.Tensor, mask: torch.Tensor, sl: Slots, k: int, seed: int, per_image: bool
                  ) -> torch.Tensor:
    """kmeans_pytorch's initial points of every pair (G, k, D): one ``RandomState(seed)`` stream over the
    pairs in order, or a fresh one per image (pairs are sorted by image, so the parts concatenate)."""
    if not per_image:
        return kmeans_pytorch_init(X, k, mask, np.random.RandomState(seed), x_index=sl.b)
    parts = []
    for b in torch.unique_consecutive(sl.b).tolist():
        sel = sl.b == b
        parts.append(kmeans_pytorch_init(X, k, mask[sel], np.random.RandomState(seed), x_index=sl.b[sel]))
    return torch.cat(parts) if parts else X.new_zeros(0, k, X.shape[-1])


def code_fusion(cam_class: torch.Tensor, clip: torch.Tensor, vm: torch.Tensor | None, training: bool,
                clip_bg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's fusion of the prototype maps with the CLIP-ES CAM (§11.4, §16.21).

    cam_class (B, C+1, h, w) from :func:`code_stage`; clip (B, C, h, w) the CLIP-ES maps on the grid
    (zero for absent classes; in training also outside the crop). With b = 1 − max_c clip:
    ``cc = [1 − max, ReLU(cam_class_fg − 0.5 b)]``; the CLIP map ``[b, clip]`` (training: its
    foreground ``ReLU(clip − 0.15 b)`` with a new ``1 − max`` background, masked by ``vm``), then
    ``ReLU(1.2 x − 0.2 Σ_channels x)``, max-normalised, (training: values below half their row mean
    zeroed); where both argmaxes agree, + 0.2 cc (inference 0.3); capped at 1.
    ``clip_bg`` (B, 1, h, w) replaces b (their inference takes 1 − max on the coarser CLIP grid, then
    resizes it with the maps). Returns ``(cc, fused)``, both (B, C+1, h, w): IS_CAM1's and IS_CAM's
    per-scale maps at inference."""
    if clip_bg is None:
        clip_bg = 1.0 - clip.amax(1, keepdim=True)
    fg = F.relu(cam_class[:, 1:] - 0.5 * clip_bg)
    cc = torch.cat([1.0 - fg.amax(1, keepdim=True), fg], 1)
    if training:
        cf = F.relu(clip - 0.15 * clip_bg)
        nc = torch.cat([1.0 - cf.amax(1, keepdim=True), cf], 1)
        if vm is not None:
            nc = nc * vm
    else:
        nc = torch.cat([clip_bg, clip], 1)
    nc = F.relu(1.2 * nc - 0.2 * nc.sum(1, keepdim=True))
    nc = max_norm(nc)
    if training:
        nc = torch.where(nc < 0.5 * nc.mean(3, keepdim=True), 0.0, nc)
    match = nc.argmax(1, keepdim=True) == cc.argmax(1, keepdim=True)
    fused = torch.where(match, nc + (0.2 if training else 0.3) * cc, nc).clamp(max=1.0)
    return cc, fused
