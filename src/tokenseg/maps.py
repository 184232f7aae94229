"""Seed generation: the MCTformer inference pipeline (METHODS.md §6), batched on the device.

For every scale (and its horizontal flip) one forward pass gives class-to-patch attention (last K
layers), the PatchCAM, and the patch affinity (head-mean p2p attention summed over all layers). The
map kinds are

* ``attention``           class-to-patch attention (MCTformer-V1 seeds),
* ``attention_affinity``  attention refined by the patch affinity,
* ``patchcam``            ReLU of the 3×3 conv head on patch tokens,
* ``fused``               attention ⊙ PatchCAM (V2) or sqrt of it (MCTformer+),
* ``fused_affinity``      fused refined by the patch affinity (the paper's seeds).

Each is upsampled bilinearly to the image size, masked by the image labels, un-flipped, summed over
scales and flips, and min–max normalised per present class. Images of equal size are batched together;
only the classes present in a batch are upsampled.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import Config, MapsConfig
from .data import WSSSDataset, build_dataset
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .io import SeedMaps, TokensegError, save_seed, seed_path, write_json_atomic
from .models import ClassTokenViT
from .viz import overlay, save_png

AFFINITY_KINDS = ("attention_affinity", "fused_affinity")


def minmax_per_class(maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(m - min)/(max - min + 1e-8) per image and class over H×W; absent classes set to 0."""
    flat = maps.flatten(2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    out = (flat - lo) / (hi - lo + 1e-8)
    return out.view_as(maps) * present[..., None, None]


def scaled_size(h: int, w: int, s: float, patch: int, rounding: str) -> tuple[int, int]:
    """Input size at scale ``s``. ``round``: nearest multiple of the patch (no pixel dropped);
    ``floor``: round(h·s) as the authors, leaving the patch convolution to drop the remainder."""
    if rounding == "floor":
        return max(int(round(h * s)), patch), max(int(round(w * s)), patch)
    return max(int(round(h * s / patch)) * patch, patch), max(int(round(w * s / patch)) * patch, patch)


@torch.no_grad()
def compute_maps(model: ClassTokenViT, images: torch.Tensor, labels: torch.Tensor, cfg: MapsConfig,
                 kinds: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Seeds for a batch of same-size normalised images (B,3,H,W) with multi-hot ``labels`` (B,C).

    Returns ``{kind: (B, C, H, W)}`` min–max normalised per present class (absent classes are 0)."""
    kinds = list(kinds or cfg.kinds)
    B, _, H, W = images.shape
    present = labels.float()
    cls_idx = torch.nonzero(present.any(0)).flatten()  # classes present anywhere in this batch
    mask = present[:, cls_idx]
    need_aff = any(k in AFFINITY_KINDS for k in kinds)
    acc = {k: torch.zeros(B, len(cls_idx), H, W, device=images.device) for k in kinds}
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    for s in cfg.scales:
        hs, ws = scaled_size(H, W, s, model.patch_size, cfg.size_rounding)
        x = images if (hs, ws) == (H, W) else F.interpolate(
            images, size=(hs, ws), mode="bicubic", align_corners=False, antialias=True)
        if cfg.flip:
            x = torch.cat([x, x.flip(-1)])
        with autocast:
            out = model.forward_maps(x, last_k=cfg.layers, affinity=need_aff, layer_reduce=cfg.layer_reduce)
        grid = out.grid
        att = out.attention[:, cls_idx].float()
        base = {"attention": att}
        if out.patchcam is not None:
            pc = out.patchcam[:, cls_idx].float()
            base["patchcam"] = pc
            fused = att * pc
            base["fused"] = fused.sqrt() if cfg.fusion == "sqrt" else fused
        for kind in kinds:
            src = kind.removesuffix("_affinity")
            m = base[src]
            if kind in AFFINITY_KINDS:
                # A_ref[c, i] = Σ_j aff[i, j] A[c, j]
                m = (m.flatten(2) @ out.affinity.float().transpose(1, 2)).view(m.shape[0], -1, *grid)
            m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
            mflip = mask.repeat(2, 1) if cfg.flip else mask
            m = m * mflip[..., None, None]
            if cfg.flip:
                m = m[:B] + m[B:].flip(-1)
            acc[kind] += m
    result = {}
    for kind, m in acc.items():
        full = torch.zeros(B, labels.shape[1], H, W, device=images.device)
        full[:, cls_idx] = minmax_per_class(m, mask)
        result[kind] = full
    return result


# ------------------------------------------------------------------------------ data feeding
class _ImageSet(Dataset):
    def __init__(self, ds: WSSSDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        arr = np.asarray(self.ds.load_image(i), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.from_numpy(self.ds.multi_hot(i)), i


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF rotation, read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def size_batches(ds: WSSSDataset, indices: list[int], batch_size: int) -> list[list[int]]:
    """Group images of equal size into batches (VOC has few distinct sizes)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in indices:
        groups[image_size(ds.image_paths[i])].append(i)
    batches = []
    for _, idx in sorted(groups.items()):
        batches.extend(idx[j:j + batch_size] for j in range(0, len(idx), batch_size))
    return batches


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images_uint8.device).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def generate_seeds(model: ClassTokenViT, ds: WSSSDataset, out_dir: str | Path, cfg: MapsConfig,
                   device: torch.device | str = "cpu", rank: int = 0, world: int = 1, num_workers: int = 0,
                   progress: bool = True, meta: dict | None = None) -> Path:
    """Write ``out_dir/<kind>/<image_id>.npz`` for every image of ``ds`` (this rank's share when
    sharded); images whose files all exist are skipped, so an interrupted run resumes."""
    out_dir = Path(out_dir)
    device = torch.device(device)
    model = model.to(device).eval()
    kinds = list(cfg.kinds)
    todo = [i for i in range(rank, len(ds), world)
            if not all(seed_path(out_dir / k, ds.ids[i]).is_file() for k in kinds)]
    info = {"maps": {k: v for k, v in vars(cfg).items()}, **(meta or {})}
    if rank == 0:
        write_json_atomic(out_dir / "maps_meta.json", info)
    batches = size_batches(ds, todo, cfg.batch_size)
    loader = DataLoader(_ImageSet(ds), batch_sampler=batches, num_workers=num_workers)
    bar = tqdm(total=len(todo), desc="maps", unit="img", disable=not progress)
    for raw, labels, idx in loader:
        images = normalise(raw.to(device))
        maps = compute_maps(model, images, labels.to(device), cfg, kinds)
        for kind, m in maps.items():
            m = m.cpu().numpy()
            for b, i in enumerate(idx.tolist()):
                classes = np.asarray(ds.labels[i], dtype=np.int64)
                if cfg.overlays:  # written first: a seed file's existence means its image is done
                    rgb = raw[b].permute(1, 2, 0).numpy()
                    top = m[b, classes].max(0) if len(classes) else np.zeros(rgb.shape[:2], np.float32)
                    save_png(out_dir / f"{kind}_overlays" / f"{ds.ids[i]}.png", overlay(rgb, top))
                save_seed(seed_path(out_dir / kind, ds.ids[i]),
                          SeedMaps(classes, m[b, classes], {"kind": kind, "image_id": ds.ids[i]}), cfg.save_dtype)
        bar.update(len(idx))
    bar.close()
    return out_dir


def check_kinds(model: ClassTokenViT, method: str, kinds: list[str], source: str | Path) -> None:
    """A checkpoint without a PatchCAM head (MCTformer-V1) makes only the attention kinds."""
    if model.head is None:
        bad = [k for k in kinds if not k.startswith("attention")]
        if bad:
            raise TokensegError(
                f"{source}: a {method} checkpoint (no PatchCAM head) makes only the map kinds attention, "
                f"attention_affinity; maps.kinds asks for {', '.join(bad)} (set maps.kinds=[attention_affinity])")


def run_maps(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
             out_dir: str | Path | None = None, progress: bool = True, export_npy: bool = False) -> Path:
    """Python API of ``tokenseg maps``: load a checkpoint (ours or the authors'), generate seeds for a
    split with ``maps.mode`` (tokenseg: this module; authors: :mod:`tokenseg.maps_authors`).
    ``export_npy`` (authors mode) writes the authors' ``.npy`` dicts instead of ``.npz``."""
    from .engine import init_distributed, load_model_from_checkpoint, resolve_device

    ckpt = Path(checkpoint) if checkpoint else Path(cfg.output_dir) / "checkpoint.pt"
    model, ckpt_cfg, names = load_model_from_checkpoint(ckpt, num_heads=cfg.model.backbone_kwargs.get("num_heads"))
    if export_npy and cfg.maps.mode != "authors":
        raise TokensegError("--export-npy needs maps.mode=authors (the .npy dicts are the authors' format)")
    check_kinds(model, ckpt_cfg.model.method, cfg.maps.kinds, ckpt)
    split = split or cfg.maps.split
    ds = build_dataset(cfg.data, split)
    if getattr(model, "class_names_source", "") == "default" and len(names) == ds.num_classes:
        names = list(ds.class_names)  # the authors' files hold no names: take the dataset's
    if len(names) != ds.num_classes:
        raise TokensegError(f"{ckpt}: has {len(names)} class tokens, but the dataset has {ds.num_classes} "
                            f"classes ({', '.join(ds.class_names[:6])}{', ...' if ds.num_classes > 6 else ''})")
    if list(ds.class_names) != names:
        raise TokensegError(f"{ckpt}: trained on classes {names}, dataset has {ds.class_names}")
    dinfo = init_distributed(resolve_device(cfg.train.device).type)
    device = resolve_device(cfg.train.device, dinfo.local_rank)
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "seeds" / split
    meta = {"checkpoint": str(ckpt), "method": ckpt_cfg.model.method, "split": split,
            "world_size": dinfo.world, "env_rank": int(os.environ.get("RANK", 0))}
    common = dict(device=device, rank=dinfo.rank, world=dinfo.world, num_workers=cfg.data.num_workers,
                  progress=progress and dinfo.is_main, meta=meta)
    if cfg.maps.mode == "authors":
        from .maps_authors import generate_seeds_authors

        generate_seeds_authors(model, ds, out, cfg.maps, **common, method=ckpt_cfg.model.method,
                               export_npy=export_npy)
    else:
        generate_seeds(model, ds, out, cfg.maps, **common)
    if dinfo.world > 1:
        torch.distributed.barrier()
    return out

