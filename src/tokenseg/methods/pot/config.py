"""POT's config section (``pot.*``), its resolved options and the keys it refuses."""
from __future__ import annotations

import dataclasses
from typing import ClassVar
from dataclasses import dataclass, field


from ...config import Config
from ...core.errors import TokensegError
from .model import CODE_CLUSTERS


PAPER_KINDS = ("pot", "cam")
CODE_KINDS = ("is_cam", "is_cam1", "is_cam_sum")
DEFAULT_KIND = "pot"
CODE_MOMENTUM = 1e-4  # what their PolyOptimizerSGD runs: the weight-decay value lands in SGD's momentum (§16.16)


@dataclass
class POTConfig:
    """``pot.*``. ``auto`` values follow ``pot.mode`` (paper | code)."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "pot.output_stride": ">=1", "pot.new_lr_mult": ">0", "pot.resize_long": ">=1", "pot.crop": ">=1",
        "pot.resize": ">=1", "pot.tau": ">=0", "pot.clusters": ">=0", "pot.kmeans_iters": ">=1",
        "pot.marginal_temperature": ">0", "pot.ot_eps": ">0", "pot.ot_iters": ">=1", "pot.ot_thresh": ">=0",
        "pot.cls_weight": ">=0", "pot.con_weight": ">=0", "pot.start_epoch": ">=0", "pot.seed": ">=0"}

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
    # epoch (0-based) from which the consistency term counts; before it a step trains the classifier alone and
    # skips the prototype stages (0 = from the start, the paper and the code; the demo from scratch: later)
    start_epoch: int = 0
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


def con_active(pc, epoch: int) -> bool:
    """Whether a training step of ``epoch`` computes the consistency term (and so the prototype stages)."""
    return pc.con_weight > 0 and epoch >= pc.start_epoch


def _stage_options(pc):
    """``cfg.pot`` with the resolved cluster count, for :func:`~tokenseg.models.pot.paper_stage`."""
    return dataclasses.replace(pc, clusters=clusters_of(pc))


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
    if pc.mode == "code" and list(cfg.maps.kinds) == [DEFAULT_KIND]:
        cfg.maps.kinds = ["is_cam_sum", "is_cam1"]  # what their eval_cam.py scores, and what IRN reads
    if pc.mode == "code" and cfg.pseudo.kind == "pot" and "pot" not in cfg.maps.kinds:
        cfg.pseudo.kind = "is_cam1"  # the masks come from the seeds code mode makes (their IRN reads IS_CAM1)
    if pc.clip_seeds or any(k in CODE_KINDS for k in cfg.maps.kinds):
        cfg.maps.mode = "authors"  # POT's own loop: the generic pipeline passes no per-image seeds
