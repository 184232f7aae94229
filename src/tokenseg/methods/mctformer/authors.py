"""The authors' seed inference, reproduced exactly (``maps.mode=authors``, what ``auto`` runs for
MCTformer-V1/V2/+; METHODS.md §2–§6).

Per image (batch 1, as in their ``generate_attention_maps_ms``), for every scale ``s``:

1. the uint8 image is resized with PIL bicubic to ``round(W·s) × round(H·s)``, normalised with the
   ImageNet mean/std; it and its horizontal flip each go through the model alone (batch 1);
2. the input is floored to a multiple of the patch (``w - w % 16``: the patch convolution drops the
   rest); the patch position embedding is interpolated bicubically to the patch grid — V1/V2 with the
   DINO ``+0.1`` offset (``scale_factor = (g' + 0.1) / g``; no interpolation when the grid is the
   training grid and the input is square), MCTformer+ to the exact size;
3. explicit attention in every layer; per layer the head mean ``Ā^l``; class-to-patch attention is
   ``Σ`` (V1/V2, ``maps.layer_reduce=sum``) or mean (MCTformer+) over the last K layers, the patch
   affinity ``Σ_{l=1..L} Ā^l[C:, C:]`` over **all** layers;
4. fused map ``A_mct ⊙ ReLU(PatchCAM)`` (V2) or its sqrt (MCTformer+); refinement
   ``A_ref[c, i] = Σ_j aff[i, j] A[c, j]``;
5. bilinear upsampling (align_corners=False) to the original H×W, multiplication by the label vector,
   un-flipping;

then the sum over scales and flips and a per-class min–max ``(m - min)/(max - min + 1e-8)`` for the
classes present. The attention of the L layers is reduced on the fly instead of being stacked
(L×B×H×N×N); the result is the same up to float summation order (≤1e-6).

Differences from our default (:mod:`tokenseg.maps`): the default resizes the *normalised* tensor with
torch bicubic + antialias to the nearest multiple of the patch (no pixel dropped), interpolates the
position embedding without the +0.1 offset, batches images of equal size, computes only the attention
rows it needs with fused attention elsewhere, and can run in bf16. Seeds are written as our ``.npz``
(``maps.save_dtype``, float32 by default) or, with ``export_npy``, in the authors' ``.npy`` dict format
(float32) so their evaluation scripts read them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from ...core.progress import progress_bar as tqdm

from ...config import MapsConfig
from ...data import WSSSDataset
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_scales
from ...core.files import atomic_write, write_json_atomic
from ...core.seeds import SeedMaps, load_seed, npy_seed_path, save_seed, seed_path
from ...core.errors import TokensegError
from ...models import ClassTokenViT, MapOutputs, explicit_attention
from ...core.viz import overlay, save_png
from ..base import SeedHooks, SeedJob

AFFINITY_KINDS = ("attention_affinity", "fused_affinity")


# ------------------------------------------------------------------------------------ model pieces
def uses_dino_offset(method: str | None, cfg: MapsConfig, model: torch.nn.Module | None = None) -> bool:
    """V1/V2 interpolate position embeddings with DINO's +0.1 offset, MCTformer+ does not. Without a
    method name, the layer reduction tells: V1/V2 sum over layers, MCTformer+ averages."""
    if method:
        return method in ("mctformer-v1", "mctformer-v2")
    return cfg.layer_reduce == "sum"


def authors_patch_pos(pos: torch.Tensor, grid: tuple[int, int], dino_offset: bool, square_input: bool
                      ) -> torch.Tensor:
    """(1, D, g0h, g0w) patch position embedding -> (1, gh·gw, D) as the authors interpolate it."""
    g0 = tuple(pos.shape[-2:])
    gh, gw = grid
    if dino_offset:
        if (gh, gw) == g0 and square_input:
            out = pos
        else:
            out = F.interpolate(pos, scale_factor=((gh + 0.1) / g0[0], (gw + 0.1) / g0[1]), mode="bicubic",
                                align_corners=False)
            if tuple(out.shape[-2:]) != (gh, gw):  # float rounding of the scale factor
                raise TokensegError(f"position embedding interpolation gave {tuple(out.shape[-2:])}, not {grid}")
    else:
        out = pos if (gh, gw) == g0 else F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    return out.flatten(2).transpose(1, 2)


@torch.no_grad()
def authors_forward(model: ClassTokenViT, x: torch.Tensor, last_k: int, layer_reduce: str, dino_offset: bool,
                    affinity: bool = True) -> MapOutputs:
    """Their map forward: explicit attention in every layer, head mean per layer, class-to-patch over
    the last ``last_k`` layers (``sum`` or ``mean``), patch affinity summed over all layers."""
    p = model.patch_size
    B, _, H, W = x.shape
    x = x[..., : H - H % p, : W - W % p]
    feat = model.patch_embed.proj(x)
    gh, gw = feat.shape[-2:]
    tokens = model.patch_embed.norm(feat.flatten(2).transpose(1, 2))
    tokens = tokens + authors_patch_pos(model.pos_embed_pat, (gh, gw), dino_offset, H == W)
    C = model.num_classes
    cls = (model.cls_tokens + model.pos_embed_cls).expand(B, -1, -1)
    tokens = torch.cat([cls, tokens], dim=1)
    if hasattr(model, "norm_pre"):  # an identity for DeiT (theirs has none)
        tokens = model.norm_pre(tokens)
    L = len(model.blocks)
    last_k = min(max(int(last_k), 1), L)
    c2p = p2p = None
    for li, blk in enumerate(model.blocks):
        attn = blk.attn
        h = blk.norm1(tokens)
        N, D = h.shape[1], h.shape[2]
        nh = attn.num_heads
        qkv = attn.qkv(h).reshape(B, N, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        # softmax(q kᵀ · scale) v and the head mean Ā^l, blocked on the CPU; scaling q instead of the
        # product is exact for power-of-two scales (1/8 for DeiT's 64-dim heads)
        out, a = explicit_attention(q * attn.scale, k, v)
        out = attn.proj(attn.norm(out) if hasattr(attn, "norm") else out)
        tokens = tokens + blk.ls1(out)
        tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
        if li >= L - last_k:
            c2p = a[:, :C, C:] if c2p is None else c2p + a[:, :C, C:]
        if affinity:
            p2p = a[:, C:, C:] if p2p is None else p2p + a[:, C:, C:]
    if layer_reduce == "mean":
        c2p = c2p / last_k
    tokens = model.output_norm(tokens)
    fmap = model.patch_logits_map(tokens, (gh, gw))
    return MapOutputs(attention=c2p.reshape(B, C, gh, gw), patchcam=None if fmap is None else F.relu(fmap),
                      affinity=p2p, cls_logits=tokens[:, :C].mean(-1), grid=(gh, gw))


def pil_to_input(img: Image.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 PIL image -> (1, 3, H, W) ImageNet-normalised float32 (ToTensor + Normalize)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).to(device)
    x = arr.permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def scaled_pil(img: Image.Image, s: float) -> Image.Image:
    """PIL bicubic resize to round(W·s) × round(H·s) (PIL returns a copy at the same size)."""
    W, H = img.size
    return img.resize((int(round(W * s)), int(round(H * s))), Image.BICUBIC)


# ------------------------------------------------------------------------------------ one image
@torch.no_grad()
def compute_maps_authors(model: ClassTokenViT, image: Image.Image, labels, cfg: MapsConfig,
                         kinds: list[str] | None = None, dino_offset: bool | None = None, method: str | None = None,
                         device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Seeds for one RGB image with multi-hot ``labels`` (C,), as the authors compute them.

    Returns ``{kind: (len(present), H, W) float32}`` for the present classes (sorted), min–max normalised."""
    kinds = list(kinds or cfg.kinds)
    if dino_offset is None:
        dino_offset = uses_dino_offset(method, cfg, model)
    if model.head is None and any(k.startswith(("patchcam", "fused")) for k in kinds):
        raise TokensegError(f"maps.kinds {kinds}: this model has no PatchCAM head (MCTformer-V1)")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32, device=device).flatten()
    W, H = image.size
    present = torch.nonzero(labels > 0).flatten()
    if len(present) == 0:  # nothing to localise: no forward pass (theirs writes all-zero maps of no class)
        return {kind: np.zeros((0, H, W), np.float32) for kind in kinds}
    need_aff = any(k in AFFINITY_KINDS for k in kinds)
    weight = labels[present].view(1, -1, 1, 1)  # theirs multiplies every class by the label vector: the
    # absent ones are 0 before the per-class normalisation drops them, so only the present are computed
    acc: dict[str, torch.Tensor] = {k: torch.zeros(len(present), H, W, device=device) for k in kinds}
    for s in input_scales(cfg, (H, W)):  # maps.scales as given unless the largest view passes maps.max_side
        x = pil_to_input(scaled_pil(image, s), device)
        # the view and its mirror image in one batch (theirs: one each): the same maps to float rounding
        # (the fixtures to 1e-5), and the GEMMs of two views run ~15 % faster than two of one
        views = torch.cat([x, x.flip(-1)]) if cfg.flip else x
        out = authors_forward(model, views, cfg.layers, cfg.layer_reduce, dino_offset, affinity=need_aff)
        base = {"attention": out.attention}
        if out.patchcam is not None:
            base["patchcam"] = out.patchcam
            fused = out.attention * out.patchcam
            base["fused"] = torch.sqrt(fused) if cfg.fusion == "sqrt" else fused
        for kind in kinds:
            m = base[kind.removesuffix("_affinity")][:, present]
            if kind in AFFINITY_KINDS:
                m = torch.matmul(out.affinity.unsqueeze(1), m.flatten(2).unsqueeze(-1)).reshape(m.shape)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False) * weight
            acc[kind] += m[0] + m[1].flip(-1) if cfg.flip else m[0]
    result = {}
    for kind, m in acc.items():  # per-class min-max over the summed views
        lo = m.amin(dim=(1, 2), keepdim=True)
        hi = m.amax(dim=(1, 2), keepdim=True)
        result[kind] = ((m - lo) / (hi - lo + 1e-8)).cpu().numpy().astype(np.float32, copy=False)
    return result


# ------------------------------------------------------------------------------------ seed files
def save_seed_npy(path: str | Path, classes, maps: np.ndarray) -> None:
    """The authors' seed format: ``np.save`` of ``{class_index: H×W float32}`` (a pickled dict)."""
    d = {int(c): np.asarray(m, dtype=np.float32) for c, m in zip(classes, maps)}
    with atomic_write(path, "wb") as f:
        np.save(f, d, allow_pickle=True)


def export_seeds_npy(src: str | Path, dst: str | Path, progress: bool = False) -> int:
    """Rewrite a folder of our ``.npz`` seeds (sub-folders per kind are followed) as ``.npy`` dicts."""
    src, dst = Path(src), Path(dst)
    files = sorted(src.rglob("*.npz"))
    if not files:
        raise TokensegError(f"{src}: no .npz seed files")
    for f in tqdm(files, desc="export npy", unit="img", disable=not progress):
        seed = load_seed(f)
        out = dst / f.relative_to(src).with_suffix(".npy")
        save_seed_npy(out, seed.classes, seed.maps.astype(np.float32))
    return len(files)


def import_seeds_npy(src: str | Path, dst: str | Path, allow_pickle: bool = False, progress: bool = False) -> int:
    """The reverse: a folder of the authors' ``.npy`` seeds -> our ``.npz``."""
    src, dst = Path(src), Path(dst)
    files = sorted(src.rglob("*.npy"))
    if not files:
        raise TokensegError(f"{src}: no .npy seed files")
    for f in tqdm(files, desc="import npy", unit="img", disable=not progress):
        seed = load_seed(f, allow_pickle=allow_pickle)
        save_seed(dst / f.relative_to(src).with_suffix(".npz"),
                  SeedMaps(seed.classes, seed.maps, {"image_id": f.stem, "source": "authors-npy"}))
    return len(files)


def _first(items: list):
    return items[0]


class _PILSet(Dataset):
    def __init__(self, ds: WSSSDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds.load_image(i), self.ds.multi_hot(i), i


def _prepare(job: SeedJob) -> bool:
    """Whether positions interpolate with DINO's offset (V1/V2), recorded beside the seeds."""
    mc = job.cfg.maps
    dino = uses_dino_offset(job.method, mc)
    if job.rank == 0:  # added to what run_maps recorded (the settings a resumed run must share)
        path = job.out_dir / "maps_meta.json"
        info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        info.update({"maps": dict(vars(mc)), **job.meta, "mode": "authors", "dino_pos_offset": dino,
                     "format": "npy" if job.export_npy else "npz"})
        write_json_atomic(path, info)
    return dino


def _compute(job: SeedJob, item) -> tuple:
    image, labels, i = item
    maps = compute_maps_authors(job.model, image, labels, job.cfg.maps, job.kinds, dino_offset=job.state,
                                device=job.device)
    return maps, np.flatnonzero(np.asarray(labels) > 0).astype(np.int64), image


def _write(job: SeedJob, result: tuple, idx: list[int]) -> None:
    maps, classes, image = result
    mc, image_id = job.cfg.maps, job.ds.ids[idx[0]]
    for kind, m in maps.items():
        if mc.overlays:  # written first: a seed file's existence means its image is done
            top = m.max(0) if len(classes) else np.zeros(m.shape[1:], np.float32)
            save_png(job.out_dir / f"{kind}_overlays" / f"{image_id}.png", overlay(np.asarray(image), top))
        if job.export_npy:
            save_seed_npy(npy_seed_path(job.out_dir / kind, image_id), classes, m)
        else:
            save_seed(seed_path(job.out_dir / kind, image_id),
                      SeedMaps(classes, m, {"kind": kind, "image_id": image_id, "mode": "authors"}), mc.save_dtype)


# maps.mode=authors (MCTformer's default): their generate_attention_maps_ms inside the one seed loop — fp32,
# one image at a time (its view and mirror image batched), floored to the patch; maps.batch_size does not
# apply and tokenseg.maps.resolve_mode refuses bf16 and other roundings; maps.max_side shrinks the scales of a
# larger photo only. ``export_npy`` writes their .npy dicts (float32) instead of .npz. The job's method picks
# the position-embedding interpolation (V1/V2: +0.1 offset).
AUTHORS_HOOKS = SeedHooks(compute=_compute, write=_write, prepare=_prepare,
                          batches=lambda job, todo: [[i] for i in todo], dataset=lambda job: _PILSet(job.ds),
                          collate=_first, npy=True, desc="maps (authors)")


__all__ = ["authors_forward", "authors_patch_pos", "compute_maps_authors", "AUTHORS_HOOKS",
           "export_seeds_npy", "import_seeds_npy", "save_seed_npy", "uses_dino_offset", "scaled_pil", "pil_to_input"]
