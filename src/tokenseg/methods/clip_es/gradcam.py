"""CLIP-ES (Lin et al., CVPR 2023): training-free seeds from a frozen CLIP ViT.

softmax-GradCAM: the image feature (mean of the patch tokens after ln_post and the projection) is
compared by 100·cos with the text features of [the image's classes ∪ background words]; the softmax
probability of each present class is back-propagated to block 12's ln_1 output; channel weights =
spatial mean of that gradient, ReLU, min–max. CAA: the head-mean patch attention of the last 8 layers,
Sinkhorn-normalised, symmetrised and squared, propagates each CAM inside the boxes around its
high-scoring regions. Exact to the authors' code (``generate_cams_voc12.py`` / ``_coco14.py``,
METHODS.md §10 and §16.17–16.19), tested against outputs of that code.

Where we compute differently, for speed, the result is the same up to float rounding:
  * all present classes' Grad-CAMs come from ONE forward of block 12 and one backward written out
    and batched over the classes (see :func:`softmax_gradcam`): Grad-CAM's channel weights are the
    patch-mean of the ln_1 gradient = (patch-sums of the q/k/v gradients) × the in-projection, and
    those sums need one product with the attention per class; no weight gradients, no autograd
    graph (their loop re-runs block 12 and a full ``backward()`` per class);
  * a batch holds images of one input size; blocks outside the CAA layers use fused attention;
  * the CAA product ``(T·T)·v`` is computed as ``T·(T·v)`` for the classes present (M²·C, not M³).

Their quirks are options whose defaults follow their code (see :class:`ClipESOptions`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...core.seeds import SeedMaps
from ...core.errors import TokensegError
from ...models.clip import ClipModel
from ...models.clip_ops import block_qkv, layer_norm, linear, split_heads, visual_blocks, visual_embed
from .prompts import COMPUTE_DTYPES



# --------------------------------------------------------------------------------------------
# Options and outputs
# --------------------------------------------------------------------------------------------

@dataclass
class ClipESOptions:
    """Settings of the CLIP-ES computation (defaults: their VOC script).

    Quirks of their code, on by default:
      * ``pos_embed_fp16`` — the resized position grid is rounded to float16 (their
        ``upsample_pos_emb`` makes a half Parameter), also in fp32 runs;
      * ``box_quantize`` — the box threshold is applied to ``uint8(255·cam)`` against
        ``int(t·max)`` (their ``scoremap2bbox``), not to the float CAM;
      * ``box_clip_last`` — a box's exclusive end is clipped to ``size − 1``, so the grid's last row
        and column are never inside a box."""

    box_threshold: float = 0.4  # 0.7 for COCO
    caa_layers: int = 8  # attention of the last k layers (all when the model has fewer)
    sinkhorn_rounds: int = 3
    refine: bool = True  # CAA; False returns the Grad-CAM upsampled [I]
    pos_embed_fp16: bool = True
    box_quantize: bool = True
    box_clip_last: bool = True
    class_chunk: int = 16  # class slots per batched backward (bounds memory on COCO)
    blocked_attention: bool | None = None  # None: blocked explicit attention on the CPU
    # fp32 | bf16 | fp16 [I]: dtype of the tower's matrix products (weights cast once; the residual
    # stream, LayerNorms, the last block's attention, the head, Grad-CAM and CAA stay fp32)
    dtype: str = "fp32"


@dataclass
class ClipESOutput:
    """One image's CLIP-ES result (tensors on the input's device).

    ``maps`` (n, H, W) are the CAA-refined, min–max maps at image size (their ``attn_highres``) for
    ``keys`` (class indices). The rest is for inspection and tests: ``grid_cam`` (n, h, w) Grad-CAM,
    ``probs`` (n,) the softmax probability of each class, ``box_mask`` (n, h, w), ``affinity`` (M, M) the
    mean head-mean patch attention of the CAA layers, ``highres`` (n, H, W) the Grad-CAM upsampled."""

    keys: torch.Tensor
    maps: torch.Tensor
    grid_cam: torch.Tensor
    probs: torch.Tensor
    box_mask: torch.Tensor | None = None
    affinity: torch.Tensor | None = None
    highres: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def seed(self, dtype=np.float32) -> SeedMaps:
        """As :class:`tokenseg.core.seeds.SeedMaps` on the host (for ``save_seed``; background = (1 − max)^α)."""
        return SeedMaps(self.keys.cpu().numpy().astype(np.int64), self.maps.float().cpu().numpy().astype(dtype),
                        {"method": "clip-es", **self.meta})


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------

def _pad_labels(labels, num_classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Cmax) class indices (0-padded) and their validity mask; duplicates dropped, order kept.
    ``labels``: per image a list of class indices, or a (B, C) multi-hot array (ascending order)."""
    if isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 2:
        if labels.shape[1] != num_classes:
            raise TokensegError(f"multi-hot labels have {labels.shape[1]} columns for {num_classes} classes")
        labels = [np.flatnonzero(np.asarray(row.cpu() if isinstance(row, torch.Tensor) else row) > 0).tolist()
                  for row in labels]
    rows = []
    for i, lab in enumerate(labels):
        seen = list(dict.fromkeys(int(c) for c in lab))
        bad = [c for c in seen if not 0 <= c < num_classes]
        if bad:
            raise TokensegError(f"image {i}: class indices {bad} outside 0..{num_classes - 1}")
        rows.append(seen)
    cmax = max((len(r) for r in rows), default=0)
    idx = torch.zeros(len(rows), cmax, dtype=torch.long)
    valid = torch.zeros(len(rows), cmax, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    return idx.to(device), valid.to(device)


def minmax_cam(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` over the last two dims: ``(x − min) / (eps + max(x − min))``."""
    x = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return x / (eps + x.amax(dim=(-2, -1), keepdim=True))


def _ln_stats(mod, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised input x̂ and 1/σ of a LayerNorm (fp32)."""
    x = x.float()
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + mod.eps)
    return (x - mu) * rstd, rstd


def _ln_backward(mod, xhat: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient through a LayerNorm w.r.t. its input, for a stack of cotangents ``g`` (..., N, D)."""
    gh = g * mod.weight.float() if mod.weight is not None else g
    return rstd * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))


def _layer_scale(mod) -> torch.Tensor | None:
    return mod.gamma.float() if hasattr(mod, "gamma") else None


def softmax_gradcam(model: ClipModel, x: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor,
                    valid: torch.Tensor, fg_text: torch.Tensor, bg_text: torch.Tensor, class_chunk: int = 16,
                    visual: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAMs of every present class from one pass of the last block.

    ``x`` (B, N, D): the tokens entering the last block. Returns the CAM (B, Cmax, h, w) after ReLU and
    their two min–max passes (zeros in padded slots), the last block's head-mean attention (B, N, N)
    and the probabilities (B, Cmax). ``visual``: the tower to use (default ``model.visual``; a
    low-precision copy computes the big products in its dtype, everything else stays fp32).

    The backward is written out and batched over the class slots (a leading dimension of every
    product): for class c the cotangent of ``p_c`` goes through the softmax, the feature normalisation
    and projection, ln_post (its cotangent is the same vector on every patch token), the MLP, ln_2,
    the output projection and the attention. Grad-CAM only needs the patch-mean of the ln_1 gradient,
    i.e. (patch-sums of the q/k/v gradients) × the in-projection, and those sums need one product with
    the attention per class (Aᵀ·g_O) instead of autograd's four N×N products — and no weight gradients.
    Equal to autograd on the same forward up to float rounding (tested)."""
    visual = model.visual if visual is None else visual
    blk = visual.transformer.resblocks[-1]
    x = x.float()
    B, N, D = x.shape
    M = N - 1
    cmax = labels.shape[1]
    H = blk.attn.num_heads
    d = D // H
    scale = d ** -0.5
    dev = x.device
    w_in = blk.attn.in_proj_weight.float()
    w_o, w_fc, w_cp = blk.attn.out_proj.weight, blk.mlp.c_fc.weight, blk.mlp.c_proj.weight
    ls1, ls2 = _layer_scale(blk.ls_1), _layer_scale(blk.ls_2)
    proj = visual.proj.float()

    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # a·W in the weight's dtype, result fp32
        return (a.to(w.dtype) @ w).float()

    with torch.no_grad():
        # ---- forward of the last block, keeping what the backward needs (attention in fp32)
        z = layer_norm(blk.ln_1, x)
        q, k, v = (t.float() for t in split_heads(block_qkv(blk, z), H))  # (B, H, N, d)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
        o = attn @ v
        x1 = x + blk.ls_1(linear(blk.attn.out_proj, o.transpose(1, 2).reshape(B, N, D))).float()
        hdn = linear(blk.mlp.c_fc, layer_norm(blk.ln_2, x1))
        y = x1 + blk.ls_2(linear(blk.mlp.c_proj, blk.mlp.gelu(hdn))).float()
        # ---- the head: mean of the patch tokens after ln_post, projection, cosine, softmax
        yhat, y_rstd = _ln_stats(visual.ln_post, y[:, 1:])
        post = yhat * visual.ln_post.weight.float() + visual.ln_post.bias.float()
        f_raw = post.mean(1) @ proj  # (B, E)
        f_norm = f_raw.norm(dim=-1, keepdim=True)
        f = f_raw / f_norm
        text = torch.cat([fg_text[labels], bg_text.expand(B, -1, -1)], dim=1).float()  # (B, Cmax+K, E)
        text = text / text.norm(dim=-1, keepdim=True)
        slot_ok = torch.cat([valid, torch.ones(B, bg_text.shape[0], dtype=torch.bool, device=dev)], 1)
        s = model.logit_scale.exp().float()
        p = (s * torch.einsum("be,bke->bk", f, text)).masked_fill(~slot_ok, float("-inf")).softmax(-1)
        with torch.enable_grad():  # the activation's derivative (elementwise), from autograd
            hp = hdn[:, 1:].detach().float().requires_grad_(True)
            act_grad, = torch.autograd.grad(blk.mlp.gelu(hp).sum(), hp)
        x1hat, x1_rstd = _ln_stats(blk.ln_2, x1[:, 1:])
        o_p, q_p, v0 = o[:, :, 1:], q[:, :, 1:], v[:, :, :1]
        a_p = attn[:, :, 1:]  # patch query rows (the class token's output is never used)
        r = 1.0 - a_p[..., 0]  # attention of each patch query on the patch keys
        weights = []
        # ---- the backward, class slots stacked in front
        for c0 in range(0, cmax, class_chunk):
            c1 = min(c0 + class_chunk, cmax)
            C = c1 - c0
            eye = torch.zeros(C, B, p.shape[1], device=dev)
            ar = torch.arange(C, device=dev)
            eye[ar, :, ar + c0] = 1.0
            pc = (p[:, c0:c1] * valid[:, c0:c1]).T[:, :, None]  # (C, B, 1); 0 for padded slots
            g_logit = pc * (eye - p[None])  # d p_c / d logits
            g_f = s * torch.einsum("cbk,bke->cbe", g_logit, text)
            g_fraw = (g_f - f * (g_f * f).sum(-1, keepdim=True)) / f_norm
            g_post = (g_fraw @ proj.T)[:, :, None, :] / M  # the same on every patch token
            g_y = _ln_backward(visual.ln_post, yhat, y_rstd, g_post)  # (C, B, M, D)
            g_h = mm(g_y * ls2 if ls2 is not None else g_y, w_cp) * act_grad
            g_x1 = g_y + _ln_backward(blk.ln_2, x1hat, x1_rstd, mm(g_h, w_fc))
            # per head, the classes side by side in the last dim: one (N×M)·(M×C(d+1)) product
            g_o = mm(g_x1 * ls1 if ls1 is not None else g_x1, w_o)
            g_o = g_o.view(C, B, M, H, d).permute(1, 3, 2, 0, 4)  # (B, H, M, C, d); class row: 0
            dlt = (g_o * o_p[:, :, :, None]).sum(-1)  # δ = g_O·O per query: (B, H, M, C)
            both = a_p.transpose(-2, -1) @ torch.cat([g_o.reshape(B, H, M, C * d), dlt], -1)
            g_v = both[..., :C * d].view(B, H, N, C, d)  # Aᵀ g_O
            wv = both[..., C * d:]  # Aᵀ δ: (B, H, N, C)
            sum_q = scale * torch.einsum("bhjc,bhjd->cbhd", (v[:, :, :, None] * g_v).sum(-1) - wv, k)
            g_sk = (g_o * (o_p - a_p[..., :1] * v0)[:, :, :, None]).sum(-1) - r[..., None] * dlt
            sum_k = scale * torch.einsum("bhic,bhid->cbhd", g_sk, q_p)
            sum_v = g_v[:, :, 1:].sum(2).permute(2, 0, 1, 3)  # (C, B, H, d)
            g_qkv = torch.cat([t.reshape(C, B, D) for t in (sum_q, sum_k, sum_v)], -1)  # (C, B, 3D)
            weights.append(g_qkv @ w_in / M)  # the mean over patches of d p_c / d ln_1
        weights = torch.cat(weights)  # (Cmax, B, D)
        cam = torch.einsum("cbd,bnd->bcn", weights, z[:, 1:].float()).clamp_min(0).reshape(B, cmax, *grid)
        cam = minmax_cam(minmax_cam(cam).clamp_min(0))  # their per-layer scaling, then the aggregate's
        cam = cam * valid[:, :, None, None]
    return cam, attn.mean(1), p[:, :cmax]


def box_mask(cams: torch.Tensor, threshold: float, quantize: bool = True, clip_last: bool = True) -> torch.Tensor:
    """(K, h, w) CAMs in [0, 1] → (K, h, w) bool: the union of the boxes around the regions above
    ``threshold·max`` (CLIP-ES's ``scoremap2bbox`` with all contours, then the box mask).

    Their boxes are OpenCV's bounding rectangles of every contour (``RETR_TREE``: outer borders and
    holes). An outer border's rectangle is its 8-connected component's bounding box and a hole's lies
    inside it, so the union is that of the components' boxes: scipy's labelling gives it without
    OpenCV (checked against ``cv2.findContours`` on random masks). One ``label`` call covers all maps
    (a 3-D structure that links pixels only within a map)."""
    from scipy import ndimage

    c = cams.detach().float().cpu().numpy()
    K, h, w = c.shape
    if K == 0:
        return torch.zeros(0, h, w, dtype=torch.bool, device=cams.device)
    if quantize:
        q = (c * np.float32(255)).astype(np.uint8)
        thr = np.floor(threshold * q.reshape(K, -1).max(1).astype(np.float64))
        fg = q > thr[:, None, None]
    else:  # [I] the float CAM against t·max
        fg = c > threshold * c.reshape(K, -1).max(1)[:, None, None]
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within a map, none across maps
    lab, n = ndimage.label(fg, structure=structure)
    diff = np.zeros((K, h + 1, w + 1), dtype=np.int32)
    if n:
        sl = [s for s in ndimage.find_objects(lab) if s is not None]
        kk, y0, y1, x0, x1 = (np.array(a) for a in zip(*[(s[0].start, s[1].start, s[1].stop, s[2].start, s[2].stop)
                                                          for s in sl]))
        if clip_last:
            y1, x1 = np.minimum(y1, h - 1), np.minimum(x1, w - 1)
        for yy, xx, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
            np.add.at(diff, (kk, yy, xx), sign)
    mask = diff.cumsum(1).cumsum(2)[:, :h, :w] > 0
    return torch.from_numpy(mask).to(cams.device)


def sinkhorn_affinity(attn: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """(B, M, M) attention → CAA's transition matrix before squaring: ``rounds`` × (columns, then rows
    sum to one), then symmetrised."""
    t = attn
    for _ in range(rounds):
        t = t / t.sum(dim=1, keepdim=True)
        t = t / t.sum(dim=2, keepdim=True)
    return (t + t.transpose(1, 2)) / 2


def _resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, half-pixel centres (what ``cv2.resize`` INTER_LINEAR does when enlarging)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def clip_es_maps(model: ClipModel, images: torch.Tensor, labels: Sequence[Sequence[int]] | torch.Tensor,
                 fg_text: torch.Tensor, bg_text: torch.Tensor,
                 out_sizes: Sequence[tuple[int, int]] | tuple[int, int] | None = None,
                 options: ClipESOptions | None = None, intermediates: bool = False) -> list[ClipESOutput]:
    """CLIP-ES seeds for a batch of images of one input size.

    ``images`` (B, 3, H', W'): :func:`tokenseg.models.clip_ops.clip_input` outputs (sides multiples of the
    patch), on the model's device. ``labels``: each image's present class indices (into ``fg_text``
    rows), or a (B, C) multi-hot tensor. ``fg_text`` (C, E) / ``bg_text`` (K, E): text features of the
    class prompts and background words. ``out_sizes``: each image's original (H, W) (default: the input
    size). With ``intermediates`` the outputs also carry the box masks, the affinity and the upsampled
    Grad-CAM."""
    opts = options or ClipESOptions()
    dev = images.device
    B = images.shape[0]
    if out_sizes is None:
        out_sizes = [tuple(images.shape[-2:])] * B
    elif len(out_sizes) == 2 and isinstance(out_sizes[0], int):
        out_sizes = [tuple(out_sizes)] * B
    out_sizes = [tuple(int(s) for s in sz) for sz in out_sizes]
    if len(out_sizes) != B:
        raise ValueError(f"{B} images but {len(out_sizes)} output sizes")
    fg_text, bg_text = fg_text.to(dev), bg_text.to(dev)
    lab, valid = _pad_labels(labels, fg_text.shape[0], dev)
    if lab.shape[0] != B:
        raise ValueError(f"{B} images but {lab.shape[0]} label rows")
    p = model.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    L = model.num_layers
    n_caa = min(opts.caa_layers, L)
    caa = range(L - n_caa, L) if opts.refine else range(0)

    if opts.dtype not in COMPUTE_DTYPES:
        raise TokensegError(f"clip_es.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {opts.dtype!r}")
    visual = model.visual_in(COMPUTE_DTYPES[opts.dtype])
    cmax = lab.shape[1]
    if cmax == 0:
        return [_empty(sz, grid, dev) for sz in out_sizes]
    with torch.no_grad():
        x = visual_embed(visual, images, opts.pos_embed_fp16)
        x, attn_sum = visual_blocks(visual, x, L - 1, [i for i in caa if i < L - 1], opts.blocked_attention)
    cam, attn_last, probs = softmax_gradcam(model, x, grid, lab, valid, fg_text, bg_text, opts.class_chunk,
                                            visual=visual)

    with torch.no_grad():
        M = grid[0] * grid[1]
        flat_cam = cam.reshape(B, cmax, M)
        boxes = torch.zeros(B, cmax, *grid, dtype=torch.bool, device=dev)
        if opts.refine:
            boxes[valid] = box_mask(cam[valid], opts.box_threshold, opts.box_quantize, opts.box_clip_last)
            attn = attn_last if attn_sum is None else attn_sum.add_(attn_last)
            aff = attn[:, 1:, 1:] / n_caa
            trans = sinkhorn_affinity(aff, opts.sinkhorn_rounds)
            src = (flat_cam * boxes.reshape(B, cmax, M)).transpose(1, 2)  # (B, M, Cmax)
            refined = (trans @ (trans @ src)).transpose(1, 2).reshape(B, cmax, *grid)
            refined = minmax_cam(refined)
        else:
            aff, refined = None, cam
        outs = []
        counts = valid.sum(1).tolist()
        for size in dict.fromkeys(out_sizes):  # usually one original size per batch
            sel = [b for b in range(B) if out_sizes[b] == size]
            up = _resize_maps(refined[sel], size)
            hi = _resize_maps(cam[sel], size) if intermediates else None
            for j, b in enumerate(sel):
                n = counts[b]
                outs.append((b, ClipESOutput(
                    keys=lab[b, :n], maps=up[j, :n], grid_cam=cam[b, :n], probs=probs[b, :n],
                    box_mask=boxes[b, :n] if intermediates else None,
                    affinity=aff[b] if (intermediates and aff is not None) else None,
                    highres=hi[j, :n] if hi is not None else None,
                    meta={"input_size": list(images.shape[-2:])})))
    return [o for _, o in sorted(outs, key=lambda t: t[0])]


def _empty(size: tuple[int, int], grid: tuple[int, int], dev) -> ClipESOutput:
    z = torch.zeros(0, *size, device=dev)
    return ClipESOutput(keys=torch.zeros(0, dtype=torch.long, device=dev), maps=z,
                        grid_cam=torch.zeros(0, *grid, device=dev), probs=torch.zeros(0, device=dev),
                        meta={"note": "no present class"})
