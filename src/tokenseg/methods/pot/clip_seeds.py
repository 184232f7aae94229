"""Precomputed CLIP-ES seeds of a dataset, the per-image inputs of POT's training and maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import TokensegError


# ----------------------------------------------------------------------------------------- CLIP-ES seeds
class ClipSeeds:
    """Precomputed CLIP-ES seeds of a dataset: our ``.npz`` seed files (``tokenseg maps clip-es``) or
    their ``.npy`` dicts (``keys`` + ``attn_highres``), one per image id, in ``pot.clip_seeds`` (a
    seeds root with kind sub-folders, or the folder of one kind; ``{split}`` is replaced by ``split``).
    Every image must have one: missing files are an error up front, naming a few."""

    def __init__(self, pc, ds, split: str = "") -> None:
        from ...core.seeds import seed_folders

        text = pc.clip_seeds.replace("{split}", split)
        root = Path(text)
        if not root.is_dir():
            raise TokensegError(f"pot.clip_seeds: folder {root} not found (make the CLIP-ES seeds first, e.g. "
                                f"`tokenseg maps clip-es --split {split or 'train_aug'}`)")
        folders = seed_folders(root)
        if pc.clip_kind:
            if pc.clip_kind not in folders:
                raise TokensegError(f"pot.clip_kind: {root} has no seeds of kind {pc.clip_kind!r} "
                                    f"(kinds: {', '.join(folders) or 'none'})")
            folder = folders[pc.clip_kind]
        elif len(folders) == 1:
            folder = next(iter(folders.values()))
        elif not folders:
            raise TokensegError(f"pot.clip_seeds: {root} holds no seed files (.npz / .npy)")
        else:
            raise TokensegError(f"pot.clip_seeds: {root} holds several kinds ({', '.join(folders)}): "
                                f"set pot.clip_kind")
        self.folder, self.allow_pickle, self.num_classes = folder, pc.clip_allow_pickle, ds.num_classes
        self.ids = list(ds.ids)
        self.paths = [self._find(i) for i in self.ids]
        missing = [i for i, p in zip(self.ids, self.paths) if p is None]
        if missing:
            raise TokensegError(f"pot.clip_seeds: {len(missing)} of {len(self.ids)} images have no CLIP-ES seed "
                                f"in {folder} (e.g. {', '.join(missing[:3])}); the folder must cover the split "
                                f"{split or ds.name!r}")

    def _find(self, image_id: str) -> Path | None:
        for ext in (".npz", ".npy"):
            p = self.folder / f"{image_id}{ext}"
            if p.is_file():
                return p
        return None

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes (n,) int64, maps (n, H, W) float32) of image ``i``."""
        path = self.paths[i]
        if path.suffix == ".npy":
            from ..clip_es.files import load_clip_es_npy

            seed = load_clip_es_npy(path, allow_pickle=self.allow_pickle)
        else:
            from ...core.seeds import load_seed

            seed = load_seed(path)
        classes = np.asarray(seed.classes, np.int64).reshape(-1)
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise TokensegError(f"{path}: class indices {classes.tolist()} outside 0..{self.num_classes - 1}")
        maps = np.asarray(seed.maps, np.float32)
        if maps.ndim != 3 or len(maps) != len(classes):
            raise TokensegError(f"{path}: {len(classes)} classes but maps of shape {maps.shape}")
        return classes, maps

    def __call__(self, i: int) -> dict:
        """The training extras of sample ``i`` (the view co-augments them)."""
        classes, maps = self.load(i)
        return {"clip_classes": classes, "clip_maps": maps, "clip_num_classes": np.int64(self.num_classes)}

    def batch(self, idx: list[int], size: tuple[int, int], device) -> dict:
        """The maps of a batch of same-size images as (image, class) pairs at image resolution."""
        pairs, maps = [], []
        for b, i in enumerate(idx):
            classes, m = self.load(i)
            t = torch.from_numpy(m)
            if tuple(t.shape[-2:]) != tuple(size):  # [I] seeds of another size are stretched to the image
                t = F.interpolate(t[None], size, mode="bilinear", align_corners=False)[0]
            pairs += [(b, int(c)) for c in classes]
            maps.append(t)
        maps_t = torch.cat(maps) if maps else torch.zeros(0, *size)
        return {"clip_pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2).to(device),
                "clip_maps": maps_t.to(device)}


def extras(cfg, dataset):
    """Training extras: the CLIP-ES seeds of each image when ``pot.clip_seeds`` is set."""
    if not cfg.pot.clip_seeds:
        return None
    return ClipSeeds(cfg.pot, dataset, _split_name(cfg.data.train_split))


def _split_name(split: str) -> str:
    return Path(split).stem if split.endswith(".txt") else split
