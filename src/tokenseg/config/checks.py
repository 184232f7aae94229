"""What a config must satisfy: every numeric key's natural range (``RANGES``), the choices, and the method's
own checks; an error names the key and what to set."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


from ..core.errors import TokensegError
from .sections import CRF_PRESET_NAMES, Config, INTERPOLATIONS



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
    from ..core.registry import get_method

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
