"""Seeds -> pseudo masks: palette PNGs, background models, CRF, confidence ignore, resume, mask mIoU,
the attention and AffinityNet random walks, and the ``pseudo`` CLI."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import (CLASSES, make_toy_voc, one_thread, seeds_from_masks,  # noqa: E402,F401
                              tiny_classifier_checkpoint, toy_config, write_config_file)

from tokenseg.cli import main  # noqa: E402
from tokenseg.data import build_dataset  # noqa: E402
from tokenseg.core.seeds import SeedMaps, load_seed, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import read_mask, save_palette_png, voc_palette
from tokenseg.refine.pseudo import attention_affinity, evaluate_masks, make_pseudo_masks  # noqa: E402


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("pseudo")
    root = make_toy_voc(base / "voc", n_train=6, n_val=2, size=40)
    seeds = seeds_from_masks(root, base / "seeds", "train", blur=2.0)
    return base, root, seeds


def reference_mask(seed: SeedMaps, t: float | None = None, alpha: float | None = None) -> np.ndarray:
    maps = seed.maps.astype(np.float32)
    m = maps.max(0)
    bg = np.full_like(m, t) if t is not None else (1 - m) ** alpha
    lab = np.where(m > bg, seed.classes[maps.argmax(0)] + 1, 0)
    return lab.astype(np.uint8)


@pytest.mark.parametrize("mode", ["constant", "power"])
def test_masks_are_palette_pngs_matching_the_argmax(toy, tmp_path, mode):
    base, root, seeds = toy
    extra = ["pseudo.threshold=0.4"] if mode == "constant" else ["pseudo.background=power", "pseudo.alpha=2"]
    cfg = toy_config(root, tmp_path, *extra)
    out = tmp_path / "masks"
    summary = make_pseudo_masks(cfg, seeds, out, progress=False)
    assert summary["images"] == 6 and summary["written"] == 6
    ds = build_dataset(cfg.data, "train")
    for image_id in ds.ids:
        with Image.open(out / f"{image_id}.png") as im:
            assert im.mode == "P"
            pal = np.array(im.getpalette()[:21 * 3]).reshape(-1, 3)
            np.testing.assert_array_equal(pal, voc_palette(21))
            mask = np.asarray(im)
        seed = load_seed(seeds / f"{image_id}.npz")
        ref = reference_mask(seed, t=0.4) if mode == "constant" else reference_mask(seed, alpha=2.0)
        np.testing.assert_array_equal(mask, ref)
    assert (tmp_path / "masks" / "config.yaml").is_file()


def test_confidence_mask_ignores_uncertain_pixels(toy, tmp_path):
    base, root, _ = toy
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    seeds = tmp_path / "seeds"
    # one class with a linear ramp 0..1 across the image: normalised prob = max(m, 0.4)/(m + 0.4)
    H, W = read_mask(ds.mask_paths[0]).shape
    ramp = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    for image_id in ds.ids:
        save_seed(seeds / f"{image_id}.npz", SeedMaps(np.array([1]), ramp[None]))
    cfg = toy_config(root, tmp_path, "pseudo.threshold=0.4", "pseudo.confidence=0.7")
    make_pseudo_masks(cfg, seeds, tmp_path / "m", progress=False)
    mask = read_mask(tmp_path / "m" / f"{ds.ids[0]}.png")
    ramp16 = ramp.astype(np.float16).astype(np.float32)  # seeds are stored as float16
    p = np.maximum(ramp16, 0.4) / (ramp16 + 0.4)
    expected = np.where(ramp16 > 0.4, 2, 0)
    expected[p < 0.7] = 255
    np.testing.assert_array_equal(mask, expected)
    assert (mask == 255).any() and (mask == 2).any() and (mask == 0).any()


def test_crf_pseudo_masks_beat_the_raw_seeds(toy, tmp_path):
    base, root, _ = toy
    seeds = seeds_from_masks(root, tmp_path / "shifted", "train", blur=2.5, shift=3)
    cfg = toy_config(root, tmp_path, "pseudo.background=power", "pseudo.alpha=1", "pseudo.crf_backend=torch")
    make_pseudo_masks(cfg, seeds, tmp_path / "raw", progress=False)
    cfg.pseudo.crf = True
    cfg.pseudo.crf_preset = "psa"
    make_pseudo_masks(cfg, seeds, tmp_path / "crf", progress=False)
    ds = build_dataset(cfg.data, "train")
    raw = evaluate_masks(tmp_path / "raw", ds)["miou"]
    crf = evaluate_masks(tmp_path / "crf", ds)["miou"]
    assert crf > raw + 3 and crf > 85, (raw, crf)


def test_resume_keeps_existing_masks_and_overwrite_replaces_them(toy, tmp_path):
    base, root, seeds = toy
    cfg = toy_config(root, tmp_path)
    out = tmp_path / "m"
    make_pseudo_masks(cfg, seeds, out, progress=False)
    first = sorted(out.glob("*.png"))[0]
    save_palette_png(first, np.full(read_mask(first).shape, 7, np.uint8))  # a marker
    s = make_pseudo_masks(cfg, seeds, out, progress=False)
    assert s["written"] == 0 and s["skipped_existing"] == 6 and read_mask(first).max() == 7
    s = make_pseudo_masks(cfg, seeds, out, overwrite=True, progress=False)
    assert s["written"] == 6 and read_mask(first).max() < 7
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_evaluate_masks_hand_computed(toy, tmp_path):
    base, root, _ = toy
    ds = build_dataset(toy_config(root, tmp_path).data, "train").subset(["img000", "img001"])
    out = tmp_path / "pred"
    gts, preds = [], []
    for k, image_id in enumerate(ds.ids):
        gt = ds.load_mask(k)
        pred = gt.copy()
        pred[:, :10] = 0  # wipe a stripe to background
        pred[0, :] = 255  # and leave the first row out (ignore)
        save_palette_png(out / f"{image_id}.png", pred)
        gts.append(gt.ravel())
        preds.append(pred.ravel())
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    labelled = gt != 255
    iou = []
    for c in range(3):  # an ignored prediction is a miss for its ground-truth class
        tp = np.sum((gt == c) & (pred == c))
        union = np.sum(gt == c) + np.sum((pred == c) & labelled) - tp
        iou.append(tp / union)
    res = evaluate_masks(out, ds)
    assert res["images"] == 2 and res["missing"] == 0
    assert np.isclose(res["miou"], np.mean(iou) * 100)
    assert np.isclose(res["ignored_fraction"], np.sum((pred == 255) & labelled) / labelled.sum())
    assert list(res["iou"]) == ["background"] + CLASSES
    # a folder that covers only part of the dataset: the rest is counted as missing
    full = build_dataset(toy_config(root, tmp_path).data, "train")
    assert evaluate_masks(out, full)["missing"] == 4


def test_attention_random_walk_uses_the_classifiers_affinity(toy, tmp_path):
    base, root, seeds = toy
    ckpt = tiny_classifier_checkpoint(tmp_path / "cls.pt", root, tmp_path)
    cfg = toy_config(root, tmp_path, "pseudo.refine=attention", "pseudo.attn_beta=2", "pseudo.attn_t=3",
                     "pseudo.threshold=0.3")
    summary = make_pseudo_masks(cfg, seeds, tmp_path / "m", checkpoint=ckpt, progress=False)
    assert summary["written"] == 6
    # the same walk written out with numpy
    from tokenseg.engine import load_model_from_checkpoint

    model = load_model_from_checkpoint(ckpt)[0]
    ds = build_dataset(cfg.data, "train")
    image = np.asarray(ds.load_image(0), dtype=np.uint8)
    aff, grid = attention_affinity(model, image)
    assert grid == (5, 5) and aff.shape == (25, 25)  # 40 px / patch 8
    seed = load_seed(seeds / f"{ds.ids[0]}.npz")
    scores = np.concatenate([np.full((1, 40, 40), 0.3, np.float32), seed.maps.astype(np.float32)])
    pooled = scores.reshape(len(scores), 5, 8, 5, 8).mean((2, 4)).reshape(len(scores), -1)
    A = aff.double().numpy()
    G = (A / A.max()) ** 2
    G = G / G.sum(1, keepdims=True)
    walked = pooled @ np.linalg.matrix_power(G, 3).T
    up = torch.nn.functional.interpolate(torch.from_numpy(walked.reshape(1, -1, 5, 5)), size=(40, 40),
                                         mode="bilinear", align_corners=False)[0].numpy()
    labels = np.concatenate([[0], seed.classes + 1])
    expected = labels[up.argmax(0)]
    got = read_mask(tmp_path / "m" / f"{ds.ids[0]}.png")
    assert (got == expected).mean() > 0.995


def test_affinitynet_end_to_end(toy, tmp_path):
    base, root, seeds = toy
    cfg = toy_config(root, tmp_path, "pseudo.refine=affinitynet", "pseudo.aff_backbone=resnet10t",
                     "pseudo.aff_crop=40", "pseudo.aff_batch_size=3", "pseudo.aff_max_steps=25",
                     "pseudo.aff_lr=0.05", "pseudo.aff_radius=3", "pseudo.crf_backend=torch", "pseudo.rw_logt=3")
    work = tmp_path / "work"
    summary = make_pseudo_masks(cfg, seeds, tmp_path / "m", work_dir=work, progress=False)
    assert summary["written"] == 6 and (work / "affinitynet.pt").is_file()
    state = torch.load(work / "affinitynet.pt", weights_only=False)
    assert state["done"] and state["step"] == 25
    labels = sorted((work / "labels").glob("*.png"))
    assert len(labels) == 6
    lab = read_mask(labels[0])
    assert set(np.unique(lab)) <= {0, 1, 2, 255} and (lab == 255).any()
    # the trained network separates what the labels separate: affinity across a label boundary is
    # lower than within a region
    from tokenseg.refine.affinitynet import load_affinitynet
    from tokenseg.data.transforms import normalise_array as normalise_image

    net = load_affinitynet(work / "affinitynet.pt")
    ds = build_dataset(cfg.data, "train")
    within, across = [], []
    for k in range(len(ds)):
        img = np.asarray(ds.load_image(k), dtype=np.uint8)
        gt = torch.from_numpy(ds.load_mask(k).astype(np.int64))[None]
        with torch.no_grad():
            f = net(torch.from_numpy(normalise_image(img))[None])
        from tokenseg.refine.affinitynet import downsample_labels, pair_affinities, _shifted

        g = downsample_labels(gt, f.shape[-2:])
        for (dy, dx), a in zip(pair_offsets_(3), pair_affinities(f, pair_offsets_(3))):
            la, lb = _shifted(g, dy, dx)
            within.append(a[la == lb])
            across.append(a[la != lb])
    assert torch.cat(across).mean() < torch.cat(within).mean() - 0.05
    masks = evaluate_masks(tmp_path / "m", ds)
    assert masks["images"] == 6 and masks["miou"] > 40
    # a second run reuses the finished network and masks
    again = make_pseudo_masks(cfg, seeds, tmp_path / "m", work_dir=work, progress=False)
    assert again["written"] == 0


def pair_offsets_(r):
    from tokenseg.refine.affinitynet import pair_offsets

    return pair_offsets(r)


def test_pseudo_cli(toy, tmp_path, capsys):
    base, root, seeds = toy
    cfg_file = write_config_file(tmp_path / "c.yaml", root, tmp_path)
    out = tmp_path / "masks"
    rc = main(["pseudo", str(cfg_file), "pseudo.threshold=0.4", "--seeds", str(seeds), "--out", str(out),
               "--eval", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert rc == 0
    assert len(list(out.glob("*.png"))) == 6
    text = capsys.readouterr().out
    assert "mIoU" in text and "disc" in text
    assert (tmp_path / "r.json").is_file()
    rc = main(["pseudo", str(cfg_file), "--seeds", str(tmp_path / "nowhere"), "--out", str(out), "--quiet"])
    assert rc == 2 and "seeds folder not found" in capsys.readouterr().err
    with pytest.raises(TokensegError):
        make_pseudo_masks(toy_config(root, tmp_path), tmp_path / "nowhere2", out, progress=False)
    with pytest.raises(TokensegError, match="inside the dataset"):  # never write into the dataset
        make_pseudo_masks(toy_config(root, tmp_path), seeds, root / "SegmentationClass", progress=False)
