"""Training transforms and the classification dataset wrapper.

Augmentation randomness is derived from ``(seed, epoch, sample index)`` rather than from a worker's
RNG stream, so a sample looks the same however the data is split over DataLoader workers or DDP
ranks. That is what lets a resumed run, or a run on two processes, reproduce a single-process run.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import WSSSDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_images(images_uint8: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) uint8 (or 0–255 float) on any device -> normalised float32, as ToTensor + Normalize."""
    m = torch.tensor(mean, device=images_uint8.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images_uint8.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def build_train_transform(kind: str, img_size: int, crop_scale=(0.08, 1.0), color_jitter: float = 0.0):
    """``deit``: the timm ImageNet recipe the authors train with (RandomResizedCrop bicubic, flip,
    RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25 pixel mode); ``simple``: crop + flip.

    The authors pass colour jitter 0.4 too, but timm applies it only without an auto-augment policy,
    so their effective recipe has none (METHODS.md §16.2): ``color_jitter`` > 0 adds it explicitly."""
    from torchvision import transforms as T

    if kind == "deit":
        from timm.data import create_transform

        tf = create_transform(
            input_size=img_size, is_training=True, scale=tuple(crop_scale), color_jitter=None,
            auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25, re_mode="pixel",
            re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if color_jitter > 0:
            tf.transforms.insert(2, T.ColorJitter(color_jitter, color_jitter, color_jitter))
        return tf
    steps = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_eval_transform(img_size: int):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def normalise_array(arr: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 normalised (the numpy twin of :func:`normalise_images`)."""
    x = (arr.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _seeded(seed_parts: list[int], fn, *args):
    """Run ``fn(*args)`` with torch/random/numpy seeded from ``seed_parts``, leaving the global RNGs as
    they were (drop-path draws from the global torch RNG: augmentation must not move it)."""
    s = int(np.random.SeedSequence(seed_parts).generate_state(1)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s)
        out = fn(*args)
    random.setstate(py_state)
    np.random.set_state(np_state)
    return out


class TrainSet(Dataset):
    """A training sample as a dict: one tensor per named view, ``labels`` (C,), ``index``, and the
    method's extra inputs (e.g. a precomputed CAM, co-augmented with its view).

    View ``v`` of sample ``i`` in ``epoch`` draws its randomness from (seed, epoch, i) for the first view
    and (seed, epoch, i, v) for the others, so resumed and multi-process runs see the same samples. A view
    with a ``start_epoch`` attribute is left out of the samples of earlier epochs (its step does not read it)."""

    def __init__(self, ds: WSSSDataset, views: dict, seed: int = 0, extras=None) -> None:
        self.ds, self.views, self.seed, self.extras = ds, views, seed, extras
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        img = self.ds.load_image(i)
        extras = self.extras(i) if self.extras is not None else {}
        sample = {"labels": torch.from_numpy(self.ds.multi_hot(i)), "index": i}
        for v, (name, view) in enumerate(self.views.items()):
            if self.epoch < getattr(view, "start_epoch", 0):
                continue
            parts = [self.seed, self.epoch, i] if v == 0 else [self.seed, self.epoch, i, v]
            x, out_extras = _seeded(parts, view, img, extras)
            sample[name] = x
            for k, val in out_extras.items():
                sample[k if v == 0 else f"{k}_{name}"] = val
        return sample


class ClassificationSet(Dataset):
    """(image tensor, multi-hot labels, index) with per-sample seeded augmentation."""

    def __init__(self, ds: WSSSDataset, transform, seed: int = 0, deterministic_aug: bool = True) -> None:
        self.ds, self.transform, self.seed = ds, transform, seed
        self.deterministic_aug = deterministic_aug
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img = self.ds.load_image(i)
        if self.deterministic_aug:
            s = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
            py_state, np_state = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s)
                x = self.transform(img)
            random.setstate(py_state)
            np.random.set_state(np_state)
        else:
            x = self.transform(img)
        return x, torch.from_numpy(self.ds.multi_hot(i)), i


def input_scales(cfg, size: tuple[int, int]) -> list[float]:
    """``maps.scales``, shrunk so that the largest view's longest side stays within ``maps.max_side``
    (``cfg``: a MapsConfig; ``size``: the image's (H, W)). Without a cap, or under it, the scales as given."""
    scales = list(cfg.scales)
    if cfg.max_side > 0:
        r = cfg.max_side / (max(size) * max(scales))
        if r < 1:
            scales = [s * r for s in scales]
    return scales
