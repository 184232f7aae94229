"""IRN mask step (Ahn, Cho & Kwak, CVPR 2019; the MMCST / OTPL / POT VOC recipe, METHODS.md §7.2).

``tokenseg pseudo CONFIG pseudo.refine=irn`` on seeds of any method, in three resumable stages under
``<output_dir>/irn`` (or ``--work``):

1. **IR labels** (``labels/<id>.png``). ``variant=irn``: confident foreground = argmax of
   [0.30, maps] and confident background = argmax of [0.05, maps], each CRF'd on label unaries
   (t=10, Gaussian 3/3, bilateral 50/5/10, gt_prob 0.7); label = the foreground class where the first
   says foreground, 0 where both say background, 255 between. ``variant=pot``: the seed's own
   background channel in place of the constants; POT's code uses it unchanged in both maps, so there
   is no 255 band (§16.22), ``pot_fg_scale`` / ``pot_bg_scale`` ≠ 1 make one [I].
2. **IRNet** (``irn.pt``, see :mod:`.irn_net`) trained on them: crop 512 (a batch of smaller images is
   padded only to its largest image, rounded up to 16), batch 32, 3 epochs, SGD with
   poly lr (0.1 boundary branch, 1.0 displacement branch), wd 1e-4, momentum 0.9 (their code runs
   1e-4, §16.16: ``pseudo.irn.momentum=1e-4``). Checkpoints every epoch (and every
   ``checkpoint_every`` steps) hold the optimizer state, and the data order and augmentation are a
   function of (seed, epoch, index), so a killed run resumes to the same weights.
3. **Random walk** → masks. Boundaries ``B`` at stride 4 (image and flip, padded to the crop size or
   the batch's largest side rounded up to 16 if smaller,
   logits averaged); pair affinities ``a_ij = 1 − max_path B`` within radius 5, with unit self-loops;
   ``T = D⁻¹ a^β`` (β = 10), applied ``2^exp_times`` (256) times to the seeds ⊙ (1 − B) on the same
   grid; upsampled ×4, divided by the global max; ``variant=irn`` adds a constant background 0.25,
   ``variant=pot`` walks [background, maps]^1.5 and takes the plain argmax.

The walk itself is :mod:`.irn_walk`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core import optim
from ..config import Config, IRNConfig
from ..core.masks import IGNORE_INDEX, save_palette_png
from ..core.seeds import SeedMaps, load_seed
from ..core.errors import TokensegError
from ..core.files import write_json_atomic
from ..core.progress import progress_bar
from ..core.crf import CRF_PRESETS, crf_labels, crf_params, resolve_backend
from .irn_net import IRNet, irn_loss, reduce_labels
from .irn_walk import (WALK_DTYPES, boundary_bands, propagate, sparse_transition, transition_bands, walk_banded,
                       walk_chunk, walk_offsets, walk_sparse)
from ..core.device import AmpStep, fixed_shapes, resolve_device
from ..core.scores import seed_scores
from ..fit import Task, epoch_order, finished_step, fit, poly_lr, read_state, restore
from .workers import worker_pool

CHECKPOINT_NAME = "irn.pt"
LABEL_SETTINGS = "ir_labels.json"
NO_WEIGHTS_WARNING = (
    "pseudo.refine=irn without ImageNet weights (pseudo.irn.pretrained=false, no pseudo.irn.weights): IRN learns "
    "its boundaries on a frozen random backbone (or one trained from scratch) and on the demo's synthetic data its "
    "masks were worse than the plain threshold's (README: 'IRN without ImageNet weights'); set "
    "pseudo.irn.pretrained=true or pseudo.irn.weights=FILE, or use the plain threshold")


# ----------------------------------------------------------------------------- config
def validate_irn(cfg: Config) -> None:
    """Checks of ``pseudo.irn.*`` (tokenseg.config validates only that ``pseudo.refine=irn`` exists)."""
    ic = cfg.pseudo.irn

    def fail(key: str, problem: str) -> None:
        raise TokensegError(f"config key 'pseudo.irn.{key}' {problem}")

    if ic.variant not in ("irn", "pot"):
        fail("variant", f"must be one of ['irn', 'pot'], got {ic.variant!r}")
    if ic.walk not in ("banded", "sparse"):
        fail("walk", f"must be one of ['banded', 'sparse'], got {ic.walk!r}")
    if ic.walk_dtype not in WALK_DTYPES:
        fail("walk_dtype", f"must be one of {list(WALK_DTYPES)}, got {ic.walk_dtype!r}")
    if ic.crf_preset not in CRF_PRESETS:
        fail("crf_preset", f"must be one of {list(CRF_PRESETS)}, got {ic.crf_preset!r}")
    for key in ("fg_threshold", "bg_threshold", "sem_bg_threshold"):
        if not 0.0 <= getattr(ic, key) <= 1.0:
            fail(key, f"must be in [0, 1], got {getattr(ic, key)}")
    if not 0.0 < ic.crf_gt_prob < 1.0:
        fail("crf_gt_prob", f"must be in (0, 1), got {ic.crf_gt_prob}")
    for key in ("pot_fg_scale", "pot_bg_scale", "pot_power", "beta", "lr"):
        if getattr(ic, key) <= 0:
            fail(key, f"must be > 0, got {getattr(ic, key)}")
    if ic.weight_decay < 0 or not 0.0 <= ic.momentum < 1.0 or ic.poly_power < 0:
        raise TokensegError("pseudo.irn.weight_decay and poly_power must be >= 0 and momentum in [0, 1)")
    if ic.radius < 2 or ic.train_radius < 2:
        raise TokensegError(f"pseudo.irn.radius / train_radius must be >= 2, got {ic.radius} / {ic.train_radius}")
    if ic.exp_times < 0 or ic.exp_times > 16:
        fail("exp_times", f"must be in 0..16 (2^exp_times walk steps), got {ic.exp_times}")
    if ic.crop < 32 or ic.crop % 4:
        fail("crop", f"must be a multiple of 4 and >= 32, got {ic.crop}")
    if 4 * (ic.train_radius - 1) * 2 >= ic.crop:
        fail("crop", f"{ic.crop} is too small for train_radius {ic.train_radius} (needs > {8 * (ic.train_radius - 1)})")
    if len(ic.scale_range) != 2 or not 0 < ic.scale_range[0] <= ic.scale_range[1]:
        fail("scale_range", f"must be [min, max] with 0 < min <= max, got {ic.scale_range}")
    if ic.batch_size < 1 or ic.epochs < 1 or ic.infer_batch < 1 or ic.max_steps < 0 or ic.checkpoint_every < 0:
        raise TokensegError("pseudo.irn.batch_size / epochs / infer_batch must be >= 1, max_steps / "
                            "checkpoint_every >= 0")


def _crf_params(cfg: Config):
    pc = cfg.pseudo
    return crf_params(pc.irn.crf_preset, pc.crf_iters, pc.crf_gauss_sxy, pc.crf_gauss_compat, pc.crf_bi_sxy,
                      pc.crf_bi_srgb, pc.crf_bi_compat)


def _check_same(old: dict | None, new: dict, what: str, path: Path) -> None:
    """A stage's outputs are reused only if they were made with the same settings."""
    if old is None:
        return
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in diff[:4])
        raise TokensegError(f"{path}: {what} were made with other settings ({detail}); delete it or use another "
                            "--work folder")


def load_checked_seed(path: Path, variant: str = "irn") -> SeedMaps:
    """A seed file with as many maps as classes (and, for ``variant=pot``, a background channel)."""
    seed = load_seed(path)
    if seed.maps.shape[0] != len(seed.classes):
        raise TokensegError(f"{path}: {len(seed.classes)} classes but {seed.maps.shape[0]} maps")
    if variant == "pot" and seed.background is None:
        raise TokensegError(f"{path}: pseudo.irn.variant=pot propagates the seed's own background channel, but this "
                            "seed file has none (CTI/POT seeds carry one); use pseudo.irn.variant=irn")
    return seed


def _resize(maps: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) → (n, H, W) float32, bilinear (align_corners=False), clipped at 0."""
    t = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    if tuple(t.shape[-2:]) != tuple(size) and t.shape[0]:
        t = F.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return t.clamp_min(0.0)


# ----------------------------------------------------------------------------- 1. IR labels
def ir_label(seed: SeedMaps, image: np.ndarray, ic: IRNConfig, crf=None, backend: str = "auto",
             exact_pixels: int = 4096) -> np.ndarray:
    """(H, W) uint8 IR label of one image: class + 1 where confidently foreground, 0 where
    confidently background, 255 where the two CRF'd maps disagree (module docstring, stage 1).
    ``crf=None`` with ``ic.label_crf`` uses the ``irn`` preset."""
    H, W = image.shape[:2]
    if len(seed.classes) == 0:
        return np.zeros((H, W), np.uint8)
    scores, keys = seed_scores(seed, (H, W), "constant", 0.0)  # [placeholder background, maps]
    if ic.variant == "pot":
        bg = _resize(seed.background[None], (H, W))[0].numpy()
        bg_fg, bg_bg = bg * ic.pot_fg_scale, bg * ic.pot_bg_scale
    else:
        bg_fg, bg_bg = np.float32(ic.fg_threshold), np.float32(ic.bg_threshold)

    def label_map(background) -> np.ndarray:
        scores[0] = background
        lab = scores.argmax(0)  # ties go to the background, as np.argmax in their code
        if ic.label_crf:
            lab = crf_labels(image, lab, len(keys), crf or CRF_PRESETS["irn"], ic.crf_gt_prob, backend, exact_pixels)
        return lab

    fg = label_map(bg_fg)
    same = np.array_equal(np.broadcast_to(bg_fg, (H, W)), np.broadcast_to(bg_bg, (H, W)))
    bg_lab = fg if same else label_map(bg_bg)
    out = np.asarray(keys, np.int64)[fg]
    out[fg == 0] = IGNORE_INDEX
    out[(fg == 0) & (bg_lab == 0)] = 0
    return out.astype(np.uint8)


def label_settings(cfg: Config, seeds_dir: str | Path) -> dict:
    ic = cfg.pseudo.irn
    p = _crf_params(cfg)
    return {"variant": ic.variant, "fg_threshold": ic.fg_threshold, "bg_threshold": ic.bg_threshold,
            "pot_fg_scale": ic.pot_fg_scale, "pot_bg_scale": ic.pot_bg_scale, "label_crf": ic.label_crf,
            "crf": [p.iters, p.gauss_sxy, p.gauss_compat, p.bi_sxy, p.bi_srgb, p.bi_compat],
            "crf_gt_prob": ic.crf_gt_prob, "seeds": str(Path(seeds_dir).resolve())}


def _label_task(args) -> str:
    from ..data import load_rgb

    image_id, seed_file, image_path, out_path, ic, crf, backend, exact = args
    image = np.asarray(load_rgb(image_path), dtype=np.uint8)
    seed = load_checked_seed(seed_file, ic.variant)
    save_palette_png(out_path, ir_label(seed, image, ic, crf, backend, exact))
    return image_id


def make_ir_labels(cfg: Config, tasks: Sequence, seeds_dir: str | Path, label_dir: str | Path,
                   progress: bool = True) -> dict:
    """``label_dir/<id>.png`` for every task (``image_id``, ``seed_file``, ``image_path``); existing
    labels are kept (resumable) if they were made with the same settings. Returns the settings."""
    pc = cfg.pseudo
    label_dir = Path(label_dir)
    settings = label_settings(cfg, seeds_dir)
    meta = label_dir / LABEL_SETTINGS
    if meta.is_file():
        _check_same(json.loads(meta.read_text()), settings, "the IR labels", label_dir)
    else:
        write_json_atomic(meta, settings)
    crf = _crf_params(cfg)
    backend = resolve_backend(pc.crf_backend) if pc.irn.label_crf else "none"
    todo = [(t.image_id, t.seed_file, t.image_path, label_dir / f"{t.image_id}.png", pc.irn, crf, backend,
             pc.crf_exact_pixels) for t in tasks if not (label_dir / f"{t.image_id}.png").is_file()]
    bar = progress_bar(total=len(todo), desc="irn labels (CRF)", unit="img", disable=not progress)
    if pc.workers > 1 and len(todo) > 1:
        with worker_pool(pc.workers) as pool:
            for _ in pool.map(_label_task, todo, chunksize=4):
                bar.update(1)
    else:
        for t in todo:
            _label_task(t)
            bar.update(1)
    bar.close()
    return settings


# ----------------------------------------------------------------------------- 2. training
def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def training_settings(cfg: Config, ids: Sequence[str], labels: dict) -> dict:
    ic = cfg.pseudo.irn
    keys = ("backbone", "pretrained", "weights", "freeze_backbone", "displacement", "crop", "scale_range",
            "batch_size", "epochs", "max_steps", "lr", "weight_decay", "momentum", "poly_power", "train_radius",
            "seed")
    out = {k: getattr(ic, k) for k in keys}
    out["scale_range"] = [float(v) for v in ic.scale_range]
    out.update(images=len(ids), ids=_ids_digest(ids), labels=json.dumps(labels, sort_keys=True))
    return out


def read_irn_checkpoint(path: str | Path) -> dict:
    """An IRN checkpoint, read tensors-only through the one weights reader."""
    return read_state(path, "irn")


def load_irn(path: str | Path) -> IRNet:
    """The network of an IRN checkpoint (finished or not), in eval mode on the CPU."""
    state = read_irn_checkpoint(path)
    net = IRNet(state["backbone"], displacement=bool(state["displacement"]),
                freeze_backbone=bool(state.get("freeze_backbone", True)))
    net.load_state_dict(state["model"])
    return net.eval()


class _BatchPad:
    """Collate crops padded only as far as the batch needs: a square of its largest image extent
    rounded up to 16 (:func:`_pad_size`), at least what the training radius needs, at most the crop.
    Crops are padded bottom/right, so this cuts padding only; a batch that holds an image as large as
    the crop (VOC: 500 px scaled by 0.5–1.5, batch 32) is the crop, as in IRN."""

    def __init__(self, crop: int, train_radius: int) -> None:
        self.crop = crop
        self.least = min(crop, -(-(8 * (train_radius - 1) + 4) // 16) * 16)  # irn_loss needs > 8(r − 1)

    def __call__(self, samples):
        side = max(self.least, _pad_size([tuple(int(v) for v in e) for _, _, e in samples], self.crop))
        return (torch.stack([x[:, :side, :side] for x, _, _ in samples]),
                torch.stack([y[:side, :side] for _, y, _ in samples]))


def train_irn(cfg: Config, ds, ids: Sequence[str], label_dir: str | Path, work_dir: str | Path,
              progress: bool = True, labels: dict | None = None,
              step_hook: Callable[[int], None] | None = None) -> Path:
    """Train IRNet on the IR labels of ``ids``; returns ``<work_dir>/irn.pt``. A finished checkpoint
    made with the same settings is reused; an unfinished one is resumed exactly. ``step_hook(step)``
    is called after every optimiser step (after that step's checkpoint, if one is due)."""
    from ..data.crops import CropDataset

    pc, ic = cfg.pseudo, cfg.pseudo.irn
    work = Path(work_dir)
    ckpt = work / CHECKPOINT_NAME
    settings = training_settings(cfg, ids, labels or {})
    state = None
    if ckpt.is_file():
        state = read_irn_checkpoint(ckpt)
        _check_same(state.get("settings"), settings, "the IRN checkpoint", ckpt)
        if state.get("done"):
            return ckpt
    device = resolve_device(pc.device)
    torch.manual_seed(ic.seed)
    fresh = state is None  # a resumed run takes its backbone from the checkpoint, not from timm / a file
    net = IRNet(ic.backbone, ic.pretrained and fresh, ic.weights if fresh else "", ic.displacement,
                ic.freeze_backbone).to(device)
    groups = [{"params": net.edge_parameters(), "lr": ic.lr, "base_lr": ic.lr}]
    if net.displacement:
        groups.append({"params": net.displacement_parameters(), "lr": 10 * ic.lr, "base_lr": 10 * ic.lr})
    if ic.freeze_backbone:
        net.encoder.requires_grad_(False)
    else:  # [I] fine-tuning the backbone too (IRN never does); at the boundary branch's lr
        groups.append({"params": net.backbone_parameters(), "lr": ic.lr, "base_lr": ic.lr})
    optimizer = optim.sgd(groups, cfg.train.fused_optimizer,
                          lr=ic.lr, momentum=ic.momentum, weight_decay=ic.weight_decay)
    amp = AmpStep(pc.amp, device, optimizer)
    fixed_shapes(device)  # crops of a few sizes (multiples of 16 up to pseudo.irn.crop): tuned once each
    step = 0 if state is None else restore(state, net, optimizer, amp.scaler, str(ckpt))
    indices = [ds.index_of(k) for k in ids]
    bs = min(ic.batch_size, len(indices))
    steps_per_epoch = max(len(indices) // bs, 1)
    total = ic.max_steps if ic.max_steps > 0 else ic.epochs * steps_per_epoch
    # [I] DeepLab-style augmentation of segment.train (bilinear rescale, pad bottom/right); IRN rescales
    # bicubically and places a crop-smaller image at a random offset
    data = CropDataset(ds, indices, label_dir, ic.crop, tuple(ic.scale_range), True, seed=ic.seed, extent=True)
    collate = _BatchPad(ic.crop, ic.train_radius)
    workers = cfg.data.num_workers if ic.num_workers < 0 else ic.num_workers

    def batches(epoch: int, offset: int) -> DataLoader:
        data.epoch = epoch
        order = epoch_order(len(indices), bs, steps_per_epoch, ic.seed, epoch, offset, stride=7919)
        return DataLoader(data, batch_size=bs, sampler=order, num_workers=workers, drop_last=True,
                          pin_memory=device.type == "cuda", collate_fn=collate)

    def loss(out, batch, at):
        edge, disp = out
        return irn_loss(edge.float(), None if disp is None else disp.float(),
                        reduce_labels(batch[1], edge.shape[-2:]), ic.train_radius)[0], {}

    task = Task(
        kind="irn", name="irn train", model=net, optimizer=optimizer, amp=amp,
        schedule=lambda step, epoch: poly_lr(step, total, 1.0, ic.poly_power), steps_per_epoch=steps_per_epoch,
        total_steps=total, batches=batches, forward=lambda batch, at: net(batch[0], with_displacement=net.displacement),
        loss=loss, checkpoint=ckpt, checkpoint_every=ic.checkpoint_every,
        save_meta=lambda: {"backbone": net.backbone_name, "displacement": net.displacement,
                           "freeze_backbone": net.freeze_backbone, "settings": settings},
        oom=(f"IRN step {{step}} (a batch of {bs} crops of {ic.crop}²)",
             "pseudo.irn.batch_size or pseudo.irn.crop (pseudo.amp=bf16 halves the activations)"),
        nonfinite_hint="lower pseudo.irn.lr", on_step=None if step_hook is None else lambda s, _: step_hook(s),
        progress=progress)
    fit(task, step, finished_step(state))
    return ckpt


# ----------------------------------------------------------------------------- inference
def _pad_size(sizes: Sequence[tuple[int, int]], crop: int) -> int:
    """The square side a batch of images is zero-padded to: its largest side rounded up to a multiple
    of 16, at most ``crop``. IRN pads every image to the crop (512), which is what a VOC image (500 px)
    gets here too; a 96-px image is not padded 28-fold [I]. Larger images go to the next multiple of
    16 [I] (IRN would crop them)."""
    side = max(max(h, w) for h, w in sizes)
    rounded = -(-side // 16) * 16
    return min(rounded, crop) if side <= crop else rounded


@torch.no_grad()
def boundary_maps(net: IRNet, images: Sequence[np.ndarray], device: torch.device | str = "cpu",
                  crop: int = 512) -> list[torch.Tensor]:
    """Class-boundary probabilities at stride 4 for (H, W, 3) uint8 images: each image and its flip,
    zero-padded (after normalisation) to one square size, logits averaged, sigmoid; a list of
    ((H−1)//4+1, (W−1)//4+1) tensors on ``device``."""
    from ..data.transforms import normalise_array as normalise_image

    device = torch.device(device)
    sizes = [im.shape[:2] for im in images]
    S = _pad_size(sizes, crop)
    x = torch.zeros(2 * len(images), 3, S, S)
    for i, im in enumerate(images):
        t = torch.from_numpy(normalise_image(np.asarray(im, dtype=np.uint8)))
        H, W = sizes[i]
        x[2 * i, :, :H, :W] = t
        x[2 * i + 1, :, :H, :W] = t.flip(-1)
    logits = net.eval()(x.to(device), with_displacement=False)[0][:, 0]
    out = []
    for i, (H, W) in enumerate(sizes):
        h, w = (H - 1) // 4 + 1, (W - 1) // 4 + 1
        out.append(torch.sigmoid(logits[2 * i, :h, :w] / 2 + logits[2 * i + 1, :h, :w].flip(-1) / 2))
    return out


def seed_grid(seed: SeedMaps, grid: tuple[int, int], ic: IRNConfig) -> tuple[torch.Tensor, np.ndarray]:
    """The maps the walk starts from on the (h, w) boundary grid and the mask label of each channel.
    ``irn``: the present classes, bilinear to the grid and max-normalised there (IRN's stride-4
    ``cam``); ``pot``: [background, maps] bilinear to the grid, to the power ``pot_power``."""
    classes = np.asarray(seed.classes, np.int64)
    maps = _resize(seed.maps, grid)
    if ic.variant == "pot":
        bg = _resize(np.asarray(seed.background, np.float32)[None], grid)
        return torch.cat([bg, maps]).pow(ic.pot_power), np.concatenate([[0], classes + 1])
    if len(classes):
        maps = maps / (maps.amax((1, 2), keepdim=True) + 1e-5)
    return maps, classes + 1


@torch.no_grad()
def irn_masks(net: IRNet, images: Sequence[np.ndarray], seeds: Sequence[SeedMaps], ic: IRNConfig,
              device: torch.device | str = "cpu") -> list[np.ndarray]:
    """(H, W) uint8 pseudo masks for a batch of images and their seeds (stage 3 of the module
    docstring). The batch's grids are padded to one size; padding is cut off the walk."""
    device = torch.device(device)
    edges = boundary_maps(net, images, device, ic.crop)
    grids = [tuple(e.shape) for e in edges]
    starts = [seed_grid(s, g, ic) for s, g in zip(seeds, grids)]
    B, K = len(images), max(v.shape[0] for v, _ in starts)
    h, w = max(g[0] for g in grids), max(g[1] for g in grids)
    edge = torch.ones(B, h, w, device=device)
    valid = torch.zeros(B, h, w, dtype=torch.bool, device=device)
    x = torch.zeros(B, max(K, 1), h, w, device=device)
    for i, ((gh, gw), (v, _)) in enumerate(zip(grids, starts)):
        edge[i, :gh, :gw] = edges[i]
        valid[i, :gh, :gw] = True
        x[i, :v.shape[0], :gh, :gw] = v.to(device)
    if K:
        dt = WALK_DTYPES[ic.walk_dtype]
        chunk = walk_chunk(B, h, w, ic.radius, dt, device)
        rw = torch.cat([propagate(x[a:a + chunk].to(dt), edge[a:a + chunk].to(dt), valid[a:a + chunk], ic.radius,
                                  ic.beta, ic.exp_times, ic.walk).float() for a in range(0, B, chunk)])
    else:
        rw = x
    masks = []
    for i, (im, (gh, gw), (v, keys)) in enumerate(zip(images, grids, starts)):
        H, W = im.shape[:2]
        if ic.variant == "irn" and len(keys) == 0:
            masks.append(np.zeros((H, W), np.uint8))
            continue
        up = F.interpolate(rw[i:i + 1, :v.shape[0], :gh, :gw], scale_factor=4, mode="bilinear",
                           align_corners=False)[0, :, :H, :W]
        up = up / up.max().clamp_min(1e-12)  # [I] an all-zero walk stays 0 (IRN would divide 0 by 0)
        if ic.variant == "irn":
            up = torch.cat([up.new_full((1, H, W), ic.sem_bg_threshold), up])
            keys = np.concatenate([[0], keys])
        masks.append(np.asarray(keys, np.uint8)[up.argmax(0).cpu().numpy()])
    return masks


def make_irn_masks(cfg: Config, ds, tasks: Sequence, todo: Sequence, seeds_dir: str | Path, work_dir: str | Path,
                   progress: bool = True) -> dict:
    """The three stages for ``tokenseg pseudo ... pseudo.refine=irn``: IR labels and IRNet from every
    task (``image_id``, ``seed_file``, ``image_path``, ``out_path``), masks for ``todo``."""
    from ..data import load_rgb

    validate_irn(cfg)
    ic = cfg.pseudo.irn
    if not ic.pretrained and not ic.weights:
        warnings.warn(NO_WEIGHTS_WARNING, stacklevel=2)
    work = Path(work_dir)
    label_dir = work / "labels"
    labels = make_ir_labels(cfg, tasks, seeds_dir, label_dir, progress)
    ckpt = train_irn(cfg, ds, [t.image_id for t in tasks], label_dir, work, progress, labels=labels)
    device = resolve_device(cfg.pseudo.device)
    net = load_irn(ckpt).to(device)
    bar = progress_bar(total=len(todo), desc="irn masks (random walk)", unit="img", disable=not progress)
    for start in range(0, len(todo), ic.infer_batch):
        batch = todo[start:start + ic.infer_batch]
        images = [np.asarray(load_rgb(t.image_path), dtype=np.uint8) for t in batch]
        seeds = [load_checked_seed(t.seed_file, ic.variant) for t in batch]
        for t, mask in zip(batch, irn_masks(net, images, seeds, ic, device)):
            save_palette_png(t.out_path, mask)
        bar.update(len(batch))
    bar.close()
    return {"work_dir": str(work), "labels": str(label_dir), "checkpoint": str(ckpt), "variant": ic.variant}


__all__ = ["validate_irn", "ir_label", "make_ir_labels", "walk_offsets", "boundary_bands", "transition_bands",
           "walk_banded", "walk_sparse", "sparse_transition", "propagate", "train_irn", "load_irn",
           "boundary_maps", "seed_grid", "irn_masks", "make_irn_masks", "read_irn_checkpoint"]
