"""The config sections as dataclasses with the papers' defaults, and :class:`Config`, their tree (a method's
own section is created on first use from the dataclass it registers)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.files import write_text_atomic



PRESET_DIR = Path(__file__).parent.parent / "configs"  # the generic presets (tiny, demo, photos)
METHOD_PRESETS = "methods/*/presets"  # a method's presets beside it, found by path (config imports no method)
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")  # eval.wsol_interp: how WSOL scores are resized


@dataclass
class SyntheticConfig:
    """The built-in synthetic dataset (see ``tokenseg.data.synthetic``)."""

    num_classes: int = 5
    image_size: int = 96
    train_images: int = 2000
    val_images: int = 300
    seed: int = 0
    cooccurrence: float = 0.8  # probability that a class sits on its "home" background
    object_scale: float = 1.0  # objects' radius × this (1.0: the images of earlier versions, bit for bit)


@dataclass
class DataConfig:
    """Where the images, labels and masks are (see ``tokenseg.data`` and README "Datasets")."""

    format: str = "voc"  # voc | coco | folder | openimages | synthetic
    root: str = ""  # VOCdevkit/VOC2012 | the COCO folder | your folder
    train_split: str = "train_aug"  # a split name, or a path to a list file (e.g. .../train_aug.txt)
    val_split: str = "val"
    labels_file: str = ""  # image-level labels (JSON/CSV); empty: the reader's default source
    label_source: str = "auto"  # auto | file | xml (VOC) | masks; auto: file > XML > masks
    mask_dir: str = "SegmentationClass"  # VOC: first mask folder; folder format: masks/ if this is absent
    aug_mask_dir: str = "SegmentationClassAug"  # VOC: masks for images missing from mask_dir
    image_dir: str = ""  # folder format: images folder under root (default images/, else root)
    class_names_file: str = ""
    metadata_root: str = ""  # openimages: wsolevaluation's metadata/OpenImages (default: looked for near root)
    mask_root: str = ""  # openimages: where the mask folders are (default: root)
    cache_dir: str = ""  # where derived data (synthetic set, COCO masks) goes; default ~/.cache/tokenseg
    coco_rasterizer: str = "auto"  # auto (pycocotools if installed) | pycocotools | numpy
    keep_empty: bool = False  # COCO: keep images without any annotation (the papers drop them)
    num_workers: int = 2
    skip_bad: bool = False  # skip (and list) missing/corrupt images instead of stopping
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    method: str = "mctformer-plus"  # mctformer-v1 | mctformer-v2 | mctformer-plus
    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: Any = False  # False | True (timm weights, online) | path to a local weights file
    img_size: int = 448
    stem: str = "patch"  # patch (timm's linear patch embedding) | conv (conv stem, for training from scratch)
    drop_path: float = 0.1
    final_norm: bool = False  # apply the ViT's final LayerNorm; the authors' MCTformer/CTI never do (§16.1)
    token_init: str = "auto"  # class tokens: copy (the backbone's token repeated C times, as the papers) |
    # independent (C random draws) | auto (copy with pretrained weights, independent from scratch)
    pooling: str = "gwrp"  # gap | gmp | gwrp (patch-token class scores; V2 uses gap)
    gwrp_decay: float = 0.996
    cls_loss_weight: float = 1.0  # alpha in Eq. 6/12
    patch_loss_weight: float = 1.0  # beta
    cct_weight: float = 1.0  # gamma; 0 disables contrastive class tokens
    cct_layers: int = 0  # number of last layers with CCT; 0 = every layer (the paper's choice)


@dataclass
class TrainConfig:
    epochs: int = 45
    batch_size: int = 32  # global batch (split over DDP ranks)
    lr: float = 5e-4  # base lr, scaled by batch_size / lr_base_batch as in DeiT
    lr_base_batch: int = 512
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    augment: str = "deit"  # deit (RandomResizedCrop+flip+RandAugment+RandomErasing, as timm) | simple (crop+flip)
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    color_jitter: float = 0.0  # the authors' 0.4 is inert under RandAugment in timm (§16.2); > 0 adds it
    # epoch: timm's cosine stepped after each epoch, as the authors (§16.4) | epoch_ahead: stepped with
    # epoch + 1 (CTI's step(epo+1)) | step: per optimiser step
    lr_schedule: str = "epoch"
    decay_pos_embed: str = "auto"  # weight decay on position embeddings: auto (as the authors' code: decayed
    # for MCTformer+, not for V1/V2, §16.3) | true | false
    amp: str = "auto"  # auto (bf16 on CUDA/CPU-off) | bf16 | fp16 | none
    grad_clip: float = 0.0  # 0 = off (as the authors)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0  # steps between checkpoints; 0 = end of every epoch only
    eval_every: int = 1  # epochs between val mAP evaluations; 0 = never
    max_steps: int = 0  # stop after this many optimiser steps (0 = run all epochs)
    compile: bool = False
    optimizer: str = "auto"  # auto (the method's) | adamw (warm-up + cosine) | sgd (poly decay)
    fused_optimizer: bool = True  # fused AdamW/SGD kernels where torch has them, in every training loop (same numbers)
    momentum: float = 0.9  # sgd
    poly_power: float = 0.9  # sgd
    tensorboard: bool = False  # scalars under <output_dir>/tensorboard (pip install "tokenseg[tensorboard]")
    keep_best: bool = False  # also keep checkpoint_best.pt, the epoch with the best val mAP (MMCST's selection)


@dataclass
class MapsConfig:
    split: str = "train"
    scales: list = field(default_factory=lambda: [1.0, 0.75, 1.25])
    flip: bool = True
    layers: int = 12  # K: class-to-patch attention from the last K layers
    layer_reduce: str = "mean"  # mean (MCTformer+) | sum (V1/V2)
    fusion: str = "sqrt"  # sqrt (MCTformer+) | product (V2)
    kinds: list = field(default_factory=list)  # map kinds to make; [] = the method's default kinds
    batch_size: int = 8
    dtype: str = "fp32"  # fp32 | bf16
    overlays: bool = False
    size_rounding: str = "auto"  # auto (the method's) | round (nearest multiple of the patch) | floor (authors) | ceil | none
    # auto (the method's exact default: the authors' inference where the method has a separate one) |
    # authors (their inference exactly: batch 1, PIL resize, floor to the patch) | tokenseg (batched; deviations)
    mode: str = "auto"
    save_dtype: str = "float32"  # float32 (exact; the authors save float32 .npy) | float16 (half the disk, ~2e-4)
    max_side: int = 0  # cap the longest side of the largest view (px; 0 = no cap); seeds stay at image size
    memory_mb: int = 2048  # batch images by this estimated peak memory as well as by maps.batch_size


@dataclass
class EvalConfig:
    split: str = "train"
    t_min: float = 0.0
    t_max: float = 0.99
    t_step: float = 0.01
    early_stop: bool = False  # stop at the first threshold that does not improve, as the authors' --curve
    miou_classes: str = "all"  # all (every class, IoU 0 if never seen: MCTformer) | present (classes with gt or
    # prediction pixels) | gt (classes with ground-truth pixels: CLIP-ES)
    background: str = "constant"  # constant (threshold grid) | power ((1-max)^alpha, CLIP-ES) | channel (POT, CTI)
    alpha: float = 2.0  # power background exponent
    alphas: list = field(default_factory=list)  # power: sweep these exponents, keep the best (CLIP-ES: [1, 2])
    wsol_size: int = 224  # --wsol: maps and masks resized to this square, as wsolevaluation; 0: mask size
    wsol_interp: str = "bilinear"  # --wsol: how the maps are resized (wsolevaluation: cv2 bilinear)
    wsol_step: float = 0.001  # --wsol: width of the score bins (wsolevaluation's cam_curve_interval)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pseudo: "PseudoConfig" = field(default_factory=lambda: PseudoConfig())
    segment: "SegmentConfig" = field(default_factory=lambda: SegmentConfig())
    # the methods' own sections (``cti``, ``otpl``, ...), declared by each method module
    sections: dict = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        """``cfg.cti`` etc.: a method's section, created with its defaults on first use."""
        sections = self.__dict__.get("sections")
        if name.startswith("__") or sections is None:
            raise AttributeError(name)
        if name not in sections:
            cls = _section_class(name)
            if cls is None:
                raise AttributeError(f"config has no section {name!r}")
            sections[name] = cls()
        return sections[name]

    def to_dict(self) -> dict:
        out = {f.name: dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(self, f.name)) else v
               for f in dataclasses.fields(self) if f.name != "sections"}
        out.update({k: dataclasses.asdict(v) for k, v in self.sections.items()})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())


def _section_class(name: str) -> type | None:
    from ..core.registry import section_config

    return section_config(name)


# --------------------------------------------------------------------------------------------
# Post-processing and segmentation stage (tokenseg.refine, tokenseg.segment; METHODS.md §7, §10.6)
# --------------------------------------------------------------------------------------------

@dataclass
class IRNConfig:
    """IRN mask step (``pseudo.refine=irn``, ``pseudo.irn.*``; Ahn et al., CVPR 2019; METHODS.md §7.2)."""

    variant: str = "irn"  # irn (threshold the walked maps) | pot (POT's own background channel, cams^1.5)
    # 1. IR labels: confident foreground / background = argmax of [background, maps], CRF'd; disagreement -> 255
    fg_threshold: float = 0.30  # irn: background score of the confident-foreground labels (conf_fg_thres)
    bg_threshold: float = 0.05  # irn: background score of the confident-background labels (conf_bg_thres)
    pot_fg_scale: float = 1.0  # pot: seed background x this for the confident-foreground labels [I]
    pot_bg_scale: float = 1.0  # pot: ... for the confident-background labels; 1 and 1 = POT's code (no 255 band)
    label_crf: bool = True  # DenseCRF on each label map (IRN's crf_inference_label)
    crf_preset: str = "irn"  # t=10, Gaussian 3/3, bilateral 50/5/10; pseudo.crf_* values >= 0 override it
    crf_gt_prob: float = 0.7  # unary: the label's probability (the rest shared by the other labels)
    # 2. the network (frozen timm ResNet + boundary and displacement branches)
    backbone: str = "resnet50"  # any timm ResNet
    pretrained: bool = False  # timm ImageNet weights (online); the papers start from ImageNet
    weights: str = ""  # local ImageNet weights file for the backbone (offline alternative)
    freeze_backbone: bool = True  # as IRN (detached features, frozen BN); false also trains the backbone [I]
    displacement: bool = True  # train the displacement branch too (only instance masks use it)
    crop: int = 512
    scale_range: list = field(default_factory=lambda: [0.5, 1.5])
    batch_size: int = 32
    epochs: int = 3
    max_steps: int = 0  # stop after this many steps (0 = all epochs)
    lr: float = 0.1  # boundary branch (and backbone if trained); the displacement branch gets 10x
    weight_decay: float = 1e-4
    momentum: float = 0.9  # the papers' intent; 1e-4 = what their PolyOptimizer runs (METHODS.md §16.16)
    poly_power: float = 0.9
    train_radius: int = 10  # pair radius of the loss (IRN's PathIndex radius=10)
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0 = end of every epoch only)
    num_workers: int = -1  # data loader processes; -1 = data.num_workers
    # 3. random walk on boundary affinities -> masks
    beta: float = 10.0  # affinity exponent
    exp_times: int = 8  # 2^exp_times walk steps
    radius: int = 5  # neighbourhood of the walk
    sem_bg_threshold: float = 0.25  # irn: background score after rw / max(rw)
    pot_power: float = 1.5  # pot: the walked maps are [background, maps]^pot_power
    walk: str = "banded"  # banded (shifted-tensor products) | sparse (torch CSR matmul); same result
    walk_dtype: str = "float64"  # float64: the exact walk (1e-12 of a dense reference) | float32: ~1.5x faster on
    # a CPU, drifts up to ~1e-4 over 256 steps (the authors' float32 dense squaring: ~3e-5)
    infer_batch: int = 4  # images per network batch (the walk takes as many of them at once as fit the CPU cache)


@dataclass
class PseudoConfig:
    """Seeds -> pseudo masks (``tokenseg pseudo``). Recipes: see README "Pseudo masks".

    A negative ``crf_*`` number means "take the value of ``crf_preset``"."""

    split: str = ""  # split the seeds cover; "" = maps.split
    kind: str = ""  # seed kind under <output_dir>/seeds/[<split>/]; "" = fused_affinity if made, ...
    background: str = "constant"  # constant (score `threshold`) | power ((1 - max)^alpha) | channel (the seed's)
    threshold: float = 0.39  # constant background score (PSA's bg_thr, "optimal for seeds")
    alpha: float = 1.0  # power background exponent (CLIP-ES: 1)
    refine: str = "none"  # none | attention (training-free attention random walk) | affinitynet (PSA)
    crf: bool = False  # DenseCRF on the final probabilities
    crf_preset: str = "psa"  # psa | mctformer-seg | clip-es
    crf_backend: str = "auto"  # auto (pydensecrf if installed, else torch) | pydensecrf | torch
    crf_iters: int = -1
    crf_gauss_sxy: float = -1.0
    crf_gauss_compat: float = -1.0
    crf_bi_sxy: float = -1.0
    crf_bi_srgb: float = -1.0
    crf_bi_compat: float = -1.0
    crf_exact_pixels: int = 4096  # torch backend: exact up to this many pixels, approximated above
    crf_image: str = "rgb"  # rgb | clip-es-code (their BGR mean-subtracted, wrapped uint8 image, §16.17)
    confidence: float = 0.0  # pixels whose final probability is below this become 255 (CLIP-ES 0.95)
    workers: int = 0  # processes for per-image work (0 = in-process)
    device: str = "auto"  # for refine=attention / affinitynet
    amp: str = "auto"  # AffinityNet / IRN training: auto (bf16 on CUDA, none on the CPU) | bf16 | fp16 | none
    # refine=attention: T = row-normalised(aff^beta), applied attn_t times (beta=1, t=1: MCTformer Eq. 3)
    checkpoint: str = ""  # classification checkpoint; "" = <output_dir>/checkpoint.pt
    attn_beta: float = 1.0
    attn_t: int = 1
    attn_layers: int = 0  # p2p attention summed over the last N layers (0 = all, as MCTformer)
    # refine=affinitynet (PSA, METHODS.md §7.1)
    aff_backbone: str = "resnet50"  # timm ResNet (ResNet-38 is not in timm)
    aff_pretrained: bool = False  # timm ImageNet weights (online)
    aff_weights: str = ""  # local ImageNet weights file for the backbone (offline)
    aff_alpha_low: float = 1.0  # "low alpha" CRF labels: confident foreground
    aff_alpha_high: float = 12.0  # "high alpha" CRF labels: confident background
    aff_radius: int = 5
    aff_crop: int = 448
    aff_batch_size: int = 8
    aff_epochs: int = 5
    aff_lr: float = 0.01
    aff_weight_decay: float = 5e-4
    aff_max_steps: int = 0  # stop after this many steps (0 = all epochs)
    aff_seed: int = 0  # AffinityNet's initialisation, augmentation and data order (was segment.seed's)
    rw_beta: float = 8.0
    rw_logt: int = 6  # 2^logt random-walk steps
    rw_bg: float = 0.39  # constant background score before the walk
    irn: "IRNConfig" = field(default_factory=lambda: IRNConfig())  # refine=irn (METHODS.md §7.2)


@dataclass
class SegmentConfig:
    """The segmentation network trained on pseudo masks (``tokenseg segment``; METHODS.md §7.4)."""

    arch: str = "deeplabv2"  # deeplabv2 (ResNet + ASPP) | vit (timm ViT + conv decoder)
    backbone: str = "resnet101"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False  # timm ImageNet weights (online); the papers start from ImageNet
    weights: str = ""  # local backbone weights file (offline alternative to pretrained)
    output_stride: int = 8
    feature_stage: int = -1  # timm features_only stage feeding the head (-1 = last)
    aspp_dilations: list = field(default_factory=lambda: [6, 12, 18, 24])
    decoder_dim: int = 256  # vit decoder width
    freeze_bn: bool = True  # freeze backbone BatchNorm when starting from weights (not at random init)
    masks: str = ""  # pseudo-mask folder; "" = <output_dir>/pseudo
    train_split: str = ""  # "" = data.train_split
    val_split: str = ""  # "" = data.val_split
    epochs: int = 20  # ~20k iterations at batch 10 on VOC train_aug
    max_steps: int = 0
    batch_size: int = 10
    optimizer: str = "sgd"  # sgd (the papers) | adamw (faster from scratch, e.g. the demo)
    lr: float = 2.5e-4
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    crop_size: int = 321
    scale_range: list = field(default_factory=lambda: [0.7, 1.3])
    flip: bool = True
    amp: str = "auto"  # auto (CUDA only) | bf16 | fp16 | none
    device: str = "auto"
    seed: int = 0
    num_workers: int = -1  # -1 = data.num_workers
    checkpoint_every: int = 0  # steps between checkpoints (0 = every epoch)
    eval_at_end: bool = True
    final_eval: str = "quick"  # the val score after segment train: quick (scale 1, no flip, no CRF) | full
    # (eval_scales + eval_flip: a multi-scale pass at full resolution, often longer than training) | none
    eval_scales: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    eval_flip: bool = True
    eval_merge: str = "max"  # max (MCTformer: max over scales) | mean
    eval_crf: bool = False
    crf_preset: str = "mctformer-seg"


CRF_PRESET_NAMES = ("psa", "mctformer-seg", "clip-es", "irn")
