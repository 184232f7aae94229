"""PSA's AffinityNet (Ahn & Kwak 2018), the MCTformer mask step (METHODS.md §7.1).

1. **Labels.** Each seed becomes two CRF'd label maps, with background ``(1 − max)^α`` at a low α
   (α = 1: more background, so its foreground is confident) and a high α (α = 12: more foreground,
   so its background is confident). Label = the low-α class where it is foreground, 0 where the
   high-α map is background, 255 (unknown) elsewhere.
2. **Training.** A CNN maps the image to features ``f`` at stride 8; the affinity of two cells is
   ``a_ij = exp(−mean_d |f_i − f_j|)``. For cell pairs within ``radius`` whose labels are both
   known, equal labels are positives (background pairs and foreground pairs apart), different labels
   negatives: ``L = L_bg/4 + L_fg/4 + L_neg/2`` with ``L_pos = −mean log a``, ``L_neg = −mean log(1 − a)``.
   PSA uses ResNet-38, which timm does not have; tokenseg uses a timm ResNet (``resnet50`` by default)
   at output stride 8 with the same three-level feature head (64 + 128 + 256 → 448 channels).
3. **Random walk.** The sparse affinity matrix of pairs within ``radius`` (symmetric, with self
   loops) becomes ``G = row_normalise(a^β)`` (β = 8) and the seeds with a constant background
   (0.39), pooled to the stride-8 grid, are walked ``2^logt`` (= 64) steps, upsampled, argmax'd.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import Config, PseudoConfig
from ..core import optim
from ..core.crf import CRFParams, crf_params_from_config, dense_crf, resolve_backend
from ..core.device import AmpStep, fixed_shapes, resolve_device
from ..core.errors import TokensegError
from ..core.masks import IGNORE_INDEX, save_palette_png
from ..core.progress import progress_bar as tqdm
from ..core.scores import find_seed_file, normalise_scores, seed_scores
from ..core.seeds import SeedMaps, load_seed
from ..fit import Task, epoch_order, finished_step, fit, poly_lr, read_state, restore


# ----------------------------------------------------------------------------- labels
def psa_label(seed: SeedMaps, image: np.ndarray, alpha_low: float = 1.0, alpha_high: float = 12.0,
              crf: CRFParams | None = None, backend: str = "auto", exact_pixels: int = 4096) -> np.ndarray:
    """(H, W) uint8 affinity label from one seed: confident foreground (low α), confident
    background (high α), 255 elsewhere."""
    size = image.shape[:2]

    def crf_label(alpha: float) -> np.ndarray:
        scores, labels = seed_scores(seed, size, "power", alpha=alpha)
        probs = normalise_scores(scores)
        if len(labels) > 1 and crf is not None:
            probs = dense_crf(image, probs, crf, backend, exact_pixels)
        return labels[probs.argmax(0)]

    low, high = crf_label(alpha_low), crf_label(alpha_high)
    out = np.where(low == 0, IGNORE_INDEX, low)
    out[high == 0] = 0
    return out.astype(np.uint8)


def _label_task(args) -> str:
    image_id, seed_file, image_path, out_path, pc, crf, backend = args
    from ..data import load_rgb

    # one thread in the pool's workers (their initializer sets it); in-process the caller's count stays
    image = np.asarray(load_rgb(image_path), dtype=np.uint8)
    lab = psa_label(load_seed(seed_file), image, pc.aff_alpha_low, pc.aff_alpha_high, crf, backend,
                    pc.crf_exact_pixels)
    save_palette_png(out_path, lab)
    return image_id


def make_affinity_labels(ds, ids: list[str], seeds_dir: Path, label_dir: Path, pc: PseudoConfig,
                         progress: bool = True) -> None:
    """Write ``label_dir/<id>.png`` for every id (existing files are kept: resumable)."""
    crf = crf_params_from_config(pc)
    backend = resolve_backend(pc.crf_backend)
    tasks = []
    for image_id in ids:
        out = label_dir / f"{image_id}.png"
        if out.is_file():
            continue
        sf = find_seed_file(seeds_dir, image_id)
        if sf is None:
            raise TokensegError(f"{seeds_dir}: no seed file for {image_id!r}")
        tasks.append((image_id, sf, ds.image_paths[ds.index_of(image_id)], out, pc, crf, backend))
    bar = tqdm(total=len(tasks), desc="affinity labels (CRF)", unit="img", disable=not progress)
    if pc.workers > 1 and len(tasks) > 1:
        from .workers import worker_pool

        with worker_pool(pc.workers) as pool:  # workers exit with this process
            for _ in pool.map(_label_task, tasks, chunksize=4):
                bar.update(1)
    else:
        for t in tasks:
            _label_task(t)
            bar.update(1)
    bar.close()


# ----------------------------------------------------------------------------- network
class AffinityNet(nn.Module):
    """Stride-8 CNN features for pairwise affinities (PSA head on a timm ResNet)."""

    def __init__(self, backbone: str = "resnet50", pretrained: bool = False, weights: str = "") -> None:
        super().__init__()
        from ..models.backbone import create_feature_backbone

        self.backbone_name = backbone
        self.encoder = create_feature_backbone(backbone, pretrained, weights, output_stride=8, out_indices=(2, 3, 4),
                                               key="pseudo.aff")
        chans = self.encoder.feature_info.channels()
        dims = (64, 128, 256)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1, bias=False), nn.GroupNorm(4, d), nn.ELU()) for c, d in zip(chans, dims))
        self.fuse = nn.Sequential(nn.Conv2d(sum(dims), sum(dims), 1, bias=False), nn.ELU())
        for m in [*self.proj.modules(), *self.fuse.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def backbone_parameters(self):
        return list(self.encoder.parameters())

    def head_parameters(self):
        return list(self.proj.parameters()) + list(self.fuse.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        size = feats[0].shape[-2:]
        parts = [p(f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False))
                 for p, f in zip(self.proj, feats)]
        return self.fuse(torch.cat(parts, 1))


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) to the forward half of the disc 0 < dy² + dx² < radius²: each unordered pair
    of cells within the radius appears once."""
    out = []
    for dy in range(0, radius):
        for dx in range(-radius + 1, radius):
            if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return out


def _shifted(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``t[..., y, x]`` and ``t[..., y + dy, x + dx]`` over the cells where both exist."""
    h, w = t.shape[-2:]
    x0, x1 = max(0, -dx), w - max(0, dx)
    a = t[..., 0:h - dy, x0:x1]
    b = t[..., dy:h, x0 + dx:x1 + dx]
    return a, b


def pair_affinities(feats: torch.Tensor, offsets: list[tuple[int, int]]) -> list[torch.Tensor]:
    """exp(−mean_d |f_i − f_j|) for every offset: list of (B, h', w')."""
    out = []
    for dy, dx in offsets:
        a, b = _shifted(feats, dy, dx)
        out.append(torch.exp(-(a - b).abs().mean(1)))
    return out


def affinity_loss(feats: torch.Tensor, labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, dict]:
    """PSA's loss for (B, D, h, w) features and (B, h, w) labels at the same resolution."""
    offsets = pair_offsets(radius)
    affs, bg, fg, neg = [], [], [], []
    for (dy, dx), aff in zip(offsets, pair_affinities(feats, offsets)):
        la, lb = _shifted(labels, dy, dx)
        known = (la != IGNORE_INDEX) & (lb != IGNORE_INDEX)
        same = known & (la == lb)
        affs.append(aff.reshape(-1))
        bg.append((same & (la == 0)).reshape(-1))
        fg.append((same & (la != 0)).reshape(-1))
        neg.append((known & (la != lb)).reshape(-1))
    aff = torch.cat(affs).float()
    bg, fg, neg = torch.cat(bg), torch.cat(fg), torch.cat(neg)
    eps = 1e-5

    def mean_of(values: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        # the mean over the selected pairs (0 when there are none) without a host sync
        return torch.where(sel, values, 0.0).sum() / sel.sum().clamp_min(1)

    l_bg = mean_of(-torch.log(aff + eps), bg)
    l_fg = mean_of(-torch.log(aff + eps), fg)
    l_neg = mean_of(-torch.log(1.0 + eps - aff), neg)
    loss = l_bg / 4 + l_fg / 4 + l_neg / 2
    # tensors, still on the device: reading them is the caller's (logging interval's) choice
    return loss, {"bg": l_bg.detach(), "fg": l_fg.detach(), "neg": l_neg.detach(),
                  "pairs": (bg.sum(), fg.sum(), neg.sum())}


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour (B, H, W) -> (B, h, w) label maps."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


# ----------------------------------------------------------------------------- training
def load_affinitynet(path: str | Path) -> AffinityNet:
    state = read_state(path, "affinitynet")  # tensors-only: a planted pickle cannot run code
    net = AffinityNet(state["backbone"])
    net.load_state_dict(state["model"])
    return net.eval()


def label_settings(cfg: Config, seeds_dir: str | Path) -> dict:
    """What shapes the CRF'd affinity labels (recorded in ``<work>/labels/label_settings.json``)."""
    pc = cfg.pseudo
    keys = ("aff_alpha_low", "aff_alpha_high", "crf_preset", "crf_backend", "crf_iters", "crf_gauss_sxy",
            "crf_gauss_compat", "crf_bi_sxy", "crf_bi_srgb", "crf_bi_compat", "crf_exact_pixels", "crf_image")
    return {"seeds": str(Path(seeds_dir).resolve()), **{k: getattr(pc, k) for k in keys}}


def training_settings(cfg: Config, ids: list[str], labels: dict) -> dict:
    """What shapes AffinityNet's weights (recorded in its checkpoint): the labels, the images, the recipe."""
    import hashlib

    pc = cfg.pseudo
    keys = ("aff_backbone", "aff_pretrained", "aff_weights", "aff_radius", "aff_crop", "aff_batch_size",
            "aff_epochs", "aff_lr", "aff_weight_decay", "aff_max_steps")
    ids_digest = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return {**{k: getattr(pc, k) for k in keys}, "seed": pc.aff_seed, "images": len(ids), "ids": ids_digest,
            "labels": labels}


def train_affinitynet(cfg: Config, ds, ids: list[str], seeds_dir: str | Path, work_dir: str | Path,
                      progress: bool = True, overwrite: bool = False) -> Path:
    """Labels (CRF at two α) + AffinityNet training; resumable. Returns the checkpoint path
    (``<work_dir>/affinitynet.pt``); a finished checkpoint made with the same settings is reused, one made
    with others is an error naming them (``overwrite`` redoes the labels and the training)."""
    from ..core.resume import check_settings, differing_settings_error, flatten
    from ..data.crops import CropDataset

    pc = cfg.pseudo
    work = Path(work_dir)
    ckpt = work / "affinitynet.pt"
    label_dir = work / "labels"
    labels = label_settings(cfg, seeds_dir)
    check_settings(label_dir, labels, overwrite, "label_settings.json", "affinity labels",
                   clear=tuple(p.name for p in label_dir.glob("*.png")) if overwrite and label_dir.is_dir() else ())
    settings = training_settings(cfg, ids, labels)
    state = None
    if ckpt.is_file() and not overwrite:
        state = read_state(ckpt, "affinitynet")
        old = flatten(state.get("settings") or {})  # none in checkpoints of older versions: not compared
        new = flatten(json.loads(json.dumps(settings)))
        diffs = [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old) if old[k] != new.get(k)]
        if diffs:
            raise differing_settings_error(ckpt, "an AffinityNet", diffs, "--work folder")
        if state.get("done"):
            return ckpt
    make_affinity_labels(ds, ids, Path(seeds_dir), label_dir, pc, progress)
    device = resolve_device(pc.device)
    torch.manual_seed(pc.aff_seed)
    net = AffinityNet(pc.aff_backbone, pc.aff_pretrained, pc.aff_weights).to(device)
    indices = [ds.index_of(k) for k in ids]
    bs = min(pc.aff_batch_size, len(indices))
    steps_per_epoch = max(len(indices) // bs, 1)
    total = pc.aff_max_steps if pc.aff_max_steps > 0 else pc.aff_epochs * steps_per_epoch
    groups = [{"params": net.backbone_parameters(), "lr": pc.aff_lr, "base_lr": pc.aff_lr},
              {"params": net.head_parameters(), "lr": pc.aff_lr * 10, "base_lr": pc.aff_lr * 10}]
    optimizer = optim.sgd(groups, cfg.train.fused_optimizer,
                          lr=pc.aff_lr, momentum=0.9, weight_decay=pc.aff_weight_decay)
    amp = AmpStep(pc.amp, device, optimizer)
    fixed_shapes(device)  # crops of pseudo.aff_crop
    step = 0 if state is None else restore(state, net, optimizer, amp.scaler, str(ckpt))
    data = CropDataset(ds, indices, label_dir, pc.aff_crop, (0.7, 1.3), True, seed=pc.aff_seed)

    def batches(epoch: int, offset: int) -> DataLoader:
        data.epoch = epoch
        order = epoch_order(len(indices), bs, steps_per_epoch, pc.aff_seed, epoch, offset, stride=7919)
        return DataLoader(data, batch_size=bs, sampler=order, num_workers=cfg.data.num_workers, drop_last=True,
                          pin_memory=device.type == "cuda")

    def loss(feats, batch, at):
        return affinity_loss(feats.float(), downsample_labels(batch[1], feats.shape[-2:]), pc.aff_radius)[0], {}

    task = Task(
        kind="affinitynet", name="affinitynet train", model=net, optimizer=optimizer, amp=amp,
        schedule=lambda step, epoch: poly_lr(step, total, 1.0, 0.9), steps_per_epoch=steps_per_epoch,
        total_steps=total, batches=batches, forward=lambda batch, at: net(batch[0]), loss=loss, checkpoint=ckpt,
        save_meta=lambda: {"backbone": net.backbone_name, "pseudo": dataclasses.asdict(pc), "settings": settings},
        oom=(f"AffinityNet step {{step}} (a batch of {bs} crops of {pc.aff_crop}²)",
             "pseudo.aff_batch_size or pseudo.aff_crop (pseudo.amp=bf16 halves the activations)"),
        nonfinite_hint="lower pseudo.aff_lr", progress=progress)
    fit(task, step, finished_step(state))
    return ckpt


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def affinity_for_image(net: AffinityNet, image: np.ndarray, radius: int = 5,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, tuple[int, int]]:
    """Sparse symmetric (M, M) affinity (self loops = 1) over the stride-8 grid of one image."""
    from ..data.transforms import normalise_array as normalise_image

    device = torch.device(device)
    x = torch.from_numpy(normalise_image(image))[None].to(device)
    feats = net.eval()(x).float().cpu()
    h, w = feats.shape[-2:]
    return sparse_affinity(feats[0], radius), (h, w)


def sparse_affinity(feats: torch.Tensor, radius: int) -> torch.Tensor:
    """(D, h, w) features -> sparse (h·w, h·w) symmetric affinity with unit diagonal."""
    h, w = feats.shape[-2:]
    idx = torch.arange(h * w).reshape(h, w)
    rows, cols, vals = [idx.reshape(-1)], [idx.reshape(-1)], [torch.ones(h * w)]
    offsets = pair_offsets(radius)
    for (dy, dx), aff in zip(offsets, pair_affinities(feats[None], offsets)):
        a, b = _shifted(idx, dy, dx)
        a, b, v = a.reshape(-1), b.reshape(-1), aff[0].reshape(-1)
        rows += [a, b]
        cols += [b, a]
        vals += [v, v]
    return torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                   (h * w, h * w), check_invariants=False).coalesce()
