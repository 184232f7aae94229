"""Seed generation for every method, batched on the device (METHODS.md §6).

For each scale (and its horizontal flip, in the same batch) the method's :class:`MapRecipe` turns one
forward pass into maps of the classes present in the batch; this module does the rest, the same for
every method: upsampling to the image, keeping only the (image, present class) pairs, un-flipping, the
sum over scales and flips, the recipe's normalisation (min–max, CTI's max-norm, SIPE's max) and the seed
files (``out/<kind>/<image_id>.npz``, with the background channel when the method makes one).

Memory grows with the classes *present* and with one image's maps, not with C or the batch: the
accumulators hold one (H, W) map per (image, present class) pair, and batches are formed by a memory
budget (``maps.memory_mb``) as well as a count. ``maps.max_side`` caps the input resolution (maps are
still written at the image's size), and a warning names images whose token count makes explicit
attention huge.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .config import Config, MapsConfig
from .data import WSSSDataset, build_dataset
from .data.base import image_hw, size_batches
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, input_scales, normalise_images
from .data.guard import refuse_inside_dataset
from .core.device import is_alloc_error
from .core.files import BackgroundWriter, safe_output_path
from .core.seeds import SeedMaps, save_seed, seed_path
from .core.errors import TokensegError
from .core.locks import job_lock
from .methods import BACKGROUND, MapRecipe, get_method
from .core.progress import progress_bar
from .core.viz import overlay, save_png

WARN_TOKENS = 4096  # explicit attention over more tokens than this needs > 64 MB per view and layer


def minmax_per_class(maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(m - min)/(max - min + 1e-8) per image and class over H×W; absent classes set to 0."""
    return normalise_maps(maps, "minmax") * present[..., None, None]


def normalise_maps(maps: torch.Tensor, how: str) -> torch.Tensor:
    """Per-map normalisation over the last two dims: ``minmax`` (MCTformer), ``maxnorm`` (CTI:
    ReLU(x − min − 1e-5)/(max − min + 1e-5) on ReLU(x)), ``max`` (SIPE/POT: x/(max + 1e-5)), ``none``."""
    if how == "none":
        return maps
    flat = maps.flatten(-2)
    if how == "maxnorm":
        flat = F.relu(flat)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    if how == "minmax":
        out = (flat - lo) / (hi - lo + 1e-8)
    elif how == "maxnorm":
        out = F.relu(flat - lo - 1e-5) / (hi - lo + 1e-5)
    elif how == "max":
        out = flat / (hi + 1e-5)
    else:
        raise ValueError(f"unknown normalisation {how!r}")
    return out.view_as(maps)


def scaled_size(h: int, w: int, s: float, patch: int, rounding: str) -> tuple[int, int]:
    """Input size at scale ``s``. ``round``: nearest multiple of the patch (no pixel dropped); ``floor``:
    round(h·s) as the authors, leaving the patch convolution to drop the remainder; ``ceil``: the next
    multiple of the patch (CLIP-ES); ``none``: round(h·s) (CNNs)."""
    if rounding in ("floor", "none"):
        return max(int(round(h * s)), patch), max(int(round(w * s)), patch)
    if rounding == "ceil":
        return (max(math.ceil(round(h * s, 6) / patch) * patch, patch),
                max(math.ceil(round(w * s, 6) / patch) * patch, patch))
    return max(int(round(h * s / patch)) * patch, patch), max(int(round(w * s / patch)) * patch, patch)


@dataclass
class MapBatch:
    """Maps of a batch of same-size images, one (H, W) map per (image, present class) pair."""

    pairs: torch.Tensor  # (P, 2) long: image index in the batch, class index; sorted
    maps: dict[str, torch.Tensor]  # kind -> (P, H, W)
    background: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (B, H, W), channel methods

    def dense(self, kind: str, batch: int, num_classes: int) -> torch.Tensor:
        """(B, C, H, W) with zeros for absent classes."""
        m = self.maps[kind]
        out = m.new_zeros(batch, num_classes, *m.shape[-2:])
        out[self.pairs[:, 0], self.pairs[:, 1]] = m
        return out


def _as_config(cfg) -> Config:
    return cfg if isinstance(cfg, Config) else Config(maps=cfg)


def recipe_of(model) -> MapRecipe:
    """The recipe of the method that built ``model`` (MCTformer's for a bare :class:`ClassTokenViT`)."""
    return get_method(getattr(model, "tokenseg_method", None) or "mctformer-plus").recipe


def rounding_of(cfg: MapsConfig, recipe: MapRecipe) -> str:
    return recipe.size_rounding if cfg.size_rounding == "auto" else cfg.size_rounding


def compute_map_batch(model, images: torch.Tensor, labels: torch.Tensor, cfg, kinds=None,
                      recipe: MapRecipe | None = None, extras: torch.Tensor | None = None) -> MapBatch:
    """Seeds of a batch of same-size normalised images (B,3,H,W) with multi-hot ``labels`` (B,C).
    ``extras`` (B, N, H, W): per-image maps from the recipe's ``map_extras`` (e.g. OTPL's CLIP-ES seeds),
    handed to ``combine`` with every view (mirrored with the flipped views, any size: combine pools them)."""
    cfg = _as_config(cfg)
    mc = cfg.maps
    recipe = recipe or recipe_of(model)
    kinds = list(kinds or mc.kinds)
    B, _, H, W = images.shape
    pairs = torch.nonzero(labels > 0)  # (P, 2), row-major: images in order, classes ascending
    classes = torch.unique(pairs[:, 1]) if len(pairs) else pairs.new_zeros(0)
    local = torch.full((labels.shape[1],), -1, dtype=torch.long, device=images.device)
    local[classes] = torch.arange(len(classes), device=images.device)
    b_idx, k_idx = pairs[:, 0], local[pairs[:, 1]] if len(pairs) else pairs[:, 1]
    P = len(pairs)
    channel = recipe.background == "channel"
    acc = {k: images.new_zeros(P, H, W, dtype=torch.float32) for k in kinds}
    bg = {k: images.new_zeros(B, H, W, dtype=torch.float32) for k in kinds} if channel else {}
    if P == 0 and not channel:
        return MapBatch(pairs, acc, bg)
    patch = recipe.size_multiple or getattr(model, "patch_size", 16)
    rounding = rounding_of(mc, recipe)
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=mc.dtype == "bf16")
    for s in input_scales(mc, (H, W)):
        hs, ws = scaled_size(H, W, s, patch, rounding)
        x = images if (hs, ws) == (H, W) else F.interpolate(
            images, size=(hs, ws), mode="bicubic", align_corners=False, antialias=True)
        lab, ext = labels, extras
        if mc.flip:
            x, lab = torch.cat([x, x.flip(-1)]), labels.repeat(2, 1)
            ext = None if extras is None else torch.cat([extras, extras.flip(-1)])
        with autocast, (torch.enable_grad() if recipe.needs_grad else torch.no_grad()):
            out = recipe.combine(model, x, lab, classes, cfg, kinds, **({} if ext is None else {"extras": ext}))
        for kind in kinds:
            m = out[kind].float()
            views = (b_idx, b_idx + B) if mc.flip else (b_idx,)
            sel = torch.cat([m[v, k_idx] for v in views])  # (P or 2P, h, w)
            acc[kind] += _add_views(_upsample(sel, (H, W)), P, mc.flip)
            if channel:
                b = out[kind + BACKGROUND].float()[:, 0]
                bg[kind] += _add_views(_upsample(b, (H, W)), B, mc.flip)
    maps = {k: normalise_maps(v, recipe.normalise) for k, v in acc.items()}
    bgs = {k: normalise_maps(v, recipe.normalise) for k, v in bg.items()}
    return MapBatch(pairs, maps, bgs)


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _add_views(m: torch.Tensor, n: int, flip: bool) -> torch.Tensor:
    return m[:n] + m[n:].flip(-1) if flip else m


def compute_maps(model, images: torch.Tensor, labels: torch.Tensor, cfg, kinds=None,
                 recipe: MapRecipe | None = None) -> dict[str, torch.Tensor]:
    """Like :func:`compute_map_batch`, as dense ``{kind: (B, C, H, W)}`` (absent classes 0)."""
    mb = compute_map_batch(model, images, labels, cfg, kinds, recipe)
    return {k: mb.dense(k, images.shape[0], labels.shape[1]) for k in mb.maps}


# ------------------------------------------------------------------------------ data feeding
class _ImageSet(Dataset):
    """(uint8 CHW image, multi-hot labels, index[, the recipe's per-image extras]) for the loader."""

    def __init__(self, ds: WSSSDataset, extras=None) -> None:
        self.ds, self.extras = ds, extras

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        arr = np.asarray(self.ds.load_image(i), dtype=np.uint8)
        item = (torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.from_numpy(self.ds.multi_hot(i)), i)
        return item if self.extras is None else (*item, torch.from_numpy(np.asarray(self.extras(i), np.float32)))


def image_bytes(size: tuple[int, int], pairs: int, cfg: MapsConfig, patch: int, prefix: int) -> int:
    """An estimate of one image's peak map memory: its accumulators and upsampled views, and the
    explicit-attention buffers (head mean, affinity, scratch) of its largest view."""
    H, W = size
    views = 2 if cfg.flip else 1
    maps = len(cfg.kinds) * (pairs + 1) * H * W * 4 * (1 + views)
    s = max(input_scales(cfg, size))
    n = prefix + math.ceil(H * s / patch) * math.ceil(W * s / patch)
    return maps + views * 3 * n * n * 4


def normalise(images_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return normalise_images(images_uint8, mean, std)


def generate_seeds(model, ds: WSSSDataset, out_dir: str | Path, cfg, device: torch.device | str = "cpu",
                   rank: int = 0, world: int = 1, num_workers: int = 0, progress: bool = True,
                   meta: dict | None = None, recipe: MapRecipe | None = None) -> Path:
    """Write ``out_dir/<kind>/<image_id>.npz`` for every image of ``ds`` (this rank's share when
    sharded); images whose files all exist are skipped, so an interrupted run resumes."""
    cfg = _as_config(cfg)
    mc = cfg.maps
    recipe = recipe or recipe_of(model)
    out_dir = Path(out_dir)
    device = torch.device(device)
    model = model.to(device).eval()
    kinds = list(mc.kinds)
    todo = [i for i in range(rank, len(ds), world)
            if not all(seed_path(out_dir / k, ds.ids[i]).is_file() for k in kinds)]
    patch = recipe.size_multiple or getattr(model, "patch_size", 16)
    prefix = getattr(model, "num_prefix", 0)
    budget = int(mc.memory_mb * 2 ** 20)

    def cost(i: int, size: tuple[int, int]) -> int:
        return image_bytes(size, len(ds.labels[i]), mc, patch, prefix)

    batches = size_batches(ds, todo, mc.batch_size, budget, cost)
    _warn_tokens(ds, todo, mc, patch)
    extras = recipe.map_extras(cfg, ds) if recipe.map_extras is not None else None
    loader = DataLoader(_ImageSet(ds, extras), batch_sampler=batches, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    bar = progress_bar(total=len(todo), desc="maps", unit="img", disable=not progress)
    with BackgroundWriter() as writer:  # the device computes batch k + 1 while batch k is written
        for raw, labels, idx, *ext in loader:
            images = normalise(raw.to(device, non_blocking=True), recipe.mean, recipe.std)
            try:
                mb = compute_map_batch(model, images, labels.to(device, non_blocking=True), cfg, kinds, recipe,
                                       ext[0].to(device, non_blocking=True) if ext else None)
            except (RuntimeError, MemoryError) as exc:
                if not is_alloc_error(exc):
                    raise
                names = ", ".join(ds.ids[i] for i in idx.tolist()[:4])
                raise TokensegError(
                    f"out of memory on image(s) {names} ({raw.shape[-1]}×{raw.shape[-2]} px): set maps.max_side "
                    f"(e.g. maps.max_side=800) or lower maps.memory_mb / maps.batch_size; finished images are "
                    f"kept and a re-run resumes") from exc
            writer.submit(_save_host, to_host(mb), raw, idx.tolist(), ds, out_dir, mc)
            bar.update(len(idx))
    bar.close()
    return out_dir


@dataclass
class HostBatch:
    """A :class:`MapBatch` being copied to the host; ``ready`` (CUDA) completes when the copies have."""

    batch: MapBatch
    ready: object = None

    def wait(self) -> MapBatch:
        if self.ready is not None:
            self.ready.synchronize()
        return self.batch


def to_host(mb: MapBatch) -> HostBatch:
    """Start the device-to-host copies of ``mb`` without waiting (pinned host memory on CUDA)."""
    def cp(t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu", non_blocking=True)

    host = MapBatch(cp(mb.pairs), {k: cp(v) for k, v in mb.maps.items()},
                    {k: cp(v) for k, v in mb.background.items()})
    ready = None
    if mb.pairs.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return HostBatch(host, ready)


def _save_host(hb: HostBatch, *rest) -> None:
    _save_batch(hb.wait(), *rest)


def _save_batch(mb: MapBatch, raw: torch.Tensor, idx: list[int], ds: WSSSDataset, out_dir: Path, mc: MapsConfig):
    pairs = mb.pairs.cpu().numpy()
    for kind, m in mb.maps.items():
        m = m.cpu().numpy()
        bgk = mb.background[kind].cpu().numpy() if kind in mb.background else None
        for b, i in enumerate(idx):
            rows = np.flatnonzero(pairs[:, 0] == b)
            classes = pairs[rows, 1].astype(np.int64)
            maps = m[rows]
            if mc.overlays:  # written first: a seed file's existence means its image is done
                rgb = raw[b].permute(1, 2, 0).numpy()
                top = maps.max(0) if len(classes) else np.zeros(rgb.shape[:2], np.float32)
                save_png(out_dir / f"{kind}_overlays" / f"{ds.ids[i]}.png", overlay(rgb, top))
            seed = SeedMaps(classes, maps, {"kind": kind, "image_id": ds.ids[i]},
                            None if bgk is None else bgk[b])
            save_seed(seed_path(out_dir / kind, ds.ids[i]), seed, mc.save_dtype)


def _warn_tokens(ds: WSSSDataset, todo: list[int], mc: MapsConfig, patch: int) -> None:
    big = []
    for i in todo[:2000]:  # header reads are cheap, but a COCO-sized split needs no full scan to warn
        h, w = image_hw(ds.image_paths[i])
        s = max(input_scales(mc, (h, w)))
        n = math.ceil(h * s / patch) * math.ceil(w * s / patch)
        if n > WARN_TOKENS:
            big.append((ds.ids[i], n))
    if big:
        worst = max(big, key=lambda t: t[1])
        warnings.warn(f"{len(big)} image(s) give more than {WARN_TOKENS} tokens (e.g. {worst[0]}: {worst[1]} tokens; "
                      f"explicit attention needs ~{worst[1] ** 2 * 4 / 2 ** 20:.0f} MB per view and layer): set "
                      f"maps.max_side to cap the input size", stacklevel=3)


def checkpoint_identity(path: str | Path) -> str:
    """What identifies a checkpoint's weights whatever its path: the SHA-256 of the file (a retrained
    model in the same ``output_dir`` has the same path, other weights)."""
    import hashlib

    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def map_settings(cfg: Config, method: str, checkpoint: str) -> dict:
    """The settings that shape the seeds (what a resumed run must share): the maps keys, the method and
    its section, and the checkpoint's content digest (not its path)."""
    mc = cfg.maps
    keep = ("scales", "flip", "layers", "layer_reduce", "fusion", "dtype", "size_rounding", "mode", "save_dtype",
            "max_side")
    settings = {f"maps.{k}": getattr(mc, k) for k in keep}
    settings.update({"model.method": method, "checkpoint": checkpoint_identity(checkpoint)})
    section = get_method(method).section
    if section:
        settings.update({f"{section}.{k}": v for k, v in vars(getattr(cfg, section)).items()})
    return settings


# maps.* values that only the batched pipeline has: each is a deviation from the authors' inference
_BATCHED_ONLY = {"dtype": ("fp32",), "size_rounding": ("auto", "floor")}


def resolve_mode(mc: MapsConfig, recipe: MapRecipe, method: str) -> str:
    """``maps.mode`` for ``method``: ``auto`` is the recipe's exact default. The authors' inference
    takes no batched-only deviation (bf16, other size rounding): asking for one is an error that says
    how to get it, never silently ignored."""
    mode = recipe.default_mode if mc.mode == "auto" else mc.mode
    if mode != "authors":
        return mode
    if recipe.authors is None:
        raise TokensegError(f"maps.mode=authors: {method} has no separate authors' inference (its default "
                            f"pipeline follows their code; see README)")
    for key, allowed in _BATCHED_ONLY.items():
        if getattr(mc, key) not in allowed:
            raise TokensegError(
                f"maps.{key}={getattr(mc, key)} is a deviation of the batched pipeline; {method}'s seeds are "
                f"made by the authors' exact inference{' by default' if mc.mode == 'auto' else ''}: add "
                f"maps.mode=tokenseg to use it (README: \"Exact by default\")")
    return mode


def run_maps(cfg: Config, checkpoint: str | Path | None = None, split: str | None = None,
             out_dir: str | Path | None = None, progress: bool = True, export_npy: bool = False,
             overwrite: bool = False) -> Path:
    """Python API of ``tokenseg maps``: load a checkpoint (ours or the authors'; none for a training-free
    method), generate seeds for a split with ``maps.mode`` (tokenseg: this module; authors: the method's
    own inference, e.g. :mod:`tokenseg.methods.mctformer.authors`). ``export_npy`` (authors mode) writes the authors'
    ``.npy`` dicts instead of ``.npz``. Resuming into a folder made with other settings is an error
    unless ``overwrite``."""
    from .checkpoint import BEST_NAME, load_model_from_checkpoint, run_checkpoint
    from .core.device import setup

    method = get_method(cfg.model.method)
    split = split or cfg.maps.split
    ds = build_dataset(cfg.data, split, "config key maps.split or the --split option")
    if method.trainable:
        ckpt = Path(checkpoint) if checkpoint else run_checkpoint(cfg)
        if ckpt.name == BEST_NAME and not checkpoint and progress:
            print(f"maps: from {ckpt} (train.keep_best: the epoch with the best val mAP)")
        if not ckpt.is_file():
            raise TokensegError(f"{ckpt}: checkpoint not found; train first: `tokenseg train {cfg.name} ...` "
                                f"(or pass --checkpoint)")
        model, ckpt_cfg, names = load_model_from_checkpoint(ckpt, num_heads=cfg.model.backbone_kwargs.get("num_heads"))
        method = get_method(ckpt_cfg.model.method)  # the checkpoint's method makes the maps
    else:
        ckpt, ckpt_cfg, names = "", cfg, list(ds.class_names)
        model = method.build(cfg, ds.num_classes)
    model.tokenseg_method = method.name
    recipe = method.recipe
    recipe.check_kinds(cfg.maps.kinds, f"{ckpt or method.name}: a {method.name} model")
    cfg = replace(cfg, maps=replace(cfg.maps, mode=resolve_mode(cfg.maps, recipe, method.name)))
    if export_npy and cfg.maps.mode != "authors":
        raise TokensegError("--export-npy needs maps.mode=authors (the .npy dicts are the authors' format)")
    if getattr(model, "class_names_source", "") == "default" and len(names) == ds.num_classes:
        names = list(ds.class_names)  # the authors' files hold no names: take the dataset's
    if len(names) != ds.num_classes:
        raise TokensegError(f"{ckpt}: has {len(names)} class tokens, but the dataset has {ds.num_classes} "
                            f"classes ({', '.join(ds.class_names[:6])}{', ...' if ds.num_classes > 6 else ''})")
    if list(ds.class_names) != names:
        raise TokensegError(f"{ckpt}: trained on classes {names}, dataset has {ds.class_names}")
    dinfo, device = setup(cfg.train.device)
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "seeds" / split
    refuse_inside_dataset(out, [cfg, ds], "maps --out")
    with job_lock(out, "tokenseg maps"):
        _generate(cfg, method, model, ds, out, ckpt, split, dinfo, device, progress, export_npy, overwrite)
    return out


def _report_progress(ds: WSSSDataset, out: Path, kinds: list[str], export_npy: bool, progress: bool) -> None:
    """Remove the temp files a killed run left in the kind folders; say how much of the split a re-run
    finds done ("continuing: N of M done")."""
    from .core.files import remove_stale_temps

    removed = sum(remove_stale_temps(out / k) for k in kinds)
    suffix = ".npy" if export_npy else ".npz"
    done = sum(all(safe_output_path(out / k, f"{i}{suffix}").is_file() for k in kinds) for i in ds.ids)
    if progress and (done or removed):
        extra = f"; removed {removed} temp file(s) of an interrupted run" if removed else ""
        print(f"maps: continuing: {done} of {len(ds)} images done in {out}{extra}")


def _generate(cfg, method, model, ds, out, ckpt, split, dinfo, device, progress, export_npy, overwrite) -> None:
    """The seeds of ``ds`` into ``out`` (under the folder's lock): settings check, then the method's loop."""
    from .core.device import barrier
    from .core.resume import check_settings

    recipe = method.recipe
    meta = {"checkpoint": str(ckpt), "method": method.name, "split": split, "background": recipe.background,
            "normalise": recipe.normalise, "world_size": dinfo.world, "env_rank": int(os.environ.get("RANK", 0)),
            "maps": {k: v for k, v in vars(cfg.maps).items()}}
    if getattr(model, "tokenseg_weights", ""):  # e.g. a random tower for a smoke test: say so with the seeds
        meta["weights"] = model.tokenseg_weights
    if dinfo.is_main:
        check_settings(out, map_settings(cfg, method.name, str(ckpt)), overwrite, "maps_meta.json", "seeds",
                       clear=tuple(cfg.maps.kinds), info=meta)
        _report_progress(ds, out, cfg.maps.kinds, export_npy, progress)
    barrier(dinfo)
    common = dict(device=device, rank=dinfo.rank, world=dinfo.world, num_workers=cfg.data.num_workers,
                  progress=progress and dinfo.is_main)
    if cfg.maps.mode == "authors":
        recipe.authors(model, ds, out, cfg.maps, **common, meta=meta, method=method.name, export_npy=export_npy)
    elif recipe.generate is not None:
        recipe.generate(model, ds, out, cfg, **common)
    else:
        generate_seeds(model, ds, out, cfg, **common, recipe=recipe)
    barrier(dinfo)
