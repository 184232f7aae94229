"""POT — Prototypical Optimal Transport (CVPR 2025; METHODS.md §11, errata §16.16, §16.20–16.23).

A SIPE-style ResNet (:class:`tokenseg.models.pot.POTNet`) trained with the multilabel soft-margin loss
and a consistency loss between prototype CAMs and a reference CAM. Two pipelines:

``pot.mode=paper`` (default, §11.2; the main paper's equations are not public, every reconstruction is
    an [I] option of ``cfg.pot``): per present class, confident pixels of the baseline CAM (the
    classifier's, or precomputed CLIP-ES seeds with ``pot.clip_seeds``) → cosine k-means (K = 3) →
    similarity-aware OT of all pixels to the clusters → prototypes from the plan, cosine activation
    re-weighted by the plan → M_pot with a ``1 − max`` background; L1 consistency with the classifier CAM.
``pot.mode=code`` (§11.4, §16.20–16.23): the released code: argmax seeds of the classifier CAM, K = 2,
    the mean of the cluster cosine maps, OT not used, their CLIP-ES fusion as the target, 512×512
    training resize without flip, and IS_CAM + IS_CAM1 seeds.

Seeds carry an explicit background channel (``eval.background=channel``). The k-means and the OT run
batched over every (image, class) pair of a batch (:mod:`tokenseg.core.ot`).

Maps that need per-image inputs besides the image (the CLIP-ES seeds) or the code's IS_CAM + IS_CAM1
(IS_CAM from the first scale only, combined after normalisation) run in POT's own loop, one scale at a
time as their ``make_cam.py`` (PIL bicubic rescale of the uint8 image, maps upsampled from the grid to
the image) (``maps.mode=authors``, set automatically): the generic pipeline passes no per-image inputs
to a recipe yet. ``tests/test_pot_authors.py`` checks code mode against the released code.
"""
from __future__ import annotations

import copy
import dataclasses
import random
from typing import ClassVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config
from ..data.base import size_batches
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_scales
from ..core.errors import TokensegError
from ..core.losses import multilabel_soft_margin
from ..models.pot import CODE_CLUSTERS, POTNet, code_fusion, code_stage, grid_size, max_norm, paper_stage
from . import BACKGROUND, MapRecipe, Method, register
from .base import SeedHooks, SeedJob
from .mapops import (MapBatch, add_views, image_bytes, normalise_maps, rounding_of, save_map_batch, scaled_size,
                     upsample)

PAPER_KINDS = ("pot", "cam")
CODE_KINDS = ("is_cam", "is_cam1", "is_cam_sum")
CODE_MOMENTUM = 1e-4  # what their PolyOptimizerSGD runs: the weight-decay value lands in SGD's momentum (§16.16)


@dataclass
class POTConfig:
    """``pot.*``. ``auto`` values follow ``pot.mode`` (paper | code)."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "pot.output_stride": ">=1", "pot.new_lr_mult": ">0", "pot.resize_long": ">=1", "pot.crop": ">=1",
        "pot.resize": ">=1", "pot.tau": ">=0", "pot.clusters": ">=0", "pot.kmeans_iters": ">=1",
        "pot.marginal_temperature": ">0", "pot.ot_eps": ">0", "pot.ot_iters": ">=1", "pot.ot_thresh": ">=0",
        "pot.cls_weight": ">=0", "pot.con_weight": ">=0", "pot.seed": ">=0"}

    mode: str = "paper"  # paper (§11.2, [I] reconstructions below) | code (the released code, §11.4)
    # network (§11.1)
    backbone: str = "resnet50"  # any timm ResNet; resnet50.tv_in1k = the torchvision weights the code loads
    backbone_kwargs: dict = field(default_factory=dict)  # e.g. channels / stem_width for a small demo net
    output_stride: int = 16  # 16: strides 2,2,2,1 (SIPE/POT); 8: 2,2,1,1 (small inputs: the demo)
    freeze_stem: bool = True  # conv1 / bn1 get no gradient (the code)
    freeze_bn: bool = True  # every backbone BatchNorm keeps its running statistics (the code's FixedBatchNorm)
    new_lr_mult: float = 10.0  # side convs + classifier: 10x lr (the code)
    # baseline CAM (stage 1's confident pixels; the code's fusion input)
    clip_seeds: str = ""  # precomputed CLIP-ES seeds (ours .npz or their .npy); {split} = the split. "" = classifier
    clip_kind: str = ""  # the kind sub-folder when the seeds folder holds several
    clip_allow_pickle: bool = False  # their .npy dicts are pickles: only for files you trust
    # training input (SIPE: random long side, flip, crop; the code's VOC: 512x512 resize, no flip, §16.20)
    augment: str = "auto"  # auto (paper: sipe; code: resize) | sipe | resize
    resize_long: list = field(default_factory=lambda: [320, 640])
    crop: int = 512
    resize: int = 512
    flip: str = "auto"  # auto (paper: true; code: false) | true | false
    # stage 1: clustering [P: tau 0.7, K 3]
    tau: float = 0.7
    clusters: int = 0  # 0 = auto (paper 3, code 2)
    kmeans_iters: int = 100  # cap of Lloyd iterations (kmeans_pytorch has none; tol 1e-4 as the library)
    # stage 2: similarity-aware OT
    marginal: str = "relu"  # [I] relu (ReLU(cos(p_k, q)) normalised: no invented scale) | similarity
    # (softmax_k cos(p_k, q)/T: T sets how hard dissimilar clusters are starved) | size | uniform (the code's)
    marginal_temperature: float = 0.1  # [I] T of the similarity marginal
    solver: str = "code"  # code (their Sinkhorn: eps, <=100 its, mean|dr| < 1e-2) | log (log-domain, fixed its)
    ot_eps: float = 0.1
    ot_iters: int = 100
    ot_thresh: float = 1e-2
    # stage 3: activation
    update: str = "soft"  # [I] soft (plan-weighted means) | hard (argmax of the plan) | none (k-means centres)
    update_region: str = "confident"  # [I] confident (pixels of the confident set) | all (every pixel)
    # losses: cls_weight * MLSM + con_weight * mean |pred - target| (the code: 0.5 and 10)
    cls_weight: float = 0.5
    con_weight: float = 10.0
    target: str = "auto"  # auto (paper: classifier; code: fused) | classifier (the supplement) | fused (the code's)
    adaptive: bool = True  # [I] weight each pixel's class term by max_k of its row-normalised plan
    detach_target: bool = False  # the code back-propagates through the target too (§16.23)
    # inference
    flip_fusion: str = "features"  # features (the code sums orig + flipped features) | maps (sum maps)
    seed: int = 0  # k-means initialisation at inference
    kmeans_init: str = "auto"  # auto (code: numpy, paper: torch) | torch (batched draws) | numpy (kmeans_pytorch's
    # np.random.choice per channel, as the code: RandomState(pot.seed) per image and scale at inference,
    # RandomState(the step's seed) per training step; code mode only)
    momentum: str = "auto"  # auto (paper: train.momentum; code: 1e-4, §16.16) | train | code


# ----------------------------------------------------------------------------------------- resolved options
def clusters_of(pc) -> int:
    return int(pc.clusters) or (CODE_CLUSTERS if pc.mode == "code" else 3)


def augment_of(pc) -> str:
    return pc.augment if pc.augment != "auto" else ("resize" if pc.mode == "code" else "sipe")


def flip_of(pc) -> bool:
    return pc.flip == "true" if pc.flip != "auto" else pc.mode != "code"


def target_of(pc) -> str:
    return pc.target if pc.target != "auto" else ("fused" if pc.mode == "code" else "classifier")


def numpy_init_of(pc) -> bool:
    return pc.kmeans_init == "numpy" or (pc.kmeans_init == "auto" and pc.mode == "code")


def momentum_of(pc, tc) -> float:
    if pc.momentum == "code" or (pc.momentum == "auto" and pc.mode == "code"):
        return CODE_MOMENTUM
    return float(tc.momentum)


def _stage_options(pc):
    """``cfg.pot`` with the resolved cluster count, for :func:`~tokenseg.models.pot.paper_stage`."""
    return dataclasses.replace(pc, clusters=clusters_of(pc))


# ----------------------------------------------------------------------------------------- model
def build(cfg, num_classes: int) -> nn.Module:
    pc = cfg.pot
    model = POTNet(pc.backbone, num_classes, cfg.model.pretrained, pc.output_stride, pc.freeze_stem, pc.freeze_bn,
                   pc.backbone_kwargs)
    model.pot_cfg = copy.deepcopy(pc)  # POT's own map loop reads it (it gets the maps section only)
    return model


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """Backbone at lr × 1, side convs and classifier at × ``new_lr_mult``; weight decay on every
    parameter (the code's two groups); frozen conv1/bn1 left out; per-group momentum (§16.16)."""
    net = model.module if hasattr(model, "module") else model
    new_ids = {id(p) for m in net.new_modules() for p in m.parameters()}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in new_ids]
    new = [p for m in net.new_modules() for p in m.parameters() if p.requires_grad]
    wd = cfg.train.weight_decay
    mom = momentum_of(cfg.pot, cfg.train)
    return [{"params": backbone, "weight_decay": wd, "lr_mult": 1.0, "momentum": mom},
            {"params": new, "weight_decay": wd, "lr_mult": float(cfg.pot.new_lr_mult), "momentum": mom}]


def class_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)["cls_logits"]


# ----------------------------------------------------------------------------------------- CLIP-ES seeds
class ClipSeeds:
    """Precomputed CLIP-ES seeds of a dataset: our ``.npz`` seed files (``tokenseg maps clip-es``) or
    their ``.npy`` dicts (``keys`` + ``attn_highres``), one per image id, in ``pot.clip_seeds`` (a
    seeds root with kind sub-folders, or the folder of one kind; ``{split}`` is replaced by ``split``).
    Every image must have one: missing files are an error up front, naming a few."""

    def __init__(self, pc, ds, split: str = "") -> None:
        from ..core.seeds import seed_folders

        text = pc.clip_seeds.replace("{split}", split)
        root = Path(text)
        if not root.is_dir():
            raise TokensegError(f"pot.clip_seeds: folder {root} not found (make the CLIP-ES seeds first, e.g. "
                                f"`tokenseg maps clip-es --split {split or 'train_aug'}`)")
        folders = seed_folders(root)
        if pc.clip_kind:
            if pc.clip_kind not in folders:
                raise TokensegError(f"pot.clip_kind: {root} has no seeds of kind {pc.clip_kind!r} "
                                    f"(kinds: {', '.join(folders) or 'none'})")
            folder = folders[pc.clip_kind]
        elif len(folders) == 1:
            folder = next(iter(folders.values()))
        elif not folders:
            raise TokensegError(f"pot.clip_seeds: {root} holds no seed files (.npz / .npy)")
        else:
            raise TokensegError(f"pot.clip_seeds: {root} holds several kinds ({', '.join(folders)}): "
                                f"set pot.clip_kind")
        self.folder, self.allow_pickle, self.num_classes = folder, pc.clip_allow_pickle, ds.num_classes
        self.ids = list(ds.ids)
        self.paths = [self._find(i) for i in self.ids]
        missing = [i for i, p in zip(self.ids, self.paths) if p is None]
        if missing:
            raise TokensegError(f"pot.clip_seeds: {len(missing)} of {len(self.ids)} images have no CLIP-ES seed "
                                f"in {folder} (e.g. {', '.join(missing[:3])}); the folder must cover the split "
                                f"{split or ds.name!r}")

    def _find(self, image_id: str) -> Path | None:
        for ext in (".npz", ".npy"):
            p = self.folder / f"{image_id}{ext}"
            if p.is_file():
                return p
        return None

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes (n,) int64, maps (n, H, W) float32) of image ``i``."""
        path = self.paths[i]
        if path.suffix == ".npy":
            from .clip_es.algorithm import load_clip_es_npy

            seed = load_clip_es_npy(path, allow_pickle=self.allow_pickle)
        else:
            from ..core.seeds import load_seed

            seed = load_seed(path)
        classes = np.asarray(seed.classes, np.int64).reshape(-1)
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise TokensegError(f"{path}: class indices {classes.tolist()} outside 0..{self.num_classes - 1}")
        maps = np.asarray(seed.maps, np.float32)
        if maps.ndim != 3 or len(maps) != len(classes):
            raise TokensegError(f"{path}: {len(classes)} classes but maps of shape {maps.shape}")
        return classes, maps

    def __call__(self, i: int) -> dict:
        """The training extras of sample ``i`` (the view co-augments them)."""
        classes, maps = self.load(i)
        return {"clip_classes": classes, "clip_maps": maps, "clip_num_classes": np.int64(self.num_classes)}

    def batch(self, idx: list[int], size: tuple[int, int], device) -> dict:
        """The maps of a batch of same-size images as (image, class) pairs at image resolution."""
        pairs, maps = [], []
        for b, i in enumerate(idx):
            classes, m = self.load(i)
            t = torch.from_numpy(m)
            if tuple(t.shape[-2:]) != tuple(size):  # [I] seeds of another size are stretched to the image
                t = F.interpolate(t[None], size, mode="bilinear", align_corners=False)[0]
            pairs += [(b, int(c)) for c in classes]
            maps.append(t)
        maps_t = torch.cat(maps) if maps else torch.zeros(0, *size)
        return {"clip_pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2).to(device),
                "clip_maps": maps_t.to(device)}


def extras(cfg, dataset):
    """Training extras: the CLIP-ES seeds of each image when ``pot.clip_seeds`` is set."""
    if not cfg.pot.clip_seeds:
        return None
    return ClipSeeds(cfg.pot, dataset, _split_name(cfg.data.train_split))


def _split_name(split: str) -> str:
    return Path(split).stem if split.endswith(".txt") else split


# ----------------------------------------------------------------------------------------- views
class POTView:
    """One training view of a sample with its CLIP-ES maps co-augmented.

    ``sipe`` (SIPE / the code's COCO): long side → randint(resize_long) (PIL bicubic), normalise, flip
    (random bit), random crop ``crop`` (the code's box rule; padding 0 after normalisation); the maps get
    the same resize (bilinear), flip and crop, then go to the feature grid. ``resize`` (the code's VOC,
    §16.20): the image to ``resize``², the maps straight from image size to the grid (bilinear, as the
    code), optional flip. Outputs: the image tensor and ``valid`` (g, g) (inside the crop) and, with
    seeds, ``clip`` (C, g, g) dense (0 for classes not in the seed file). In paper mode the maps are
    downsampled with antialiasing [I: a 16x bilinear step samples 1 pixel in 256]; code mode as the code.
    Randomness: Python's ``random`` (seeded per sample by the engine), in SIPE's order."""

    def __init__(self, pc) -> None:
        self.augment, self.flip, self.code = augment_of(pc), flip_of(pc), pc.mode == "code"
        self.lo, self.hi = (int(v) for v in pc.resize_long)
        self.crop, self.resize, self.stride = int(pc.crop), int(pc.resize), int(pc.output_stride)
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.std = np.asarray(IMAGENET_STD, np.float32)

    def _norm(self, arr: np.ndarray) -> np.ndarray:
        return (arr.astype(np.float32) / 255.0 - self.mean) / self.std

    def _grid(self, maps: torch.Tensor, g: int) -> torch.Tensor:
        return F.interpolate(maps[None], (g, g), mode="bilinear", align_corners=False,
                             antialias=not self.code and maps.shape[-1] > g)[0]

    def __call__(self, image, extras: dict) -> tuple[torch.Tensor, dict]:
        from PIL import Image

        image = image.convert("RGB")
        W0, H0 = image.size
        maps = None
        if "clip_maps" in extras:
            maps = torch.from_numpy(np.asarray(extras["clip_maps"], np.float32))
            if tuple(maps.shape[-2:]) != (H0, W0) and len(maps):
                maps = F.interpolate(maps[None], (H0, W0), mode="bilinear", align_corners=False)[0]
        if self.augment == "resize":
            S = self.resize
            img = self._norm(np.asarray(image.resize((S, S), Image.BICUBIC)))
            flip = self.flip and bool(random.getrandbits(1))
            g = grid_size(S, self.stride)
            valid = torch.ones(g, g)
            if maps is not None:
                maps = self._grid(maps, g) if len(maps) else maps.new_zeros(0, g, g)
            if flip:
                img = img[:, ::-1]
                maps = maps.flip(-1) if maps is not None else None
        else:
            target = random.randint(self.lo, self.hi)
            scale = target / H0 if W0 < H0 else target / W0
            h1, w1 = int(np.round(H0 * scale)), int(np.round(W0 * scale))
            arr = np.asarray(image if (h1, w1) == (H0, W0) else image.resize((w1, h1), Image.BICUBIC))
            img = self._norm(arr)
            flip = self.flip and bool(random.getrandbits(1))
            if flip:
                img = img[:, ::-1]
            S = self.crop
            box = crop_box((h1, w1), S)
            out = np.zeros((S, S, 3), np.float32)
            out[box[0]:box[1], box[2]:box[3]] = img[box[4]:box[5], box[6]:box[7]]
            img = out
            mask = torch.zeros(S, S)
            mask[box[0]:box[1], box[2]:box[3]] = 1.0
            g = grid_size(S, self.stride)
            valid = F.interpolate(mask[None, None], (g, g), mode="nearest")[0, 0]
            if maps is not None:
                if len(maps):
                    m = F.interpolate(maps[None], (h1, w1), mode="bilinear", align_corners=False)[0]
                    m = m.flip(-1) if flip else m
                    c = m.new_zeros(len(m), S, S)
                    c[:, box[0]:box[1], box[2]:box[3]] = m[:, box[4]:box[5], box[6]:box[7]]
                    maps = self._grid(c, g)
                else:
                    maps = maps.new_zeros(0, g, g)
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        out_extras = {"valid": valid.numpy().astype(np.float32)}
        if maps is not None:
            dense = torch.zeros(int(extras["clip_num_classes"]), g, g)
            classes = torch.from_numpy(np.asarray(extras["clip_classes"], np.int64))
            if len(classes):
                dense[classes] = maps
            out_extras["clip"] = dense.numpy()
        return x, out_extras


def crop_box(size: tuple[int, int], crop: int) -> tuple[int, ...]:
    """SIPE/IRN's random crop box: (container top, bottom, left, right, image top, bottom, left, right);
    a side smaller than the crop is placed at a random offset in the container (drawn width first)."""
    h, w = size
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    if w_space > 0:
        cont_left, img_left = 0, random.randrange(w_space + 1)
    else:
        cont_left, img_left = random.randrange(-w_space + 1), 0
    if h_space > 0:
        cont_top, img_top = 0, random.randrange(h_space + 1)
    else:
        cont_top, img_top = random.randrange(-h_space + 1), 0
    return (cont_top, cont_top + ch, cont_left, cont_left + cw, img_top, img_top + ch, img_left, img_left + cw)


def views(cfg) -> dict:
    return {"image": POTView(cfg.pot)}


# ----------------------------------------------------------------------------------------- training
def _step_seed(cfg, ctx) -> int:
    """The k-means initialisation of a step: a function of (seed, step, rank), so a resumed run draws
    the same points as an uninterrupted one."""
    return int(np.random.SeedSequence([int(cfg.train.seed), int(ctx.step), int(ctx.rank), 7]).generate_state(1)[0])


def _step_generator(cfg, ctx, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_step_seed(cfg, ctx))


def _to_grid(t: torch.Tensor, size, mode: str) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size, mode=mode) if mode == "nearest" else F.interpolate(
        t, size, mode=mode, align_corners=False)


def classifier_cam(cam: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """M_cls (B, C+1, h, w): [1 − max_c, ReLU(cam)/max] with the max over *all* classes (the code),
    foreground masked by the labels."""
    nc = max_norm(F.relu(cam.float()))
    return torch.cat([1.0 - nc.amax(1, keepdim=True), nc * present[:, :, None, None]], 1)


def forward(model: nn.Module, batch: dict, ctx, cfg) -> dict:
    """The network once, then the prototype stages of the mode (fp32, no autocast)."""
    pc = cfg.pot
    out = model(batch["image"])
    feats = out["features"]
    dev = feats.device
    size = feats.shape[-2:]
    labels = batch["labels"].float()
    valid = _to_grid(batch["valid"][:, None].float(), size, "nearest")[:, 0]
    clip = batch.get("clip")
    if clip is not None:
        clip = _to_grid(clip.float(), size, "bilinear") * labels[:, :, None, None] * valid[:, None]
    gen = _step_generator(cfg, ctx, dev)
    vm = torch.cat([torch.ones_like(labels[:, :1]), labels], 1)[:, :, None, None] * valid[:, None]
    with torch.autocast(dev.type, enabled=False):
        cam = out["cam"].float()
        if pc.mode == "code":
            seed = _step_seed(cfg, ctx) if numpy_init_of(pc) else None
            maps, vm = code_stage(feats.float(), cam, labels, valid, pc.kmeans_iters, gen, clusters_of(pc),
                                  training=True, numpy_seed=seed)
            pred, target = code_fusion(maps, clip, vm, training=True)
            weight = None
        else:
            baseline = clip if clip is not None else max_norm(F.relu(cam)) * labels[:, :, None, None]
            st = paper_stage(feats.float(), baseline, labels, valid, _stage_options(pc), gen)
            pred = torch.cat([st.background, st.cam], 1)
            if target_of(pc) == "fused":
                pred, target = code_fusion(pred, clip, vm, training=True)
            else:
                target = classifier_cam(cam, labels)
            weight = torch.cat([torch.ones_like(st.background), st.confidence], 1) if pc.adaptive else None
            out["_omega"] = st.omega.float().mean() if st.omega.numel() else feats.new_zeros(())
    out.update(pot_pred=pred, pot_target=target, pot_mask=vm)
    if weight is not None:
        out["pot_weight"] = weight
    return out


def loss(out: dict, batch: dict, ctx, cfg) -> dict:
    """cls_weight · MLSM(scores) + con_weight · mean |pred − target| over (B, C+1, h, w), both masked
    by [valid, valid·y] and max-normalised per channel (the code's ``lossCon``)."""
    pc = cfg.pot
    vm = out["pot_mask"]
    target = out["pot_target"].detach() if pc.detach_target else out["pot_target"]
    diff = (max_norm(out["pot_pred"] * vm) - max_norm(target * vm)).abs()
    if "pot_weight" in out:
        diff = diff * out["pot_weight"]
    terms = {"cls": pc.cls_weight * multilabel_soft_margin(out["cls_logits"], batch["labels"]),
             "con": pc.con_weight * diff.mean()}
    if "_omega" in out:
        terms["_omega"] = out["_omega"].detach()
    return terms


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

    from ..core.files import safe_output_path, write_bytes_atomic

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


# ----------------------------------------------------------------------------------------- checks, foreign
CHOICES = {"mode": ("paper", "code"), "augment": ("auto", "sipe", "resize"), "flip": ("auto", "true", "false"),
           "marginal": ("similarity", "relu", "size", "uniform"), "solver": ("code", "log"),
           "update": ("soft", "hard", "none"), "update_region": ("confident", "all"),
           "target": ("auto", "classifier", "fused"), "flip_fusion": ("features", "maps"),
           "momentum": ("auto", "train", "code"), "kmeans_init": ("auto", "torch", "numpy")}

# keys of other sections that POT never reads, with what to set instead: set away from their defaults,
# they are refused (a silently ignored setting would let a user believe it took effect)
IGNORED = {"model.backbone": "set pot.backbone", "model.backbone_kwargs": "set pot.backbone_kwargs",
           "model.stem": "", "model.drop_path": "", "model.final_norm": "", "model.token_init": "",
           "model.pooling": "", "model.gwrp_decay": "", "model.cls_loss_weight": "set pot.cls_weight",
           "model.patch_loss_weight": "", "model.cct_weight": "", "model.cct_layers": "",
           "train.augment": "set pot.augment, pot.resize_long, pot.crop, pot.resize, pot.flip",
           "train.crop_scale": "set pot.resize_long, pot.crop", "train.color_jitter": "",
           "train.decay_pos_embed": "", "maps.layers": "", "maps.layer_reduce": "", "maps.fusion": ""}
SGD_IGNORED = ("train.warmup_epochs", "train.warmup_lr", "train.min_lr", "train.lr_schedule")


def ignored_keys(cfg) -> dict[str, str]:
    """The keys this config does not read, each with its hint: :data:`IGNORED`, the AdamW schedule's
    keys under SGD + poly decay, ``train.momentum`` where the code's momentum runs."""
    keys = dict(IGNORED)
    if cfg.train.optimizer in ("auto", "sgd"):
        keys.update({k: "POT trains with SGD + poly decay (train.poly_power); it applies to train.optimizer=adamw"
                     for k in SGD_IGNORED})
    if momentum_of(cfg.pot, cfg.train) == CODE_MOMENTUM and cfg.pot.momentum == "auto":
        keys["train.momentum"] = "pot.mode=code runs the code's 1e-4 (METHODS.md §16.16): set pot.momentum=train to use it"
    return keys


def refuse_ignored(cfg) -> None:
    """A clear error for the first key of :func:`ignored_keys` set away from its default."""

    default = Config()
    for key, hint in ignored_keys(cfg).items():
        section, name = key.split(".")
        value, base = getattr(getattr(cfg, section), name), getattr(getattr(default, section), name)
        if value != base:
            raise TokensegError(f"config key '{key}' is not used by POT here (got {value!r}, default {base!r}): "
                                f"remove it{'; ' + hint if hint else ''}")


def validate(cfg) -> None:
    pc = cfg.pot
    for key, options in CHOICES.items():
        if getattr(pc, key) not in options:
            raise TokensegError(f"config key 'pot.{key}' must be one of {list(options)}, got {getattr(pc, key)!r}")
    if not 0.0 < pc.tau < 1.0:
        raise TokensegError(f"pot.tau must be in (0, 1), got {pc.tau}")
    if pc.clusters < 0 or pc.kmeans_iters < 1 or pc.ot_iters < 1 or pc.ot_eps <= 0 or pc.marginal_temperature <= 0:
        raise TokensegError("pot.clusters must be >= 0 (0 = auto), pot.kmeans_iters / ot_iters >= 1, pot.ot_eps and "
                            "pot.marginal_temperature > 0")
    if pc.output_stride not in (8, 16):
        raise TokensegError(f"pot.output_stride must be 16 or 8, got {pc.output_stride}")
    if len(pc.resize_long) != 2 or not 0 < pc.resize_long[0] <= pc.resize_long[1]:
        raise TokensegError(f"pot.resize_long must be [min, max] with 0 < min <= max, got {pc.resize_long}")
    if pc.crop < 16 or pc.resize < 16:
        raise TokensegError("pot.crop and pot.resize must be >= 16 pixels")
    if pc.kmeans_init == "numpy" and pc.mode != "code":
        raise TokensegError("pot.kmeans_init=numpy draws as the released code's k-means: only with pot.mode=code")
    refuse_ignored(cfg)
    if pc.mode == "code" and not pc.clip_seeds:
        raise TokensegError("pot.mode=code needs pot.clip_seeds: the released code always fuses precomputed "
                            "CLIP-ES CAMs (make them with `tokenseg maps clip-es`)")
    if target_of(pc) == "fused" and not pc.clip_seeds:
        raise TokensegError("pot.target=fused fuses the CLIP-ES seeds: set pot.clip_seeds")
    if pc.mode == "code" and list(cfg.maps.kinds) == list(RECIPE.default_kinds):
        cfg.maps.kinds = ["is_cam_sum", "is_cam1"]  # what their eval_cam.py scores, and what IRN reads
    if pc.mode == "code" and cfg.pseudo.kind == "pot" and "pot" not in cfg.maps.kinds:
        cfg.pseudo.kind = "is_cam1"  # the masks come from the seeds code mode makes (their IRN reads IS_CAM1)
    if pc.clip_seeds or any(k in CODE_KINDS for k in cfg.maps.kinds):
        cfg.maps.mode = "authors"  # POT's own loop: the generic pipeline passes no per-image seeds


def load_foreign(state, source: str, overrides=(), num_heads=None, path=None):
    """The released code's checkpoints (``{'net': state_dict}`` of ``resnet50_POT.Net``): ``resnet50.*``
    backbone, ``side1..4``, ``classifier``; ``f9`` (unused by their forward) and the aliases
    ``stage*`` / ``backbone.*`` / ``newly_added.*`` of the same modules are dropped. Built as
    ``pot-clip-es`` in code mode (their network is trained with CLIP-ES)."""
    from ..core.weights import load_state_checked
    from ..config import load_config
    from ..models.layout import resolve_class_names

    sd = state.get("net", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        return None
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    if not all(k in sd for k in ("resnet50.conv1.weight", "side1.weight", "classifier.weight")):
        return None
    C = int(sd["classifier.weight"].shape[0])
    cfg = load_config("pot-clip-es", ["pot.mode=code", "model.pretrained=false", "pot.backbone=resnet50",
                                      *overrides])
    cfg.name, cfg.output_dir = "converted-pot", "runs/converted-pot"
    model = build(cfg, C)
    ours = {"body." + k.removeprefix("resnet50."): v for k, v in sd.items() if k.startswith("resnet50.")}
    ours.update({k: v for k, v in sd.items() if k.startswith(("side", "classifier."))})
    load_state_checked(model, ours, source)
    model.class_names_source = "default"
    return model.eval(), cfg, resolve_class_names(None, C)


def to_released_state(model: nn.Module) -> dict:
    """Our POT model as the released code's ``Net`` state dict (what their ``make_cam.py`` loads with
    ``strict=True``): ``resnet50.*`` and its aliases ``stage0..4.*`` / ``backbone.0..4.*``, the side
    convs and classifier, their unused ``f9`` (zeros) and the ``newly_added.*`` aliases. For ``tokenseg
    convert``; only a ResNet-50 at output stride 16 fits their network."""
    sd = model.state_dict()
    body = {k.removeprefix("body."): v for k, v in sd.items() if k.startswith("body.")}
    out = {f"resnet50.{k}": v for k, v in body.items()}
    stem = {"conv1": "0", "bn1": "1"}
    for k, v in body.items():
        head, rest = k.split(".", 1)
        if head in stem:
            alias = f"0.{stem[head]}.{rest}"
        elif head.startswith("layer"):
            alias = f"{head[5:]}.0.{rest}"
        else:
            continue
        i, tail = alias.split(".", 1)
        out[f"stage{i}.{tail}"] = v
        out[f"backbone.{i}.{tail}"] = v
    f9 = torch.zeros(2048, 2 + 3 + 2048, 1, 1, dtype=sd["classifier.weight"].dtype)
    new = [("classifier", sd["classifier.weight"]), ("f9", f9)] + [(f"side{j}", sd[f"side{j}.weight"])
                                                                   for j in range(1, 5)]
    for j, (name, w) in enumerate(new):
        out[f"{name}.weight"] = w
        out[f"newly_added.{j}.weight"] = w
    return out


RECIPE = MapRecipe(kinds=PAPER_KINDS + CODE_KINDS, default_kinds=("pot",), combine=combine, normalise="max",
                   background="channel", size_rounding="none", authors=code_hooks())

register(Method(
    name="pot", summary="Prototypical Optimal Transport on a SIPE-style ResNet (CVPR 2025)",
    build=build, recipe=RECIPE, loss=loss, forward=forward, class_scores=class_scores, views=views,
    extras=extras, param_groups=param_groups, optimizer="sgd-poly", section="pot", section_config=POTConfig,
    validate=validate, load_foreign=load_foreign))
