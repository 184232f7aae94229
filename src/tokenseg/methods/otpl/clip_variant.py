"""OTPL's CLIP-ES variant, ``otpl-clip-es`` (the ICCV 2025 supplement): a plain ViT encoder (CLIP's image
tower when given its weights) whose C + 1 prototypes are masked averages of its features under the CLIP-ES
pseudo label (precomputed seed files, ``otpl.clip_seeds``, co-augmented with the image); the OT, proxies
and losses of :mod:`.method`; maps: ``proxy``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ...core.errors import TokensegError
from ...core.seeds import load_seed, seed_path
from ...data.transforms import CLIP_MEAN, CLIP_STD
from .. import MapRecipe, Method, register
from .method import CLIP_KINDS, OTPLConfig, _check_common, forward, otpl_terms, warn_ignored_settings

# the otpl.* keys the CLIP-ES variant's map step reads from its own config (the seeds of the mapped split)
CLIP_MAP_TIME_KEYS = ("clip_seeds", "clip_bg_power")


def build_clip(cfg, num_classes: int):
    from .model import OTPLEncoderModel, PatchEncoder

    encoder = PatchEncoder(cfg.model, cfg.otpl.encoder_trainable_blocks)
    return OTPLEncoderModel(encoder, num_classes, copy.deepcopy(cfg.otpl))


def clip_loss(out: dict, batch: dict, ctx, cfg) -> dict[str, torch.Tensor]:
    return otpl_terms(out, batch["labels"], cfg.otpl, ctx.epoch if ctx is not None else 0)


def clip_class_scores(model, x: torch.Tensor) -> torch.Tensor:
    return model(x)["cls_logits"]


def clip_param_groups(model, cfg) -> list[dict]:
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.encoder.named_parameters(prefix="encoder"):
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.train.weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": [p for p in model.proxy.parameters() if p.requires_grad],
             "weight_decay": cfg.otpl.proxy_weight_decay, "lr_mult": 1.0}]


class SeedCropView:
    """One random resized crop + flip applied to the image and to its CLIP-ES score maps alike (the
    SIPE/AMN-style "flip, scale, crop" of the supplement); the scores come out dense, (C + 1, s, s) with
    s = img_size / seed_stride, background first. Geometric RandAugment could not be co-applied, so
    ``train.augment`` must be ``simple``; ``train.color_jitter`` touches the image only."""

    def __init__(self, img_size: int, crop_scale, seed_stride: int, color_jitter: float = 0.0,
                 mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.size, self.scale, self.stride = int(img_size), tuple(crop_scale), int(seed_stride)
        self.jitter, self.mean, self.std = color_jitter, mean, std

    def __call__(self, image, extras: dict):
        import torch.nn.functional as F
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        maps = torch.from_numpy(np.concatenate([extras["clip_bg"][None], extras["clip_maps"]]).astype(np.float32))
        W, H = image.size
        if tuple(maps.shape[-2:]) != (H, W):
            maps = F.interpolate(maps[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        i, j, h, w = T.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        flip = bool(torch.rand(()) < 0.5)
        img = TF.resized_crop(image, i, j, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
        s = max(self.size // self.stride, 1)
        crop = F.interpolate(maps[None, :, i:i + h, j:j + w], size=(s, s), mode="bilinear", align_corners=False,
                             antialias=True)[0]
        if flip:
            img, crop = TF.hflip(img), crop.flip(-1)
        if self.jitter > 0:
            img = T.ColorJitter(self.jitter, self.jitter, self.jitter)(img)
        C = int(extras["clip_num_classes"])
        dense = torch.zeros(C + 1, s, s)
        dense[0] = crop[0]
        dense[torch.from_numpy(extras["clip_classes"].astype(np.int64)) + 1] = crop[1:]
        x = TF.normalize(TF.to_tensor(img), self.mean, self.std)
        return x, {"clip_cam": dense}


class ClipSeedExtras:
    """Sample i -> its CLIP-ES seed (present classes' maps, background, class ids), read with
    :func:`tokenseg.core.seeds.load_seed`; seeds without a background channel get ``(1 − max)^clip_bg_power``."""

    def __init__(self, folder: str, ids, num_classes: int, bg_power: float) -> None:
        self.folder, self.ids, self.C, self.bg_power = Path(folder), list(ids), int(num_classes), bg_power
        if not str(folder):
            raise TokensegError("otpl.clip_seeds: set it to the folder of CLIP-ES seeds of the train split "
                                "(e.g. made by `tokenseg maps clip-es ... --split train_aug`)")
        if not self.folder.is_dir():
            raise TokensegError(f"otpl.clip_seeds: {self.folder} is not a folder")
        if self.ids:
            self.path(0)  # fail before training if the first image has no seed

    def path(self, i: int) -> Path:
        npz = seed_path(self.folder, self.ids[i])
        for p in (npz, npz.with_suffix(".npy")):
            if p.is_file():
                return p
        raise TokensegError(f"otpl.clip_seeds: no seed file for image {self.ids[i]!r} ({npz} or .npy)")

    def dense(self, i: int) -> np.ndarray:
        """(C + 1, H, W) scores of image i, background first, 0 for the classes its seed does not hold."""
        e = self(i)
        out = np.zeros((self.C + 1, *e["clip_bg"].shape), np.float32)
        out[0] = e["clip_bg"]
        out[e["clip_classes"] + 1] = e["clip_maps"]
        return out

    def __call__(self, i: int) -> dict:
        seed = load_seed(self.path(i))
        maps = np.asarray(seed.maps, np.float32)
        classes = np.asarray(seed.classes, np.int64)
        if len(classes) and (classes.min() < 0 or classes.max() >= self.C):
            raise TokensegError(f"{self.path(i)}: class ids {classes.tolist()} outside 0..{self.C - 1}")
        if seed.background is not None:
            bg = np.asarray(seed.background, np.float32)
        else:
            top = maps.max(0) if len(maps) else np.zeros(maps.shape[1:], np.float32)
            bg = np.clip(1 - top, 0, None) ** self.bg_power
        return {"clip_maps": maps, "clip_classes": classes, "clip_bg": bg.astype(np.float32),
                "clip_num_classes": np.asarray(self.C)}


def clip_views(cfg):
    t = cfg.train
    return {"image": SeedCropView(cfg.model.img_size, t.crop_scale, cfg.otpl.seed_stride, t.color_jitter)}


def clip_extras(cfg, dataset):
    return ClipSeedExtras(cfg.otpl.clip_seeds, dataset.ids, dataset.num_classes, cfg.otpl.clip_bg_power)


def clip_map_extras(cfg, ds):
    """At map time, as in training (Eq. 13), each image's prototypes come from its own CLIP-ES seeds
    (``otpl.clip_seeds``, found by image id); without that key, from the running-average memory [I]."""
    if not cfg.otpl.clip_seeds:
        print("otpl-clip-es maps: otpl.clip_seeds is not set: class prototypes from the running average "
              "kept in training (memory), not from each image's CLIP-ES seeds")
        return None
    return ClipSeedExtras(cfg.otpl.clip_seeds, ds.ids, ds.num_classes, cfg.otpl.clip_bg_power).dense


def clip_combine(model, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, cfg, kinds,
                 extras: torch.Tensor | None = None) -> dict:
    """``proxy``: the proxy CAM; M^cls from the views' CLIP-ES seeds (``extras``, (B, C+1, H, W)) as in
    training, or from the memory prototypes when no seeds are given."""
    from .model import memory_cam
    from .proxies import pool_to_grid, proxy_cam

    warn_ignored_settings(cfg.otpl, getattr(model, "settings", None), CLIP_MAP_TIME_KEYS)
    feats, grid = model.encoder(x)
    if extras is not None:
        cam = pool_to_grid(extras, grid)
    else:
        cam = memory_cam(feats, model.memory, labels, model.settings.cam_bg_power, model.settings.cam_norm)
    prox = model.proxy_outputs(feats, cam, labels)
    m = proxy_cam(prox["otpl_proxies"][:, 1:], feats)[:, classes]
    return {"proxy": m.view(x.shape[0], len(classes), *grid)}


def validate_clip(cfg) -> None:
    o = cfg.otpl
    _check_common(o)
    if o.background not in ("auto", "pooled", "none"):
        raise TokensegError(f"otpl.background={o.background}: the CLIP-ES variant pools its background prototype "
                            f"(auto, pooled or none)")
    if cfg.train.augment != "simple":
        raise TokensegError("train.augment: otpl-clip-es crops its seeds with the image, so it needs "
                            "train.augment=simple (RandAugment's geometry cannot be co-applied)")
    if o.seed_stride < 1:
        raise TokensegError(f"otpl.seed_stride must be >= 1, got {o.seed_stride}")
    bad = [k for k in cfg.maps.kinds if k not in CLIP_KINDS]
    if bad:
        raise TokensegError(f"maps.kinds: {', '.join(bad)} not made by otpl-clip-es (kinds: {', '.join(CLIP_KINDS)})")


CLIP_RECIPE = MapRecipe(kinds=CLIP_KINDS, default_kinds=CLIP_KINDS, combine=clip_combine, normalise="max",
                        mean=CLIP_MEAN, std=CLIP_STD, map_extras=clip_map_extras)

register(Method(
    name="otpl-clip-es", summary="OTPL on a ViT encoder with prototypes from CLIP-ES seeds (ICCV 2025 supp.)",
    build=build_clip, recipe=CLIP_RECIPE, loss=clip_loss, forward=forward, class_scores=clip_class_scores,
    section="otpl", section_config=OTPLConfig, views=clip_views, extras=clip_extras,
    param_groups=clip_param_groups, validate=validate_clip))
