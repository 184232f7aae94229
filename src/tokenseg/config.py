"""Typed configs with the papers' defaults, YAML presets and ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(name_or_path, overrides)`` starts from the
dataclass defaults, applies a preset (a YAML file shipped in ``tokenseg/configs`` or beside its method in
``tokenseg/methods/<name>/presets``, or a user file,
which may itself name a ``preset:`` to start from), then the overrides. Unknown keys are errors that
name the key and suggest the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .core.errors import TokensegError
from .core.files import write_text_atomic

PRESET_DIR = Path(__file__).parent / "configs"  # the generic presets (tiny, demo, photos)
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


def preset_files() -> dict[str, Path]:
    """Every shipped preset by name: ``configs/*.yaml`` and ``methods/<name>/presets/*.yaml``."""
    files: dict[str, Path] = {}
    for path in [*PRESET_DIR.glob("*.yaml"), *sorted(PRESET_DIR.parent.glob(f"{METHOD_PRESETS}/*.yaml"))]:
        if path.stem in files:
            raise TokensegError(f"preset {path.stem!r} is shipped twice: {files[path.stem]} and {path}")
        files[path.stem] = path
    return files


def available_presets() -> list[str]:
    return sorted(preset_files())


def _section_class(name: str) -> type | None:
    from .core.registry import section_config

    return section_config(name)


def _merge(obj: Any, updates: dict, where: str) -> None:
    if not isinstance(updates, dict):
        raise TokensegError(f"config section {where or '<root>'!r} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj) if f.name != "sections"}
    for key, value in updates.items():
        full = f"{where}.{key}" if where else key
        if isinstance(obj, Config) and key not in names and _section_class(key) is not None:
            _merge(getattr(obj, key), value, key)  # a method's own section
            continue
        if key not in names:
            if isinstance(obj, Config):
                from .core.registry import available_methods, get_method

                names = {**names, **{s: None for m in available_methods() if (s := get_method(m).section)}}
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
            raise TokensegError(f"unknown config key {full!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full)
        else:
            setattr(obj, key, _coerce(value, current, full))


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Check a value against the default's type (ints widen to floats)."""
    if current is None or value is None or key == "model.pretrained":
        return value
    if isinstance(current, str) and isinstance(value, bool):  # e.g. decay_pos_embed: true
        return "true" if value else "false"
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise TokensegError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (int, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return type(current)(float(value)) if isinstance(current, float) else int(value)
        except ValueError:
            pass
    if isinstance(current, list) and isinstance(value, (int, float)):
        return [value]
    if type(current) is not type(value):
        raise TokensegError(
            f"config key {key!r} expects {type(current).__name__}, got {value!r} ({type(value).__name__})")
    return value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TokensegError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise TokensegError(f"{path}: a config file must be a mapping")
    return data


def _resolve_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    # a file by that name wins over a preset; a folder does not (`tokenseg demo` writes runs/demo, and a
    # folder called "demo" in the working directory must not shadow the preset)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise TokensegError(f"{p}: config file not found" if not p.exists() else f"{p}: not a file")
        return p
    preset = preset_files().get(name_or_path)
    if preset is None:
        raise TokensegError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(available_presets())} (or a YAML path)")
    return preset


def _apply_file(cfg: Config, path: Path, depth: int = 0, user_keys: set | None = None) -> None:
    if depth > 8:
        raise TokensegError(f"{path}: 'preset:' chain too deep")
    data = _read_yaml(path)
    base = data.pop("preset", None)
    if base:
        _apply_file(cfg, _resolve_preset(str(base)), depth + 1, user_keys)
    try:
        _merge(cfg, data, "")
    except TokensegError as exc:
        raise TokensegError(f"{path}: {exc}") from None
    if user_keys is not None:
        if path.resolve() in {p.resolve() for p in preset_files().values()}:
            cfg.__dict__["_preset_splits"] = _split_snapshot(cfg)
        else:
            user_keys |= _flat_keys(data)


# the stage splits that follow the dataset's own splits when a user points a preset at another format
STAGE_SPLIT_KEYS = ("maps.split", "eval.split", "pseudo.split")


def _flat_keys(data: dict, prefix: str = "") -> set:
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        out |= _flat_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


def _split_snapshot(cfg: Config) -> dict:
    return {"data.format": cfg.data.format, "data.train_split": cfg.data.train_split,
            "data.val_split": cfg.data.val_split, "maps.split": cfg.maps.split, "eval.split": cfg.eval.split,
            "pseudo.split": cfg.pseudo.split}


def follow_dataset_splits(cfg: Config, preset: dict | None, user_keys: set) -> None:
    """A preset's stage splits (``maps.split``, ``eval.split``, ``pseudo.split``) name its own dataset's
    splits (VOC's ``train``). When the user points the preset at another data.format, each stage split
    the user did not set follows the dataset's splits instead: the preset's validation split becomes
    ``data.val_split``, any other ``data.train_split``."""
    if not preset or cfg.data.format == preset["data.format"]:
        return
    for key in STAGE_SPLIT_KEYS:
        section, name = key.split(".")
        value = preset[key]
        if key in user_keys or not value:
            continue
        follow = cfg.data.val_split if value == preset["data.val_split"] else cfg.data.train_split
        setattr(getattr(cfg, section), name, follow)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise TokensegError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "")
    return cfg


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a config: dataclass defaults ← preset/YAML file ← ``key=value`` overrides."""
    cfg = Config()
    user_keys: set = set()
    if name_or_path:
        _apply_file(cfg, _resolve_preset(name_or_path), user_keys=user_keys)
    apply_overrides(cfg, overrides)
    user_keys |= {".".join(parse_override(o)[0]) for o in overrides}
    follow_dataset_splits(cfg, cfg.__dict__.pop("_preset_splits", None), user_keys)
    validate(cfg)
    return cfg


# The natural range of every numeric key (lists: of each element), checked by :func:`validate_ranges` before any
# work. ">0", ">=0", ">=1", ... bounds; "[0,1]", "(0,1]", "[0,1)" intervals; "any" any finite number. A method's
# own section declares its ranges as ``RANGES`` on its config class. tests/test_faults.py fails for a numeric
# key that has none.
RANGES: dict[str, str] = {
    "data.num_workers": ">=0", "data.synthetic.num_classes": ">=1", "data.synthetic.image_size": ">=32",
    "data.synthetic.train_images": ">=1", "data.synthetic.val_images": ">=0", "data.synthetic.seed": ">=0",
    "data.synthetic.cooccurrence": "[0,1]", "data.synthetic.object_scale": ">0",
    "model.img_size": ">=1", "model.drop_path": "[0,1)", "model.gwrp_decay": "(0,1]", "model.cls_loss_weight": ">=0",
    "model.patch_loss_weight": ">=0", "model.cct_weight": ">=0", "model.cct_layers": ">=0",
    "train.epochs": ">=1", "train.batch_size": ">=1", "train.lr": ">0", "train.lr_base_batch": ">=1",
    "train.weight_decay": ">=0", "train.warmup_epochs": ">=0", "train.warmup_lr": ">=0", "train.min_lr": ">=0",
    "train.crop_scale": ">0", "train.color_jitter": ">=0", "train.grad_clip": ">=0", "train.seed": ">=0",
    "train.checkpoint_every": ">=0", "train.eval_every": ">=0", "train.max_steps": ">=0", "train.momentum": "[0,1)",
    "train.poly_power": ">=0",
    "maps.scales": ">0", "maps.layers": ">=1", "maps.batch_size": ">=1", "maps.max_side": ">=0",
    "maps.memory_mb": ">=1",
    "eval.t_min": "[0,1]", "eval.t_max": "[0,1]", "eval.t_step": "(0,1]", "eval.alpha": ">0", "eval.alphas": ">0",
    "eval.wsol_size": ">=0", "eval.wsol_step": "(0,1)",
    "pseudo.threshold": "[0,1]", "pseudo.alpha": ">0", "pseudo.crf_iters": "any", "pseudo.crf_gauss_sxy": "any",
    "pseudo.crf_gauss_compat": "any", "pseudo.crf_bi_sxy": "any", "pseudo.crf_bi_srgb": "any",
    "pseudo.crf_bi_compat": "any", "pseudo.crf_exact_pixels": ">=0", "pseudo.confidence": "[0,1]",
    "pseudo.workers": ">=0", "pseudo.attn_beta": ">0", "pseudo.attn_t": ">=0", "pseudo.attn_layers": ">=0",
    "pseudo.aff_alpha_low": ">0", "pseudo.aff_alpha_high": ">0", "pseudo.aff_radius": ">=1", "pseudo.aff_crop": ">=16",
    "pseudo.aff_batch_size": ">=1", "pseudo.aff_epochs": ">=1", "pseudo.aff_lr": ">0", "pseudo.aff_weight_decay": ">=0",
    "pseudo.aff_seed": ">=0",
    "pseudo.aff_max_steps": ">=0", "pseudo.rw_beta": ">0", "pseudo.rw_logt": ">=0", "pseudo.rw_bg": "[0,1]",
    "pseudo.irn.fg_threshold": "[0,1]", "pseudo.irn.bg_threshold": "[0,1]", "pseudo.irn.pot_fg_scale": ">0",
    "pseudo.irn.pot_bg_scale": ">0", "pseudo.irn.crf_gt_prob": "(0,1)", "pseudo.irn.crop": ">=16",
    "pseudo.irn.scale_range": ">0", "pseudo.irn.batch_size": ">=1", "pseudo.irn.epochs": ">=1",
    "pseudo.irn.max_steps": ">=0", "pseudo.irn.lr": ">0", "pseudo.irn.weight_decay": ">=0",
    "pseudo.irn.momentum": "[0,1)", "pseudo.irn.poly_power": ">=0", "pseudo.irn.train_radius": ">=1",
    "pseudo.irn.seed": ">=0", "pseudo.irn.checkpoint_every": ">=0", "pseudo.irn.num_workers": ">=-1",
    "pseudo.irn.beta": ">0", "pseudo.irn.exp_times": ">=0", "pseudo.irn.radius": ">=1",
    "pseudo.irn.sem_bg_threshold": "[0,1]", "pseudo.irn.pot_power": ">0", "pseudo.irn.infer_batch": ">=1",
    "segment.output_stride": ">=1", "segment.feature_stage": "any", "segment.aspp_dilations": ">=1",
    "segment.decoder_dim": ">=1", "segment.epochs": ">=0", "segment.max_steps": ">=0", "segment.batch_size": ">=1",
    "segment.lr": ">0", "segment.head_lr_mult": ">0", "segment.momentum": "[0,1)", "segment.weight_decay": ">=0",
    "segment.poly_power": ">=0", "segment.crop_size": ">=8", "segment.scale_range": ">0", "segment.seed": ">=0",
    "segment.num_workers": ">=-1", "segment.checkpoint_every": ">=0", "segment.eval_scales": ">0",
}


def range_problem(value: Any, spec: str) -> str:
    """Why ``value`` is outside ``spec`` (e.g. "must be > 0"), or "" when it is inside."""
    import math

    if not math.isfinite(value):
        return "must be a finite number" if spec == "any" else f"{_spell(spec)} (a finite number)"
    if spec == "any":
        return ""
    if spec[0] in "[(":
        lo, hi = (float(x) for x in spec[1:-1].split(","))
        ok = (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)
    else:
        op, bound = (spec[:2], spec[2:]) if spec[1] == "=" else (spec[:1], spec[1:])
        ok = value >= float(bound) if op == ">=" else value > float(bound)
    return "" if ok else _spell(spec)


def _spell(spec: str) -> str:
    if spec[0] in "[(":
        return f"must be in {spec.replace(',', ', ')}"
    return f"must be {spec[:2] + ' ' + spec[2:] if spec[1] == '=' else spec[0] + ' ' + spec[1:]}"


def numeric_fields(obj: Any, prefix: str) -> list[tuple[str, Any, dict]]:
    """``(key, value, ranges)`` for every numeric field (numbers and lists of numbers) of a config section and
    its sub-sections; ``ranges`` is the table the key's range is looked up in."""
    table = getattr(type(obj), "RANGES", None) or RANGES
    out = []
    for f in dataclasses.fields(obj):
        if f.name == "sections":
            continue
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.extend(numeric_fields(v, key + "."))
        elif (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                and (v or key in table)):
            out.append((key, v, table))
    return out


def validate_ranges(cfg: Config) -> None:
    """Every numeric key inside its natural range (NaN and inf never): one error naming key, value and range."""
    fields = [x for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(v := getattr(cfg, f.name))
              for x in numeric_fields(v, f"{f.name}.")]
    for name, section in cfg.sections.items():
        fields += numeric_fields(section, f"{name}.")
    for key, value, table in fields:
        spec = table.get(key)
        if spec is None:
            continue
        for x in (value if isinstance(value, list) else [value]):
            problem = range_problem(x, spec)
            if problem:
                shown = value if not isinstance(value, list) else f"{value} (element {x})"
                raise TokensegError(f"config key {key!r} {problem}, got {shown}")
    if cfg.eval.t_min > cfg.eval.t_max:
        raise TokensegError(f"config keys 'eval.t_min' ({cfg.eval.t_min}) and 'eval.t_max' ({cfg.eval.t_max}): "
                            f"t_min must be <= t_max")


def validate(cfg: Config) -> None:
    from .core.registry import get_method

    def choice(key: str, value: Any, options: Sequence[Any]) -> None:
        if value not in options:
            raise TokensegError(f"config key {key!r} must be one of {list(options)}, got {value!r}")

    choice("data.format", cfg.data.format, ("voc", "coco", "folder", "synthetic", "openimages"))
    method = get_method(cfg.model.method)
    for section in (method.section, *method.uses_sections):
        if section:
            getattr(cfg, section)  # the method's own section is always written out with the config
    validate_ranges(cfg)
    choice("model.stem", cfg.model.stem, ("patch", "conv"))
    choice("model.pooling", cfg.model.pooling, ("gap", "gmp", "gwrp"))
    choice("train.augment", cfg.train.augment, ("deit", "simple"))
    choice("train.amp", cfg.train.amp, ("auto", "bf16", "fp16", "none"))
    choice("train.lr_schedule", cfg.train.lr_schedule, ("epoch", "epoch_ahead", "step"))
    choice("train.optimizer", cfg.train.optimizer, ("auto", "adamw", "sgd"))
    choice("train.decay_pos_embed", str(cfg.train.decay_pos_embed).lower(), ("auto", "true", "false"))
    choice("model.token_init", cfg.model.token_init, ("auto", "copy", "independent"))
    if cfg.train.epochs < 1:
        raise TokensegError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    choice("maps.layer_reduce", cfg.maps.layer_reduce, ("mean", "sum"))
    choice("maps.fusion", cfg.maps.fusion, ("sqrt", "product"))
    choice("maps.dtype", cfg.maps.dtype, ("fp32", "bf16"))
    choice("maps.size_rounding", cfg.maps.size_rounding, ("auto", "round", "floor", "ceil", "none"))
    choice("maps.mode", cfg.maps.mode, ("auto", "tokenseg", "authors"))
    choice("eval.background", cfg.eval.background, ("constant", "power", "channel"))
    choice("eval.wsol_interp", cfg.eval.wsol_interp, tuple(INTERPOLATIONS))
    if cfg.eval.wsol_size < 0 or not 0 < cfg.eval.wsol_step < 1:
        raise TokensegError(f"eval.wsol_size must be >= 0 and eval.wsol_step in (0, 1), got "
                            f"{cfg.eval.wsol_size}, {cfg.eval.wsol_step}")
    choice("eval.miou_classes", cfg.eval.miou_classes, ("all", "present", "gt"))
    choice("maps.save_dtype", cfg.maps.save_dtype, ("float16", "float32"))
    if not cfg.maps.kinds:
        cfg.maps.kinds = list(method.recipe.default_kinds)
    method.recipe.check_kinds(cfg.maps.kinds, f"maps.kinds ({method.name})")
    if method.validate is not None:
        method.validate(cfg)
    if not cfg.maps.scales or any(s <= 0 for s in cfg.maps.scales):
        raise TokensegError("maps.scales must be a non-empty list of positive numbers")
    if cfg.train.batch_size < 1 or cfg.maps.batch_size < 1:
        raise TokensegError("batch sizes must be >= 1")
    validate_post(cfg)


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


def validate_post(cfg: Config) -> None:
    """Checks for the ``pseudo`` and ``segment`` sections (called at the end of :func:`validate`)."""
    p, s = cfg.pseudo, cfg.segment

    def choice(key: str, value: Any, options: Sequence[Any]) -> None:
        if value not in options:
            raise TokensegError(f"config key {key!r} must be one of {list(options)}, got {value!r}")

    choice("pseudo.background", p.background, ("constant", "power", "channel"))
    choice("pseudo.refine", p.refine, ("none", "attention", "affinitynet", "irn"))
    choice("pseudo.crf_preset", p.crf_preset, CRF_PRESET_NAMES)
    choice("pseudo.crf_backend", p.crf_backend, ("auto", "pydensecrf", "torch"))
    choice("pseudo.crf_image", p.crf_image, ("rgb", "clip-es-code"))
    choice("segment.arch", s.arch, ("deeplabv2", "vit"))
    choice("pseudo.amp", p.amp, ("auto", "bf16", "fp16", "none"))
    choice("segment.amp", s.amp, ("auto", "bf16", "fp16", "none"))
    choice("segment.optimizer", s.optimizer, ("sgd", "adamw"))
    choice("segment.eval_merge", s.eval_merge, ("max", "mean"))
    choice("segment.final_eval", s.final_eval, ("quick", "full", "none"))
    choice("segment.crf_preset", s.crf_preset, CRF_PRESET_NAMES)
    choice("segment.output_stride", s.output_stride, (8, 16, 32))
    if not 0.0 <= p.confidence <= 1.0:
        raise TokensegError(f"pseudo.confidence must be in [0, 1], got {p.confidence}")
    if p.attn_t < 0 or p.rw_logt < 0 or p.attn_beta <= 0 or p.rw_beta <= 0:
        raise TokensegError("pseudo.attn_t / rw_logt must be >= 0 and attn_beta / rw_beta > 0")
    if p.aff_radius < 1:
        raise TokensegError("pseudo.aff_radius must be >= 1")
    if len(s.scale_range) != 2 or not 0 < s.scale_range[0] <= s.scale_range[1]:
        raise TokensegError(f"segment.scale_range must be [min, max] with 0 < min <= max, got {s.scale_range}")
    if not s.eval_scales or any(x <= 0 for x in s.eval_scales):
        raise TokensegError("segment.eval_scales must be a non-empty list of positive numbers")
    if not s.aspp_dilations or any(int(d) < 1 for d in s.aspp_dilations):
        raise TokensegError("segment.aspp_dilations must be a non-empty list of positive integers")
    if s.batch_size < 1 or s.crop_size < 8 or p.aff_batch_size < 1 or p.aff_crop < 16:
        raise TokensegError("segment.batch_size / crop_size and pseudo.aff_batch_size / aff_crop are too small")
