"""What a method declares to the engine: :class:`Method`, its :class:`MapRecipe`, the :class:`StepContext`.

One training loop (:mod:`tokenseg.engine`), one map pipeline (:mod:`tokenseg.maps`) and one checkpoint
format (:mod:`tokenseg.checkpoint`) serve every method; a method only fills these fields. Read
:mod:`tokenseg.methods.cam` for a complete ~50-line example.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class StepContext:
    """Where training stands when a loss is computed (CTI switches terms on after epoch 2)."""

    epoch: int
    step: int
    total_steps: int
    steps_per_epoch: int
    world: int = 1
    rank: int = 0


@dataclass(frozen=True)
class MapRecipe:
    """How a method turns a forward pass into localisation maps.

    ``combine(model, x, labels, classes, cfg, kinds)`` gets one batch of same-size normalised views
    (B', 3, h, w) (a scale of B images and, when flipping, their mirror images), their multi-hot
    ``labels`` (B', C) and ``classes`` — the (K,) class indices present anywhere in the batch — and
    returns ``{kind: (B', K, h', w')}`` maps of those classes on the method's grid (or at the input size).
    Methods with an explicit background also return ``{kind + BACKGROUND: (B', 1, h', w')}``.
    The pipeline does the rest for every method: scales and flips, upsampling to the image, masking by
    the labels, un-flipping, the sum over views and the per-class normalisation, then the seed files."""

    kinds: tuple[str, ...]
    default_kinds: tuple[str, ...]
    combine: Callable[..., dict[str, torch.Tensor]]
    normalise: str = "minmax"  # minmax | maxnorm (CTI: ReLU(x - min - 1e-5)/(max - min + 1e-5)) | max (x/(max+1e-5))
    background: str = "constant"  # constant (a threshold) | power ((1 - max)^alpha) | channel (the method makes one)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size_rounding: str = "round"  # default for maps.size_rounding=auto: round | floor | ceil | none
    size_multiple: int = 0  # 0: the model's patch size
    needs_grad: bool = False  # Grad-CAM methods (CLIP-ES) differentiate inside combine
    # maps.mode=authors: the authors' own inference as hooks of the seed loop (MCTformer, POT's code mode)
    authors: "SeedHooks | None" = None
    # map_extras(cfg, ds) -> None or i -> (N, H, W) float maps of image i, given to combine(..., extras=)
    # with every view (OTPL's CLIP-ES variant: the image's CLIP-ES seeds for its per-image prototypes)
    map_extras: Callable[..., Any] | None = None
    # what maps.mode=auto (the default) runs: "authors" where that inference is the exact one (MCTformer),
    # "tokenseg" where the batched pipeline already follows the authors' code (CTI, CLIP-ES) or none exists
    default_mode: str = "tokenseg"
    # the method's own inference in the seed loop instead of the scale/flip pipeline (CLIP-ES: PIL resizing,
    # one Grad-CAM pass per batch, CAA); None: tokenseg.maps.compute_map_batch with this recipe
    hooks: "SeedHooks | None" = None
    # how reports and galleries name each kind ("fused + patch affinity"); a kind without one shows as is
    titles: dict[str, str] = field(default_factory=dict, hash=False)

    def title(self, kind: str) -> str:
        return self.titles.get(kind, kind)

    def check_kinds(self, kinds, source: str = "") -> None:
        from ..core.errors import TokensegError

        bad = [k for k in kinds if k not in self.kinds]
        if bad:
            raise TokensegError(f"{source + ': ' if source else ''}map kind(s) {', '.join(bad)} are not made by "
                                f"this method; it makes {', '.join(self.kinds)} (e.g. maps.kinds=[{self.default_kinds[0]}])")


@dataclass
class SeedJob:
    """One run of the seed loop, as the hooks see it: what to map, where to, with which settings.
    ``state`` is what ``prepare`` returned (text features, CLIP seeds, ...)."""

    model: nn.Module
    ds: Any  # a WSSSDataset
    out_dir: Any  # Path
    cfg: Any  # Config (maps, the method's section)
    kinds: list[str]
    device: torch.device
    method: str = ""
    meta: dict = field(default_factory=dict)
    export_npy: bool = False  # also / instead the authors' .npy dicts (authors' inference only)
    rank: int = 0
    state: Any = None


@dataclass(frozen=True)
class SeedHooks:
    """A method's own inference inside the one seed loop (:func:`tokenseg.maps.generate_seeds`), which
    owns resuming, sharding, batching, the loader, the progress bar and the background writer.

    compute(job, batch) -> result: the maps of one loader batch (required)
    write(job, result, idx): write the result's seed files (runs on the writer thread)
    prepare(job) -> state: once before the loop (e.g. text features, precomputed CLIP seeds)
    batches(job, todo) -> [[index, ...], ...]: default, images of equal size up to ``maps.batch_size``
    dataset(job) -> a torch Dataset of loader items; default, (uint8 CHW image, multi-hot labels, index)
    collate: the loader's collate_fn (None: torch's default)
    npy: with ``export_npy`` the seed files are ``<id>.npy`` (their format), else ``<id>.npz``
    """

    compute: Callable[[SeedJob, Any], Any]
    write: Callable[[SeedJob, Any, list], None]
    prepare: Callable[[SeedJob], Any] | None = None
    batches: Callable[[SeedJob, list], list] | None = None
    dataset: Callable[[SeedJob], Any] | None = None
    collate: Callable | None = None
    npy: bool = False
    desc: str = "maps"


BACKGROUND = "@background"  # suffix of a recipe's explicit background map
IMAGENET = "imagenet"  # the layout a Converter claims for a plain ImageNet ViT it can start from


@dataclass(frozen=True)
class Converter:
    """The authors' checkpoint layouts of one method family, both ways (``tokenseg convert``).

    claims(state_dict) -> the layout name when the (unwrapped) state dict is one of this family's own
        layouts, ``IMAGENET`` for a plain ImageNet ViT it can start from, else None (a cheap key test)
    load(obj, source, method, num_classes, class_names, num_heads, path) -> (model, cfg, class names):
        our model from such a file (``method`` None: the one the file implies); a clear error when the
        file does not fit ``method``
    export(state_dict, method) -> our weights in the authors' layout of ``method``
    """

    title: str  # how messages name the family: "MCTformer", "CTI"
    marks: str  # what its files have, for messages: "bg_token, tokenizer"
    claims: Callable[[dict], str | None]
    load: Callable[..., Any]
    export: Callable[[dict, str], dict]
    wrap: bool = False  # their code saves {'model': state_dict} (MCTformer) rather than the bare dict (CTI)


def image_only(transform: Callable) -> Callable:
    """Adapt an image transform to the view signature ``view(image, extras) -> (tensor, extras)``."""

    def view(image, extras: dict) -> tuple[torch.Tensor, dict]:
        return transform(image), extras

    view.transform = transform  # for tests and the README's example
    return view


def default_views(cfg) -> dict[str, Callable]:
    """One augmented view of each image, ``image``, with ``train.augment``."""
    from ..data.transforms import build_train_transform

    t = cfg.train
    return {"image": image_only(build_train_transform(t.augment, cfg.model.img_size, t.crop_scale, t.color_jitter))}


def default_forward(model: nn.Module, batch: dict, ctx: StepContext, cfg) -> dict:
    """One forward of the (possibly DDP-wrapped) model on the ``image`` view."""
    return model(batch["image"])


def default_param_groups(model: nn.Module, cfg) -> list[dict]:
    """Weight decay on matrices; none on 1-D parameters and on what ``model.no_weight_decay()`` names
    (timm's convention, which the authors' optimizers follow). ``lr_mult`` 1 everywhere."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    wd = cfg.train.weight_decay
    return [{"params": decay, "weight_decay": wd, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]


@dataclass(frozen=True)
class Method:
    """A method: its model, losses, map recipe, views and optimisation, for the one engine.

    build(cfg, num_classes) -> model with weights as ``model.pretrained`` says (random, online, a file)
    forward(model, batch, ctx, cfg) -> outputs: the training forward; ``model`` may be DDP-wrapped, so extra
        passes of a method (CTI's infusion) happen inside the model's own ``forward``
    loss(outputs, batch, ctx, cfg) -> {term: tensor}: weighted terms summed into the total; keys that
        start with ``_`` are only logged. None: the method needs no training (CLIP-ES)
    class_scores(model, x) -> (B, C): image-level class scores (val mAP, ``predict``)
    views(cfg) -> {name: view(image, extras) -> (tensor, extras)}: the augmented inputs of a sample
    extras(cfg, dataset) -> (i -> {name: array}): per-sample inputs besides the image (precomputed CAMs)
    param_groups(model, cfg) -> [{params, weight_decay, lr_mult}]
    optimizer: ``adamw-cosine`` (AdamW, warm-up + cosine) or ``sgd-poly`` (SGD, poly decay)
    load_foreign(state, source, cfg_overrides, num_heads) -> (model, cfg, names) | None: the authors'
        checkpoint layouts this method reads (None when ``state`` is not one of them)
    convert: a :class:`Converter`, when ``tokenseg convert`` turns the authors' files into ours and back
    """

    name: str
    summary: str
    build: Callable[[Any, int], nn.Module]
    recipe: MapRecipe
    loss: Callable[..., dict[str, torch.Tensor]] | None = None
    forward: Callable[[nn.Module, dict, StepContext, Any], dict] = default_forward
    class_scores: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    section: str | None = None  # name of this method's own config section (cfg.<section>)
    section_config: type | None = None  # its dataclass
    views: Callable[[Any], dict[str, Callable]] = default_views
    extras: Callable[..., Callable[[int], dict]] | None = None
    param_groups: Callable[[nn.Module, Any], list[dict]] = default_param_groups
    optimizer: str = "adamw-cosine"
    dynamic_graph: bool = False  # DDP find_unused_parameters: the graph changes between steps
    load_foreign: Callable[..., Any] | None = None
    convert: Converter | None = None
    validate: Callable[[Any], None] | None = None
    uses_sections: tuple[str, ...] = field(default_factory=tuple)  # other sections it reads (OTPL on CTI)

    @property
    def trainable(self) -> bool:
        return self.loss is not None


__all__ = ["Method", "MapRecipe", "StepContext", "SeedJob", "SeedHooks", "Converter", "BACKGROUND", "IMAGENET",
           "image_only", "default_views", "default_forward", "default_param_groups"]
