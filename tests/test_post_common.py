"""Shared fixtures for the post-processing tests (toy VOC-layout datasets, seeds, tiny checkpoints),
plus the config checks of the ``pseudo`` / ``segment`` sections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tokenseg.config import Config, PseudoConfig, SegmentConfig, load_config
from tokenseg.core.seeds import SeedMaps, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import save_palette_png

CLASSES = ["box", "disc"]


def draw_toy(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """An image with a bright box (class 0) and/or a disc (class 1) on a dark background; its mask."""
    img = np.zeros((size, size, 3), np.float32) + rng.uniform(20, 60, 3)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    present = [[0], [1], [0, 1]][int(rng.integers(0, 3))]
    for c in present:
        if c == 0:
            y0, x0 = rng.integers(2, size // 2 - 4, 2)
            h, w = rng.integers(size // 4, size // 2, 2)
            region = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            colour = (220, 200, 40)
        else:
            cy, cx = rng.integers(size // 2, size - size // 5, 2)
            r = rng.integers(size // 8, size // 5)
            region = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            colour = (40, 200, 230)
        img[region] = colour
        mask[region] = c + 1
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, mask, sorted({int(v) - 1 for v in np.unique(mask) if v > 0})


def make_toy_voc(root: Path, n_train: int = 6, n_val: int = 2, size: int = 48, seed: int = 0) -> Path:
    """A VOC-layout dataset (JPEGImages, SegmentationClass, ImageSets, labels.json) of toy images."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:03d}" for i in range(n_train + n_val)]
    labels = {}
    for image_id in ids:
        img, mask, present = draw_toy(rng, size)
        Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=97)
        save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        labels[image_id] = [CLASSES[c] for c in present]
    seg = root / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (seg / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    (seg / "all.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.json").write_text(json.dumps({"classes": CLASSES, "source": "toy", "labels": labels}))
    return root


def toy_overrides(root: Path, tmp: Path) -> list[str]:
    return [f"data.root={root}", "data.format=voc", "data.train_split=train", "data.val_split=val",
            f"data.cache_dir={tmp / 'cache'}", "data.num_workers=0", f"output_dir={tmp / 'run'}",
            "maps.split=train"]


def toy_config(root: Path, tmp: Path, *extra: str) -> Config:
    return load_config(None, toy_overrides(root, tmp) + list(extra))


def write_config_file(path: Path, root: Path, tmp: Path, *extra: str) -> Path:
    """A YAML config the CLI can read (the same settings as :func:`toy_config`)."""
    cfg = toy_config(root, tmp, *extra)
    path.write_text(yaml.safe_dump(
        {"data": {k: getattr(cfg.data, k) for k in ("root", "format", "train_split", "val_split", "cache_dir",
                                                    "num_workers")},
         "output_dir": cfg.output_dir, "maps": {"split": "train"}}))
    return path


def seeds_from_masks(root: Path, out: Path, split: str = "train", blur: float = 2.0, shift: int = 0,
                     seed: int = 0) -> Path:
    """Seeds that look like CAMs: each present class's GT region blurred (and shifted), min–max scaled."""
    from scipy.ndimage import gaussian_filter, shift as nd_shift

    from tokenseg.core.masks import read_mask

    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    labels = json.loads((root / "labels.json").read_text())["labels"]
    for image_id in ids:
        mask = read_mask(root / "SegmentationClass" / f"{image_id}.png")
        classes = np.array([CLASSES.index(n) for n in labels[image_id]], np.int64)
        maps = []
        for c in classes:
            m = gaussian_filter((mask == c + 1).astype(np.float32), blur)
            if shift:
                m = nd_shift(m, (0, shift), order=1)
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            maps.append(m)
        save_seed(out / f"{image_id}.npz", SeedMaps(classes, np.stack(maps), {"kind": "toy"}))
    return out


def tiny_classifier_checkpoint(path: Path, root: Path, tmp: Path, *overrides: str) -> Path:
    """A randomly initialised tiny MCTformer+ checkpoint in the engine's format (``overrides``: config keys)."""
    import torch

    from tokenseg.methods.mctformer.model import build_model

    cfg = toy_config(root, tmp, "model.backbone=vit_tiny_patch16_224", "model.img_size=64",
                     "model.method=mctformer-plus", "maps.scales=[1.0]", "maps.flip=false", "maps.layers=2",
                     *overrides)
    cfg.model.backbone_kwargs = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=len(CLASSES))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": CLASSES, "step": 0}, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one torch thread is faster, and much faster on a busy machine (no spinning)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- config tests
def test_post_config_defaults_are_the_papers():
    cfg = Config()
    assert isinstance(cfg.pseudo, PseudoConfig) and isinstance(cfg.segment, SegmentConfig)
    p, s = cfg.pseudo, cfg.segment
    assert (p.aff_alpha_low, p.aff_alpha_high, p.rw_beta, p.rw_logt, p.rw_bg) == (1.0, 12.0, 8.0, 6, 0.39)
    assert p.aff_radius == 5
    assert (p.aff_crop, p.aff_batch_size, p.aff_lr, p.aff_weight_decay, p.aff_epochs) == (448, 8, 0.01, 5e-4, 5)
    assert s.aspp_dilations == [6, 12, 18, 24] and s.output_stride == 8 and s.backbone == "resnet101"
    assert (s.momentum, s.poly_power, s.head_lr_mult, s.crop_size, s.scale_range) == (0.9, 0.9, 10.0, 321, [0.7, 1.3])
    assert s.eval_scales == [0.5, 0.75, 1.0, 1.25, 1.5] and s.eval_merge == "max"


def test_post_config_overrides_and_validation(tmp_path):
    cfg = load_config(None, ["pseudo.crf=true", "pseudo.crf_preset=clip-es", "pseudo.confidence=0.95",
                             "segment.aspp_dilations=[1,2]", "segment.pretrained=true"])
    assert cfg.pseudo.crf and cfg.pseudo.crf_preset == "clip-es" and cfg.segment.aspp_dilations == [1, 2]
    with pytest.raises(TokensegError, match="pseudo.refine"):
        load_config(None, ["pseudo.refine=magic"])
    with pytest.raises(TokensegError, match="confidence"):
        load_config(None, ["pseudo.confidence=1.5"])
    with pytest.raises(TokensegError, match="segment.arch"):
        load_config(None, ["segment.arch=unet"])
    with pytest.raises(TokensegError, match="did you mean"):
        load_config(None, ["segment.crop=64"])
    # the sections survive a YAML round trip (what checkpoints store)
    cfg.save(tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again.pseudo == cfg.pseudo and again.segment == cfg.segment
