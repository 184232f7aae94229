"""CLIP-ES (CVPR 2023): training-free seeds from a frozen CLIP (METHODS.md §10, errata §16.17–16.19).

softmax-GradCAM of each present class over [its classes ∪ background words] ("a clean origami {}.",
the authors' synonyms), refined by the class-aware attention affinity (CAA) and gated by boxes — the
computation lives in :mod:`tokenseg.methods.clip_es.gradcam` (equal to the authors' code to 1e-5), the towers in
:mod:`tokenseg.models.clip`. This module makes it a method: its config section, the model (the CLIP
weights of ``model.pretrained``), and its hooks in the one seed loop (PIL resizing of each image to the next multiple of
16, images of one size batched, all present classes' Grad-CAMs from one pass). There is nothing to
train: ``tokenseg maps clip-es ...`` and ``tokenseg run clip-es ...`` need no checkpoint.

Kinds: ``caa`` (the refined maps, their ``attn_highres``: the seeds) and ``gradcam`` (the Grad-CAM
upsampled, their ``highres``). Background: ``(1 − max)^α``, α swept over {1, 2} in evaluation (§16.18).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ...data.transforms import CLIP_MEAN, CLIP_STD
from ...core.seeds import SeedMaps, save_seed, seed_path
from ...core.errors import TokensegError
from .. import MapRecipe, Method, register
from ..base import SeedHooks, SeedJob


@dataclass
class ClipESConfig:
    """``clip_es.*``: prompts, CAA and the authors' quirks (defaults: their VOC script)."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "clip_es.box_threshold": "[0,1]", "clip_es.caa_layers": ">=1", "clip_es.sinkhorn_rounds": ">=0",
        "clip_es.batch_size": ">=0", "clip_es.class_chunk": ">=1"}

    template: str = "a clean origami {}."  # their sharpness-selected prompt, for classes and background words
    synonyms_file: str = ""  # JSON/YAML: class -> name or list of names (VOC/COCO: the authors' synonyms)
    background_words: list = field(default_factory=list)  # [] = the authors' words (VOC 25, COCO 23)
    background_file: str = ""  # or one word per line
    box_threshold: float = 0.0  # CAM boxes at this fraction of the max; 0 = the dataset's (0.4, COCO 0.7)
    caa_layers: int = 8  # attention of the last k layers
    sinkhorn_rounds: int = 3
    refine: bool = True  # CAA (false: Grad-CAM only)
    dtype: str = "auto"  # fp32 | bf16 | fp16 | auto (fp16 on CUDA as the authors, fp32 on the CPU)
    batch_size: int = 0  # images per pass; 0 = 16 on CUDA, 1 on the CPU
    class_chunk: int = 16  # class slots per batched backward (bounds memory on COCO)
    pos_embed_fp16: bool = True  # quirk: the resized position grid rounded to fp16, as their code
    box_quantize: bool = True  # quirk: the box threshold applied after uint8 quantisation of the CAM
    box_clip_last: bool = True  # quirk: boxes never cover the grid's last row/column
    quick_gelu: Any = None  # force QuickGELU (true) / GELU (false); None: OpenAI weights QuickGELU, open_clip's config
    export_npy: bool = False  # also write their {keys, attn_highres} .npy files under <seeds>/npy


def build(cfg, num_classes: int):
    from ...data import cache_root
    from ...models.clip import DEFAULT_ARCH, load_clip, random_clip

    if str(cfg.model.pretrained).lower() == "random":  # a smoke test without any file (as mmcst.clip=random)
        arch = cfg.model.backbone if cfg.model.backbone not in ("", "auto", None) else DEFAULT_ARCH
        model = random_clip(arch, seed=cfg.train.seed, text=True,
                            quick_gelu=True if cfg.clip_es.quick_gelu is None else cfg.clip_es.quick_gelu)
        model.tokenseg_weights = RANDOM_WEIGHTS.format(arch=arch, seed=cfg.train.seed)
        print(f"tokenseg: warning: clip-es: {model.tokenseg_weights}", file=sys.stderr, flush=True)
    else:
        model = load_clip(cfg.model.pretrained, cfg.model.backbone or None, quick_gelu=cfg.clip_es.quick_gelu,
                          cache_dir=cache_root(cfg.data) / "clip")
    return model


RANDOM_WEIGHTS = ("RANDOM weights: a randomly initialised {arch} CLIP tower (model.pretrained=random, seed "
                  "{seed}), not CLIP's: the seeds test the pipeline and mean nothing")


def validate(cfg) -> None:
    c = cfg.clip_es
    if c.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise TokensegError(f"config key 'clip_es.dtype' must be auto, fp32, bf16 or fp16, got {c.dtype!r}")
    if not 0.0 <= c.box_threshold < 1.0 or c.caa_layers < 1 or c.sinkhorn_rounds < 0:
        raise TokensegError("clip_es.box_threshold must be in [0, 1), clip_es.caa_layers >= 1, "
                            "clip_es.sinkhorn_rounds >= 0")


class _ClipInputs(Dataset):
    """An image as CLIP-ES feeds it (PIL bicubic to the next multiple of 16, CLIP mean/std)."""

    def __init__(self, ds, patch: int) -> None:
        self.ds, self.patch = ds, patch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        from ...models.clip_ops import clip_input

        img = self.ds.load_image(i)
        return clip_input(img, self.patch, CLIP_MEAN, CLIP_STD), torch.tensor([img.height, img.width]), i


def _prepare(job: SeedJob) -> tuple:
    """The class and background text features (cached), and the options of the Grad-CAM pass."""
    from ...data import cache_root
    from .gradcam import ClipESOptions
    from .prompts import clip_es_text

    c, cfg = job.cfg.clip_es, job.cfg
    background = c.background_file or (list(c.background_words) if c.background_words else None)
    text = clip_es_text(job.model, job.ds.class_names, cfg.data.format, c.template, c.synonyms_file or None,
                        background, cache_root(cfg.data))
    dtype = c.dtype if c.dtype != "auto" else ("fp16" if job.device.type == "cuda" else "fp32")
    opts = ClipESOptions(box_threshold=c.box_threshold or text.box_threshold, caa_layers=c.caa_layers,
                         sinkhorn_rounds=c.sinkhorn_rounds, refine=c.refine, pos_embed_fp16=c.pos_embed_fp16,
                         box_quantize=c.box_quantize, box_clip_last=c.box_clip_last, class_chunk=c.class_chunk,
                         dtype=dtype)
    return text, opts


def _batches(job: SeedJob, todo: list[int]) -> list[list[int]]:
    from ...data.base import size_batches

    return size_batches(job.ds, todo, job.cfg.clip_es.batch_size or (16 if job.device.type == "cuda" else 1))


def _compute(job: SeedJob, batch) -> tuple:
    from .gradcam import clip_es_maps

    images, sizes, idx = batch
    text, opts = job.state
    labels = [sorted(job.ds.labels[i]) for i in idx.tolist()]
    outs = clip_es_maps(job.model, images.to(job.device), labels, text.fg, text.bg, [tuple(s) for s in sizes.tolist()],
                        opts, intermediates="gradcam" in job.kinds)
    return outs, sizes


def _write(job: SeedJob, result: tuple, idx: list[int]) -> None:
    from .files import save_clip_es_npy

    outs, sizes = result
    text, ds, c = job.state[0], job.ds, job.cfg.clip_es
    for b, (i, o) in enumerate(zip(idx, outs)):
        keys = o.keys.cpu().numpy().astype(np.int64)
        meta = {"method": "clip-es", "image_id": ds.ids[i], "prompts": [text.prompts[k] for k in keys]}
        if c.export_npy:
            save_clip_es_npy(job.out_dir / "npy" / f"{ds.ids[i]}.npy", keys, o.maps.float().cpu().numpy())
        for kind in job.kinds:
            m = o.highres if kind == "gradcam" else o.maps
            if m is None:  # an image without classes
                m = torch.zeros(0, *tuple(sizes[b].tolist()))
            save_seed(seed_path(job.out_dir / kind, ds.ids[i]),
                      SeedMaps(keys, m.float().cpu().numpy(), {**meta, "kind": kind}), job.cfg.maps.save_dtype)


# CLIP-ES's inference in the one seed loop: PIL resizing, one Grad-CAM pass per batch of equal-size
# images (clip_es.batch_size), CAA; the next batch is computed while this one is written
HOOKS = SeedHooks(compute=_compute, write=_write, prepare=_prepare, batches=_batches,
                  dataset=lambda job: _ClipInputs(job.ds, job.model.patch_size), desc="maps (clip-es)")


def _combine(*args, **kwargs):
    raise TokensegError("clip-es makes its seeds with its own loop (tokenseg maps clip-es ...); it has no "
                        "per-view combine")


register(Method(
    name="clip-es", summary="training-free CLIP seeds: softmax-GradCAM + class-aware attention affinity (CVPR 2023)",
    build=build, validate=validate, section="clip_es", section_config=ClipESConfig,
    recipe=MapRecipe(kinds=("caa", "gradcam"), default_kinds=("caa",), combine=_combine, background="power",
                     normalise="none", mean=CLIP_MEAN, std=CLIP_STD, size_rounding="ceil", hooks=HOOKS)))
