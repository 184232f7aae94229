"""POT's maps: the prototype / CAM combination of a view, and the code's IS_CAM / IS_CAM1 inference
as hooks of the one seed loop."""
from __future__ import annotations

import copy
import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...config import Config
from ...data.base import size_batches
from ...data.transforms import input_scales
from ...core.errors import TokensegError
from .model import code_fusion, code_stage, max_norm, paper_stage
from .. import BACKGROUND, MapRecipe
from ..base import SeedHooks, SeedJob
from ..mapops import (MapBatch, add_views, image_bytes, normalise_maps, rounding_of, save_map_batch, scaled_size,
                     upsample)
from .clip_seeds import ClipSeeds
from .config import CODE_KINDS, DEFAULT_KIND, PAPER_KINDS, POTConfig, _stage_options, clusters_of, numpy_init_of
from .train import classifier_cam


# ----------------------------------------------------------------------------------------- maps
def clip_on_grid(extras: dict | None, B: int, C: int, input_size, grid, code: bool, stride: int = 16
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch's CLIP-ES maps (pairs at image size) on the feature grid, dense (B, C, h, w), and in
    code mode their background (B, 1, h, w). Code mode as their inference: the maps to (H//stride,
    W//stride), background 1 − max there, [background, maps] to the grid (bilinear, align_corners=True);
    paper mode one antialiased bilinear step [I] and no background."""
    if not extras or "clip_maps" not in extras:
        return None, None
    pairs, maps = extras["clip_pairs"], extras["clip_maps"].float()
    if not code:
        out = maps.new_zeros(B, C, *grid)
        if len(pairs) == 0:
            return out, None
        m = F.interpolate(maps[:, None], grid, mode="bilinear", align_corners=False,
                          antialias=maps.shape[-1] > grid[-1])
        return out.index_put((pairs[:, 0], pairs[:, 1]), m[:, 0]), None
    coarse = (max(input_size[0] // stride, 1), max(input_size[1] // stride, 1))
    dense = maps.new_zeros(B, C, *coarse)
    if len(pairs):
        m = F.interpolate(maps[:, None], coarse, mode="bilinear", align_corners=True)
        dense = dense.index_put((pairs[:, 0], pairs[:, 1]), m[:, 0])
    both = torch.cat([1.0 - dense.amax(1, keepdim=True), dense], 1)
    both = F.interpolate(both, grid, mode="bilinear", align_corners=True)
    return both[:, 1:], both[:, :1]


def combine(model, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, cfg, kinds, extras=None) -> dict:
    """Maps of one scale: ``pot`` (M_pot + its background), ``cam`` (classifier CAM, background
    1 − max), ``is_cam`` (the code's fused map) and ``is_cam1`` (its prototype map), each with its
    ``@background``. With ``maps.flip`` and ``pot.flip_fusion=features`` the features and CAMs of an
    image and its mirror are summed first, as the code (the mirror views then return zeros)."""
    pc = cfg.pot
    if "is_cam_sum" in kinds:
        raise TokensegError("maps.kinds=is_cam_sum (IS_CAM + IS_CAM1) is made by POT's own map loop: set "
                            "maps.mode=authors")
    out = model(x)
    feats, cam = out["features"].float(), out["cam"].float()
    B2 = x.shape[0]
    flip = bool(cfg.maps.flip) and B2 % 2 == 0
    B = B2 // 2 if flip else B2
    fuse = flip and pc.flip_fusion == "features"
    lab = labels.float()
    if fuse:
        feats, cam, lab = feats[:B] + feats[B:].flip(-1), cam[:B] + cam[B:].flip(-1), lab[:B]
    n, C = feats.shape[0], lab.shape[1]
    grid = feats.shape[-2:]
    clip, clip_bg = clip_on_grid(extras, B, C, x.shape[-2:], grid, pc.mode == "code",
                                 getattr(model, "output_stride", 16))
    if clip is not None and n == B2 and flip:
        clip = torch.cat([clip, clip.flip(-1)])
        clip_bg = None if clip_bg is None else torch.cat([clip_bg, clip_bg.flip(-1)])
    valid = feats.new_ones(n, *grid)
    gen = torch.Generator(device=feats.device).manual_seed(int(pc.seed))
    res = {}
    with torch.autocast(feats.device.type, enabled=False):
        if "pot" in kinds:
            base = clip * lab[:, :, None, None] if clip is not None else max_norm(F.relu(cam)) * lab[:, :, None, None]
            st = paper_stage(feats, base, lab, valid, _stage_options(pc), gen)
            res["pot"], res["pot" + BACKGROUND] = st.cam, st.background
        if "cam" in kinds:
            mc = classifier_cam(cam, lab)
            res["cam"], res["cam" + BACKGROUND] = mc[:, 1:], mc[:, :1]
        if "is_cam" in kinds or "is_cam1" in kinds:
            if clip is None:
                raise TokensegError("maps.kinds is_cam / is_cam1 fuse the CLIP-ES seeds (pot.clip_seeds): the "
                                    "model was trained without them; use maps.kinds=[pot]")
            seed = int(pc.seed) if numpy_init_of(pc) else None
            maps, _ = code_stage(feats, cam, lab, valid, pc.kmeans_iters, gen, clusters_of(pc), training=False,
                                 numpy_seed=seed, per_image=True)
            cc, fused = code_fusion(maps, clip * lab[:, :, None, None], None, training=False, clip_bg=clip_bg)
            res["is_cam1"], res["is_cam1" + BACKGROUND] = cc[:, 1:], cc[:, :1]
            res["is_cam"], res["is_cam" + BACKGROUND] = fused[:, 1:], fused[:, :1]
    result = {}
    for k in kinds:
        for key in (k, k + BACKGROUND):
            m = res[key] if key.endswith(BACKGROUND) else res[key][:, classes]
            result[key] = torch.cat([m, torch.zeros_like(m)]) if fuse else m
    return result


def code_hooks(combine_fn=None) -> SeedHooks:
    """POT's inference (``maps.mode=authors``, set by code mode) as hooks of the one seed loop:
    :func:`_scale_maps` for one scale at a time, fed with each batch's CLIP-ES seeds, then the code's
    combination.

    ``is_cam`` = its fused map at the *first* of ``maps.scales`` (their ``IS_CAM_list[0]``); ``is_cam1``
    = its prototype map summed over all scales, max-normalised, then foreground × 2 and background
    + 0.4; ``is_cam_sum`` = is_cam + is_cam1 (the seeds their eval_cam.py scores, §16.21); ``pot`` /
    ``cam`` over all scales. The options are the model's ``pot`` section (from its checkpoint; a
    ``{split}`` in ``pot.clip_seeds`` is the split mapped). ``export_npy``: also their ``npy/<id>.npy``
    dict (keys with background 0, IS_CAM, IS_CAM1) for ``is_cam_sum``. ``combine_fn`` replaces
    :func:`combine` (tests)."""

    def prepare(job: SeedJob) -> dict:
        pc = getattr(job.model, "pot_cfg", None) or POTConfig()
        cfg = Config(maps=job.cfg.maps)
        cfg.sections["pot"] = pc
        code_pair = {"is_cam", "is_cam1"} if ("is_cam_sum" in job.kinds or job.export_npy) else set()
        return {"cfg": cfg, "clip": ClipSeeds(pc, job.ds, job.meta.get("split", "")) if pc.clip_seeds else None,
                "base": sorted(code_pair | {k for k in job.kinds if k != "is_cam_sum"})}

    def batches(job: SeedJob, todo: list[int]) -> list[list[int]]:
        mc, ds, patch = job.cfg.maps, job.ds, job.model.patch_size
        return size_batches(ds, todo, mc.batch_size, int(mc.memory_mb * 2 ** 20),
                            lambda i, size: image_bytes(size, len(ds.labels[i]), mc, patch, 0))

    def compute(job: SeedJob, batch) -> tuple:
        raw, labels, idx = batch
        st, mc, kinds = job.state, job.cfg.maps, job.kinds
        labels = labels.to(job.device)
        H, W = raw.shape[-2:]
        ex = st["clip"].batch(idx.tolist(), (H, W), job.device) if st["clip"] is not None else None
        comb = partial(combine_fn or combine, extras=ex)
        acc, bgs, pairs = {}, {}, None
        for j, s in enumerate(input_scales(mc, (H, W))):
            need = [k for k in st["base"] if k != "is_cam" or j == 0]
            mb = _scale_maps(job.model, raw, labels, s, st["cfg"], need, comb)
            pairs = mb.pairs
            for k in need:
                acc[k] = acc[k] + mb.maps[k] if k in acc else mb.maps[k]
                bgs[k] = bgs[k] + mb.background[k] if k in bgs else mb.background[k]
        maps = {k: normalise_maps(v, "max") for k, v in acc.items()}
        bg = {k: normalise_maps(v, "max") for k, v in bgs.items()}
        if "is_cam1" in maps:  # their IS_CAM1 + pad(IS_CAM1[1:], 0.4): foreground doubled, background + 0.4
            maps["is_cam1"], bg["is_cam1"] = 2.0 * maps["is_cam1"], bg["is_cam1"] + 0.4
        if "is_cam_sum" in kinds or job.export_npy:
            maps["is_cam_sum"] = maps["is_cam"] + maps["is_cam1"]
            bg["is_cam_sum"] = bg["is_cam"] + bg["is_cam1"]
        return raw, pairs, maps, bg

    def write(job: SeedJob, result: tuple, idx: list[int]) -> None:
        raw, pairs, maps, bg = result
        if job.export_npy:
            _export_npy(job.out_dir / "npy", pairs, maps, bg, idx, job.ds)
        keep = MapBatch(pairs, {k: maps[k] for k in job.kinds}, {k: bg[k] for k in job.kinds})
        save_map_batch(keep, raw, idx, job.ds, job.out_dir, job.cfg.maps)

    return SeedHooks(compute=compute, write=write, prepare=prepare, batches=batches)


def _scale_maps(model, raw: torch.Tensor, labels: torch.Tensor, s: float, cfg, kinds, comb):
    """One scale of a batch of same-size uint8 images (B, 3, H, W), as their make_cam: each image
    resized with PIL bicubic to round(H·s) × round(W·s) (their ``pil_rescale``), normalised in float64
    (their ``TorchvisionNormalize``), with its mirror when ``maps.flip``; the maps of ``comb`` (a
    :func:`combine`) bilinearly upsampled from the grid straight to (H, W), the mirror's flipped back and
    added. Returns a :class:`~tokenseg.methods.mapops.MapBatch` (not normalised)."""
    from PIL import Image

    mc = cfg.maps
    B, _, H, W = raw.shape
    hs, ws = scaled_size(H, W, s, model.patch_size, rounding_of(mc, RECIPE))
    if (hs, ws) != (H, W):
        raw = torch.stack([torch.from_numpy(np.array(Image.fromarray(r.permute(1, 2, 0).cpu().numpy())
                                                        .resize((ws, hs), Image.BICUBIC))).permute(2, 0, 1)
                           for r in raw])
    dev = labels.device
    mean = torch.tensor(RECIPE.mean, dtype=torch.float64, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(RECIPE.std, dtype=torch.float64, device=dev).view(1, 3, 1, 1)
    x = ((raw.to(dev, torch.float64) / 255.0 - mean) / std).float()
    pairs = torch.nonzero(labels > 0)
    classes = torch.unique(pairs[:, 1])
    local = torch.full((labels.shape[1],), -1, dtype=torch.long, device=dev)
    local[classes] = torch.arange(len(classes), device=dev)
    b_idx, k_idx = pairs[:, 0], local[pairs[:, 1]]
    lab = labels
    if mc.flip:
        x, lab = torch.cat([x, x.flip(-1)]), labels.repeat(2, 1)
    one = copy.copy(cfg)
    one.maps = dataclasses.replace(mc, scales=[1.0], max_side=0)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mc.dtype == "bf16"), torch.no_grad():
        out = comb(model, x, lab, classes, one, kinds)
    views = (b_idx, b_idx + B) if mc.flip else (b_idx,)
    maps, bg = {}, {}
    for k in kinds:
        m = out[k].float()
        maps[k] = add_views(upsample(torch.cat([m[v, k_idx] for v in views]), (H, W)), len(pairs), mc.flip)
        bg[k] = add_views(upsample(out[k + BACKGROUND].float()[:, 0], (H, W)), B, mc.flip)
    return MapBatch(pairs, maps, bg)


def _export_npy(folder: Path, pairs, maps, bg, idx, ds) -> None:
    """Their make_cam.py file: {"keys": [0, classes + 1], "IS_CAM": (1+n, H, W), "IS_CAM1": ...} float32."""
    import io as _io

    from ...core.files import safe_output_path, write_bytes_atomic

    pairs = pairs.cpu().numpy()
    for b, i in enumerate(idx):
        rows = np.flatnonzero(pairs[:, 0] == b)
        keys = np.concatenate([[0], pairs[rows, 1] + 1]).astype(np.int64)
        d = {"keys": keys}
        for k, name in (("is_cam", "IS_CAM"), ("is_cam1", "IS_CAM1")):
            d[name] = np.concatenate([bg[k][b:b + 1].cpu().numpy(), maps[k][rows].cpu().numpy()]).astype(np.float32)
        buf = _io.BytesIO()
        np.save(buf, d, allow_pickle=True)
        write_bytes_atomic(safe_output_path(folder, f"{ds.ids[i]}.npy"), buf.getvalue())


RECIPE = MapRecipe(kinds=PAPER_KINDS + CODE_KINDS, default_kinds=(DEFAULT_KIND,), combine=combine, normalise="max",
                   background="channel", size_rounding="none", authors=code_hooks())
