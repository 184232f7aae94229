"""Typed configs with the papers' defaults, YAML presets and ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(name_or_path, overrides)`` starts from the
dataclass defaults, applies a preset (a YAML file shipped in ``tokenseg/configs`` or a user file,
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

from .io import TokensegError, write_text_atomic

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class SyntheticConfig:
    """The built-in synthetic dataset (see ``tokenseg.data.synthetic``)."""

    num_classes: int = 5
    image_size: int = 96
    train_images: int = 2000
    val_images: int = 300
    seed: int = 0
    cooccurrence: float = 0.8  # probability that a class sits on its "home" background


@dataclass
class DataConfig:
    format: str = "voc"  # voc | coco | folder | synthetic
    root: str = ""
    train_split: str = "train_aug"
    val_split: str = "val"
    labels_file: str = ""  # image-level labels (JSON/CSV); empty: the reader's default source
    mask_dir: str = "SegmentationClass"
    class_names_file: str = ""
    cache_dir: str = ""  # where derived data (synthetic set, COCO masks) goes; default ~/.cache/tokenseg
    num_workers: int = 2
    skip_bad: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    method: str = "mctformer-plus"  # mctformer-v1 | mctformer-v2 | mctformer-plus
    backbone: str = "deit_small_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: Any = False  # False | True (timm weights, online) | path to a local weights file
    img_size: int = 448
    drop_path: float = 0.1
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
    augment: str = "deit"  # deit (RandomResizedCrop+RandAugment+ColorJitter+RandomErasing) | simple
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    amp: str = "auto"  # auto (bf16 on CUDA/CPU-off) | bf16 | fp16 | none
    grad_clip: float = 0.0  # 0 = off (as the authors)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 0  # steps between checkpoints; 0 = end of every epoch only
    eval_every: int = 1  # epochs between val mAP evaluations; 0 = never
    max_steps: int = 0  # stop after this many optimiser steps (0 = run all epochs)
    compile: bool = False


@dataclass
class MapsConfig:
    split: str = "train"
    scales: list = field(default_factory=lambda: [1.0, 0.75, 1.25])
    flip: bool = True
    layers: int = 12  # K: class-to-patch attention from the last K layers
    layer_reduce: str = "mean"  # mean (MCTformer+) | sum (V1/V2)
    fusion: str = "sqrt"  # sqrt (MCTformer+) | product (V2)
    kinds: list = field(default_factory=lambda: ["fused_affinity"])
    batch_size: int = 8
    dtype: str = "fp32"  # fp32 | bf16
    overlays: bool = False
    size_rounding: str = "round"  # round: resize to a multiple of the patch; floor: authors' crop


@dataclass
class EvalConfig:
    split: str = "train"
    t_min: float = 0.0
    t_max: float = 0.99
    t_step: float = 0.01
    early_stop: bool = False  # stop at the first decrease, as the authors' evaluation.py
    background: str = "constant"  # constant (threshold grid) | power ((1-max)^alpha, CLIP-ES)
    alpha: float = 2.0


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_yaml())


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _merge(obj: Any, updates: dict, where: str) -> None:
    if not isinstance(updates, dict):
        raise TokensegError(f"config section {where or '<root>'!r} must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
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
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise TokensegError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise TokensegError(f"{p}: config file not found")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.exists():
        raise TokensegError(
            f"unknown preset {name_or_path!r}; presets: {', '.join(available_presets())} (or a YAML path)")
    return preset


def _apply_file(cfg: Config, path: Path, depth: int = 0) -> None:
    if depth > 8:
        raise TokensegError(f"{path}: 'preset:' chain too deep")
    data = _read_yaml(path)
    base = data.pop("preset", None)
    if base:
        _apply_file(cfg, _resolve_preset(str(base)), depth + 1)
    try:
        _merge(cfg, data, "")
    except TokensegError as exc:
        raise TokensegError(f"{path}: {exc}") from None


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
    if name_or_path:
        _apply_file(cfg, _resolve_preset(name_or_path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


METHODS = ("mctformer-v1", "mctformer-v2", "mctformer-plus")
MAP_KINDS = ("attention", "attention_affinity", "patchcam", "fused", "fused_affinity")


def validate(cfg: Config) -> None:
    def choice(key: str, value: Any, options: Sequence[Any]) -> None:
        if value not in options:
            raise TokensegError(f"config key {key!r} must be one of {list(options)}, got {value!r}")

    choice("model.method", cfg.model.method, METHODS)
    choice("model.pooling", cfg.model.pooling, ("gap", "gmp", "gwrp"))
    choice("train.augment", cfg.train.augment, ("deit", "simple"))
    choice("train.amp", cfg.train.amp, ("auto", "bf16", "fp16", "none"))
    choice("maps.layer_reduce", cfg.maps.layer_reduce, ("mean", "sum"))
    choice("maps.fusion", cfg.maps.fusion, ("sqrt", "product"))
    choice("maps.dtype", cfg.maps.dtype, ("fp32", "bf16"))
    choice("maps.size_rounding", cfg.maps.size_rounding, ("round", "floor"))
    choice("eval.background", cfg.eval.background, ("constant", "power"))
    for k in cfg.maps.kinds:
        choice("maps.kinds[]", k, MAP_KINDS)
    if cfg.model.method == "mctformer-v1":
        for k in cfg.maps.kinds:
            if k not in ("attention", "attention_affinity"):
                raise TokensegError(f"maps.kinds: {k!r} needs a PatchCAM head, which mctformer-v1 has not")
    if not cfg.maps.scales or any(s <= 0 for s in cfg.maps.scales):
        raise TokensegError("maps.scales must be a non-empty list of positive numbers")
    if cfg.train.batch_size < 1 or cfg.maps.batch_size < 1:
        raise TokensegError("batch sizes must be >= 1")
