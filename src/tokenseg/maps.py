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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .config import Config, MapsConfig
from .data import WSSSDataset, build_dataset
from .data.base import image_hw, size_batches
from .data.transforms import input_scales
from .data.guard import refuse_inside_dataset
from .core.device import is_alloc_error
from .core.files import BackgroundWriter, safe_output_path
from .core.seeds import npy_seed_path, seed_path
from .core.errors import TokensegError
from .core.locks import job_lock
from .methods import BACKGROUND, MapRecipe, get_method
from .methods.base import SeedHooks, SeedJob
from .methods.mapops import (ImageSet, MapBatch, add_views, image_bytes, normalise, normalise_maps, 
                             rounding_of, save_map_batch, scaled_size, upsample)
from .core.progress import progress_bar

WARN_TOKENS = 4096  # explicit attention over more tokens than this needs > 64 MB per view and layer


def _as_config(cfg) -> Config:
    return cfg if isinstance(cfg, Config) else Config(maps=cfg)


def recipe_of(cfg: Config) -> MapRecipe:
    """The map recipe of ``model.method`` (the method the config, or a checkpoint's config, names)."""
    return get_method(cfg.model.method).recipe


def compute_map_batch(model, images: torch.Tensor, labels: torch.Tensor, cfg, kinds=None,
                      recipe: MapRecipe | None = None, extras: torch.Tensor | None = None) -> MapBatch:
    """Seeds of a batch of same-size normalised images (B,3,H,W) with multi-hot ``labels`` (B,C).
    ``extras`` (B, N, H, W): per-image maps from the recipe's ``map_extras`` (e.g. OTPL's CLIP-ES seeds),
    handed to ``combine`` with every view (mirrored with the flipped views, any size: combine pools them)."""
    cfg = _as_config(cfg)
    mc = cfg.maps
    recipe = recipe or recipe_of(cfg)
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
            acc[kind] += add_views(upsample(sel, (H, W)), P, mc.flip)
            if channel:
                b = out[kind + BACKGROUND].float()[:, 0]
                bg[kind] += add_views(upsample(b, (H, W)), B, mc.flip)
    maps = {k: normalise_maps(v, recipe.normalise) for k, v in acc.items()}
    bgs = {k: normalise_maps(v, recipe.normalise) for k, v in bg.items()}
    return MapBatch(pairs, maps, bgs)


def compute_maps(model, images: torch.Tensor, labels: torch.Tensor, cfg, kinds=None,
                 recipe: MapRecipe | None = None) -> dict[str, torch.Tensor]:
    """Like :func:`compute_map_batch`, as dense ``{kind: (B, C, H, W)}`` (absent classes 0)."""
    mb = compute_map_batch(model, images, labels, cfg, kinds, recipe)
    return {k: mb.dense(k, images.shape[0], labels.shape[1]) for k in mb.maps}


def generate_seeds(model, ds: WSSSDataset, out_dir: str | Path, cfg, device: torch.device | str = "cpu",
                   rank: int = 0, world: int = 1, num_workers: int = 0, progress: bool = True,
                   meta: dict | None = None, recipe: MapRecipe | None = None, hooks: SeedHooks | None = None,
                   method: str = "", export_npy: bool = False) -> Path:
    """The one seed loop: write ``out_dir/<kind>/<image_id>.npz`` for every image of ``ds`` (this rank's
    share when sharded); images whose files all exist are skipped, so an interrupted run resumes.

    ``hooks`` compute and write the maps of one batch: a method's own inference (the authors' exact one,
    CLIP-ES); by default :func:`batched_hooks` of ``recipe`` (the scale/flip pipeline). This loop owns
    everything else: the images still to do, their batches, the loader, the progress bar, and the
    background writer that writes batch k while the device computes batch k + 1."""
    method = method or (cfg.model.method if isinstance(cfg, Config) else "")
    cfg = _as_config(cfg)
    recipe = recipe or recipe_of(cfg)
    hooks = hooks or batched_hooks(recipe)
    device = torch.device(device)
    job = SeedJob(model.to(device).eval(), ds, Path(out_dir), cfg, list(cfg.maps.kinds), device,
                  method, dict(meta or {}), export_npy, rank)
    path_of = npy_seed_path if (export_npy and hooks.npy) else seed_path
    todo = [i for i in range(rank, len(ds), world)
            if not all(path_of(job.out_dir / k, ds.ids[i]).is_file() for k in job.kinds)]
    job.state = hooks.prepare(job) if hooks.prepare else None
    batches = hooks.batches(job, todo) if hooks.batches else size_batches(ds, todo, cfg.maps.batch_size)
    data = hooks.dataset(job) if hooks.dataset else ImageSet(ds)
    loader = DataLoader(data, batch_sampler=batches, num_workers=num_workers, collate_fn=hooks.collate,
                        pin_memory=device.type == "cuda")
    bar = progress_bar(total=len(todo), desc=hooks.desc, unit="img", disable=not progress)
    with BackgroundWriter() as writer:  # the device computes batch k + 1 while batch k is written
        for idx, batch in zip(batches, loader):
            try:
                result = hooks.compute(job, batch)
            except (RuntimeError, MemoryError) as exc:
                if not is_alloc_error(exc):
                    raise
                names = ", ".join(ds.ids[i] for i in idx[:4])
                h, w = image_hw(ds.image_paths[idx[0]])
                raise TokensegError(
                    f"out of memory on image(s) {names} ({w}×{h} px): set maps.max_side (e.g. maps.max_side=800) "
                    f"or lower maps.memory_mb / maps.batch_size; finished images are kept and a re-run resumes"
                    ) from exc
            writer.submit(hooks.write, job, result, list(idx))
            bar.update(len(idx))
    bar.close()
    return job.out_dir


def batched_hooks(recipe: MapRecipe) -> SeedHooks:
    """The scale/flip pipeline as hooks of the seed loop: batches of equal-size images within
    ``maps.batch_size`` and ``maps.memory_mb``, :func:`compute_map_batch`, the copy to the host started on
    the device, the seed files written from the host."""

    def patch_of(job: SeedJob) -> int:
        return recipe.size_multiple or getattr(job.model, "patch_size", 16)

    def batches(job: SeedJob, todo: list[int]) -> list[list[int]]:
        mc, ds = job.cfg.maps, job.ds
        patch, prefix = patch_of(job), getattr(job.model, "num_prefix", 0)
        _warn_tokens(ds, todo, mc, patch)
        return size_batches(ds, todo, mc.batch_size, int(mc.memory_mb * 2 ** 20),
                            lambda i, size: image_bytes(size, len(ds.labels[i]), mc, patch, prefix))

    def dataset(job: SeedJob):
        return ImageSet(job.ds, recipe.map_extras(job.cfg, job.ds) if recipe.map_extras is not None else None)

    def compute(job: SeedJob, batch) -> tuple:
        raw, labels, _, *ext = batch
        dev = job.device
        images = normalise(raw.to(dev, non_blocking=True), recipe.mean, recipe.std)
        mb = compute_map_batch(job.model, images, labels.to(dev, non_blocking=True), job.cfg, job.kinds, recipe,
                               ext[0].to(dev, non_blocking=True) if ext else None)
        return to_host(mb), raw

    def write(job: SeedJob, result: tuple, idx: list[int]) -> None:
        host, raw = result
        save_map_batch(host.wait(), raw, idx, job.ds, job.out_dir, job.cfg.maps)

    return SeedHooks(compute=compute, write=write, batches=batches, dataset=dataset)


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
    hooks = recipe.authors if cfg.maps.mode == "authors" else recipe.hooks
    generate_seeds(model, ds, out, cfg, **common, meta=meta, recipe=recipe, hooks=hooks, method=method.name,
                   export_npy=export_npy)
    barrier(dinfo)
