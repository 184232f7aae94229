"""IRNet (Ahn, Cho & Kwak, CVPR 2019): the network, the path geometry of its pair affinities, its loss.

**Network.** A timm ResNet whose layer4 keeps stride 1 (output stride 16, no dilation, as IRN's
``strides=(2, 2, 2, 1)`` ResNet-50) feeds two branches built only from 1×1 convolutions, GroupNorm,
ReLU and bilinear upsampling, both at stride 4:

* class boundaries ``B``: 32 channels from each of the five stages (stem after max-pool, layer1–4;
  the deeper ones upsampled ×2/×4/×4), concatenated (160) → one logit;
* displacement field ``D``: 64/128/256 channels from the stem/layer1/layer2, 256 from layer3/4
  upsampled to stride 8, fused (768 → 256) and upsampled to stride 4, fused (448 → 256 → 2).

As in IRN the backbone is frozen (its features are detached and its BatchNorms stay in eval mode),
so only the branches learn; the two branches share no trainable parameter, so the displacement branch
(which only instance masks use) does not change the boundaries (``displacement=False`` skips it).

**Pair affinity from boundaries.** For two cells ``i, j`` of the stride-4 grid within ``radius``,
``a_ij = 1 − max_{k ∈ path(i, j)} B_k``, the path being the grid points of the bounding box of ``i`` and
``j`` at distance < 1 from the line through them (both ends included). Pairs are the forward half-disc
(``search_directions``); training uses radius 10, the random walk radius 5.

**Loss** (per pair whose two labels are known): ``L = (L_pos + L_neg)/2 + (L_dp_fg + L_dp_bg)/2`` with
``L_pos = ½ mean_bg(−log a) + ½ mean_fg(−log a)`` over same-label pairs (background / foreground),
``L_neg = mean(−log(1 − a))`` over different-label pairs, ``L_dp_fg = mean_fg |D_i − D_j − (j − i)|``
(foreground pairs: both cells point to the same centroid) and ``L_dp_bg = mean_bg |D_i − D_j|``.
Source cells are IRN's cropped region (rows ``[0, h − r + 1)``, columns ``[r − 1, w − r + 1)``) so that
every destination exists.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn

from ..core.masks import IGNORE_INDEX
from ..core.errors import TokensegError

EPS = 1e-5


# ----------------------------------------------------------------------------- path geometry
@lru_cache(maxsize=None)
def search_directions(radius: int) -> tuple[tuple[int, int], ...]:
    """IRN's forward half-disc of offsets (dy, dx): (0, dx) for 0 < dx < r, then every (dy, dx) with
    0 < dy < r, |dx| < r and dy² + dx² < r². Each unordered pair of cells appears once."""
    dirs = [(0, dx) for dx in range(1, radius)]
    dirs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
             if dy * dy + dx * dx < radius ** 2]
    return tuple(dirs)


@lru_cache(maxsize=None)
def direction_path(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """Grid points (y, x) of the bounding box of (0, 0) and (dy, dx) whose distance to the line
    through them is below 1 (both ends included)."""
    length_sq = dy * dy + dx * dx
    pts = [(y, x) for y in range(min(0, dy), max(0, dy) + 1) for x in range(min(0, dx), max(0, dx) + 1)
           if (dy * x - dx * y) ** 2 < length_sq]
    return tuple(pts)


def path_max(edge: torch.Tensor, radius: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``max_{k ∈ path} edge`` for every forward direction and every source cell of the window
    ``edge[..., top:top + height, left:left + width]``: (B, n_dirs, height, width).

    ``edge`` (B, H, W) must hold every destination (pad it beforehand). Differentiable: the gradient
    goes to the arg-max cell of each path (the first of equal ones), as IRN's max-pool over the path.
    With a gradient, one scatter-add carries it back (:class:`_PathMax`) instead of autograd's
    zero-filled edge-sized buffer for each of the ~2,100 path cells of radius 10."""
    if torch.is_grad_enabled() and edge.requires_grad:
        return _PathMax.apply(edge, radius, top, left, height, width)
    return _path_max(edge, radius, top, left, height, width)[0]


def _path_max(edge: torch.Tensor, radius: int, top: int, left: int, height: int, width: int,
              with_index: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The path maxima (a running ``torch.maximum`` per direction: a stack and ``max(dim)`` with indices
    costs ~15x more on a CPU) and, ``with_index``, the flat index in ``edge`` of each one's first
    arg-max cell along the path."""
    B, H, W = edge.shape
    dirs = search_directions(radius)
    out = edge.new_empty(B, len(dirs), height, width)
    where = None
    if with_index:
        itype = torch.int32 if B * H * W < 2 ** 31 else torch.int64
        where = torch.empty(B, len(dirs), height, width, dtype=itype, device=edge.device)
        rows = torch.arange(height, device=edge.device, dtype=itype)[:, None] + top
        cols = torch.arange(width, device=edge.device, dtype=itype)[None, :] + left
        base = torch.arange(B, device=edge.device, dtype=itype)[:, None, None] * (H * W) + rows * W + cols
        step = torch.empty(B, height, width, dtype=torch.long, device=edge.device)
    for d, (dy, dx) in enumerate(dirs):
        path = direction_path(dy, dx)
        views = [edge[:, top + y:top + y + height, left + x:left + x + width] for y, x in path]
        o = out[:, d]
        o.copy_(views[0])
        for v in views[1:]:
            torch.maximum(o, v, out=o)
        if where is not None:  # the first path cell holding the maximum: walk the path backwards
            step.fill_(len(path) - 1)
            for k in range(len(path) - 2, -1, -1):
                step.masked_fill_(views[k] == o, k)
            shifts = torch.tensor([y * W + x for y, x in path], dtype=where.dtype, device=edge.device)
            torch.add(base, shifts[step], out=where[:, d])
    return out, where


class _PathMax(torch.autograd.Function):
    """:func:`path_max` with its gradient: the forward keeps, per output, the flat index of its arg-max
    cell in ``edge``; the backward is one ``index_add_`` of the incoming gradient at those cells."""

    @staticmethod
    def forward(ctx, edge: torch.Tensor, radius: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
        out, where = _path_max(edge, radius, top, left, height, width, with_index=True)
        ctx.save_for_backward(where)
        ctx.edge_shape = edge.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (where,) = ctx.saved_tensors
        grad_edge = grad.new_zeros(ctx.edge_shape)
        grad_edge.view(-1).index_add_(0, where.reshape(-1), grad.reshape(-1))
        return grad_edge, None, None, None, None, None


# ----------------------------------------------------------------------------- network
def _block(cin: int, cout: int, groups: int, up: int = 1, relu: bool = True) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm → [bilinear ×up] → ReLU: IRN's branch unit."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _undilate(layer: nn.Module) -> None:
    """timm's output_stride=16 dilates layer4; IRN's ResNet only drops its stride (dilation 1)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d) and m.dilation != (1, 1):
            m.dilation = (1, 1)
            m.padding = tuple((k - 1) // 2 for k in m.kernel_size)


RESNET_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")


class IRNet(nn.Module):
    """Boundary and displacement branches on a frozen timm ResNet (see the module docstring)."""

    def __init__(self, backbone: str = "resnet50", pretrained: bool = False, weights: str = "",
                 displacement: bool = True, freeze_backbone: bool = True) -> None:
        super().__init__()
        from ..models.backbone import create_timm

        self.backbone_name = backbone
        self.freeze_backbone = freeze_backbone
        try:
            self.encoder = create_timm(backbone, pretrained, weights, key="pseudo.irn", num_classes=0,
                                       output_stride=16)
        except TypeError as exc:  # a model class without output_stride
            raise TokensegError(f"pseudo.irn.backbone: {backbone!r} is not a timm ResNet ({exc})") from exc
        missing = [p for p in RESNET_PARTS if not hasattr(self.encoder, p)]
        if missing:
            raise TokensegError(f"pseudo.irn.backbone: {backbone!r} is not a timm ResNet (no {', '.join(missing)})")
        _undilate(self.encoder.layer4)
        ch = [int(f["num_chs"]) for f in self.encoder.feature_info][:5]  # act1, layer1..4
        # boundary branch first, so that its initialisation does not depend on `displacement`
        self.edge_layers = nn.ModuleList([
            _block(ch[0], 32, 4), _block(ch[1], 32, 4), _block(ch[2], 32, 4, up=2),
            _block(ch[3], 32, 4, up=4), _block(ch[4], 32, 4, up=4)])
        self.edge_out = nn.Conv2d(160, 1, 1, bias=True)
        self.dp_layers = None
        if displacement:
            self.dp_layers = nn.ModuleList([
                _block(ch[0], 64, 8), _block(ch[1], 128, 16), _block(ch[2], 256, 16),
                _block(ch[3], 256, 16, up=2), _block(ch[4], 256, 16, up=2),
                _block(768, 256, 16, up=2),
                nn.Sequential(_block(448, 256, 16), nn.Conv2d(256, 2, 1, bias=False))])
        # channels-last: ~13 % off the forward and the backward on a CPU (oneDNN's native layout), same
        # loss to float rounding; loaded weights keep it (load_state_dict copies into these tensors)
        self.to(memory_format=torch.channels_last)

    @property
    def displacement(self) -> bool:
        return self.dp_layers is not None

    def train(self, mode: bool = True) -> "IRNet":
        super().train(mode)
        self.encoder.eval()  # BatchNorm statistics stay frozen, as IRN's backbone.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def edge_parameters(self) -> list[nn.Parameter]:
        return list(self.edge_layers.parameters()) + list(self.edge_out.parameters())

    def displacement_parameters(self) -> list[nn.Parameter]:
        return list(self.dp_layers.parameters()) if self.dp_layers is not None else []

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = self.encoder
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            x1 = e.maxpool(e.act1(e.bn1(e.conv1(x))))
            x2 = e.layer1(x1)
            x3 = e.layer2(x2)
            x4 = e.layer3(x3)
            x5 = e.layer4(x4)
        return [x1, x2, x3, x4, x5]

    def forward(self, x: torch.Tensor, with_displacement: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) → boundary logits (B, 1, h, w) and displacements (B, 2, h, w) (or None) at
        stride 4."""
        feats = self.features(x)
        h, w = feats[1].shape[-2:]
        edge = torch.cat([layer(f)[..., :h, :w] for layer, f in zip(self.edge_layers, feats)], 1)
        edge = self.edge_out(edge)
        if not with_displacement or self.dp_layers is None:
            return edge, None
        d = [layer(f) for layer, f in zip(self.dp_layers[:5], feats)]
        h8, w8 = d[2].shape[-2:]
        mid = self.dp_layers[5](torch.cat([d[2], d[3][..., :h8, :w8], d[4][..., :h8, :w8]], 1))[..., :h, :w]
        disp = self.dp_layers[6](torch.cat([d[0], d[1], mid], 1))
        return edge, disp


# ----------------------------------------------------------------------------- loss
def reduce_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels → (B, h, w) by nearest sampling at cell centres: PIL NEAREST's
    ``floor((i + ½)·H/h)``, what IRN's ``pil_rescale(label, 0.25, 0)`` does."""
    H, W = labels.shape[-2:]
    h, w = size
    ys = ((torch.arange(h, device=labels.device) + 0.5) * (H / h)).floor().long().clamp_max(H - 1)
    xs = ((torch.arange(w, device=labels.device) + 0.5) * (W / w)).floor().long().clamp_max(W - 1)
    return labels[:, ys][:, :, xs]


def pair_labels(labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background-positive, foreground-positive and negative pair masks (B, n_dirs, h', w') over
    IRN's source window, from (B, h, w) labels (255 = unknown)."""
    h, w = labels.shape[-2:]
    r = radius - 1
    hh, ww = h - r, w - 2 * r
    src = labels[:, :hh, r:r + ww].unsqueeze(1)
    dst = torch.stack([labels[:, dy:dy + hh, r + dx:r + dx + ww] for dy, dx in search_directions(radius)], 1)
    valid = (src != IGNORE_INDEX) & (dst != IGNORE_INDEX)
    equal = src == dst
    pos = equal & valid
    return pos & (src == 0), pos & (src != 0), valid & ~equal


def irn_loss(edge_logits: torch.Tensor, disp: torch.Tensor | None, labels: torch.Tensor,
             radius: int = 10) -> tuple[torch.Tensor, dict]:
    """IRN's loss (module docstring) for (B, 1, h, w) boundary logits, (B, 2, h, w) displacements
    (or None) and (B, h, w) labels on the same grid."""
    h, w = edge_logits.shape[-2:]
    r = radius - 1
    if h <= r or w <= 2 * r:
        raise TokensegError(f"pseudo.irn.crop: a {4 * h}×{4 * w} crop is too small for the training radius {radius}")
    hh, ww = h - r, w - 2 * r
    aff = 1.0 - path_max(torch.sigmoid(edge_logits[:, 0]), radius, 0, r, hh, ww)
    bg, fg, neg = pair_labels(labels, radius)
    bg_f, fg_f, neg_f = bg.to(aff.dtype), fg.to(aff.dtype), neg.to(aff.dtype)
    n_bg, n_fg, n_neg = bg_f.sum(), fg_f.sum(), neg_f.sum()
    pos_l = -torch.log(aff + EPS)
    l_bg = (bg_f * pos_l).sum() / (n_bg + EPS)
    l_fg = (fg_f * pos_l).sum() / (n_fg + EPS)
    l_neg = (neg_f * -torch.log(1.0 + EPS - aff)).sum() / (n_neg + EPS)
    loss = (l_bg / 2 + l_fg / 2 + l_neg) / 2
    parts = {"bg": l_bg.detach(), "fg": l_fg.detach(), "neg": l_neg.detach()}
    if disp is not None:  # per direction: (B, 2, hh, ww) pieces stay in cache, no (B, 2, n_dirs, hh, ww) stack
        src = disp[:, :, :hh, r:r + ww]
        w_fg, w_bg = fg_f / (2 * n_fg + EPS), bg_f / (2 * n_bg + EPS)
        l_dfg = l_dbg = disp.new_zeros(())
        for d, (dy, dx) in enumerate(search_directions(radius)):
            pair = src - disp[:, :, dy:dy + hh, r + dx:r + dx + ww]
            target = torch.tensor([dy, dx], dtype=disp.dtype, device=disp.device).view(1, 2, 1, 1)
            l_dfg = l_dfg + ((pair - target).abs().sum(1) * w_fg[:, d]).sum()
            l_dbg = l_dbg + (pair.abs().sum(1) * w_bg[:, d]).sum()
        loss = loss + (l_dfg + l_dbg) / 2
        parts.update(dp_fg=l_dfg.detach(), dp_bg=l_dbg.detach())
    return loss, parts


__all__ = ["IRNet", "search_directions", "direction_path", "path_max", "reduce_labels", "pair_labels", "irn_loss"]
