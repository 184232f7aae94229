"""Segmentation stage: networks, overfitting a few images, resume = uninterrupted run, evaluation,
prediction (one mask per input), clear weight errors, the CLI, and the demo chain."""
from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import (CLASSES, make_toy_voc, one_thread, seeds_from_masks,  # noqa: E402,F401
                              tiny_classifier_checkpoint, toy_config, write_config_file)

from tokenseg.cli import main  # noqa: E402
from tokenseg.config import SegmentConfig  # noqa: E402
from tokenseg.data import build_dataset  # noqa: E402
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import read_mask  # noqa: E402
from tokenseg.pipeline.chain import run_post_chain  # noqa: E402
from tokenseg.segment import (build_segmenter, evaluate_segmentation, load_segmenter, predict,  # noqa: E402
                              predict_mask, train_segmentation)

SMALL = ["segment.backbone=resnet10t", "segment.feature_stage=3", "segment.aspp_dilations=[1,2]",
         "segment.crop_size=64", "segment.batch_size=3", "segment.optimizer=adamw", "segment.lr=0.005",
         "segment.head_lr_mult=1", "segment.weight_decay=0", "segment.num_workers=0", "segment.eval_scales=[1.0]",
         "segment.eval_flip=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small DeepLab trained on the ground-truth masks of 6 toy images (as if they were pseudo masks)."""
    base = tmp_path_factory.mktemp("segment")
    root = make_toy_voc(base / "voc", n_train=6, n_val=2, size=64, seed=1)
    masks = base / "masks"
    masks.mkdir()
    ds = build_dataset(toy_config(root, base).data, "train")
    for p in ds.mask_paths:
        shutil.copy(p, masks / p.name)
    cfg = toy_config(root, base, *SMALL, "segment.max_steps=60", "segment.val_split=train",
                     "segment.scale_range=[0.9,1.1]")
    metrics = train_segmentation(cfg, masks, base / "seg", progress=False)
    return base, root, masks, cfg, metrics


def test_deeplab_and_vit_shapes():
    sc = SegmentConfig(backbone="resnet10t", feature_stage=3, aspp_dilations=[1, 2])
    net = build_segmenter(sc, 3).eval()
    assert net.backbone.feature_info.reduction()[-1] == 8
    with torch.no_grad():
        assert net(torch.randn(2, 3, 37, 45)).shape == (2, 3, 37, 45)
    full = build_segmenter(SegmentConfig(backbone="resnet18"), 4)  # the papers' ASPP on a full ResNet
    assert [b.dilation for b in full.head.branches] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    vit = build_segmenter(SegmentConfig(arch="vit", backbone="vit_tiny_patch16_224", backbone_kwargs={
        "img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}), 3).eval()
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 37, 45)).shape == (1, 3, 37, 45)


def test_overfits_a_few_images(trained):
    base, root, masks, cfg, metrics = trained
    assert metrics["steps"] == 60 and metrics["train_images"] == 6
    assert metrics["val"]["miou"] > 85, metrics["val"]
    # the same number from the evaluator reading the checkpoint back
    res = evaluate_segmentation(cfg, base / "seg" / "checkpoint.pt", split="train", progress=False)
    assert abs(res["miou"] - metrics["val"]["miou"]) < 1e-6
    # multi-scale + flip + CRF runs and stays good
    res2 = evaluate_segmentation(cfg, base / "seg" / "checkpoint.pt", split="train", scales=[0.75, 1.0, 1.25],
                                 flip=True, crf=True, progress=False)
    assert res2["miou"] > 80 and res2["crf"] and res2["scales"] == [0.75, 1.0, 1.25]


def test_resume_equals_an_uninterrupted_run(trained, tmp_path):
    base, root, masks, _, _ = trained
    common = [*SMALL, "segment.eval_at_end=false", "segment.checkpoint_every=1"]
    straight = train_segmentation(toy_config(root, tmp_path, *common, "segment.max_steps=5"), masks,
                                  tmp_path / "a", progress=False)
    # "interrupt" after 3 steps: a run whose checkpoint is at step 3 of the same 5-step schedule
    cfg = toy_config(root, tmp_path, *common, "segment.max_steps=5")
    cfg_short = toy_config(root, tmp_path, *common, "segment.max_steps=5")
    part = tmp_path / "b"
    _train_until(cfg_short, masks, part, stop_at=3)
    resumed = train_segmentation(cfg, masks, part, resume=True, progress=False)
    assert straight["steps"] == resumed["steps"] == 5
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _train_until(cfg, masks, out, stop_at: int) -> None:
    """Run training and kill it (KeyboardInterrupt) after ``stop_at`` optimiser steps."""
    from tokenseg.segment import train as trainmod

    real = trainmod.poly_lr
    calls = {"n": 0}

    def counting(*args):
        calls["n"] += 1
        if calls["n"] > stop_at:  # the schedule is asked once per step
            raise KeyboardInterrupt
        return real(*args)

    trainmod.poly_lr = counting
    try:
        with pytest.raises(KeyboardInterrupt):
            train_segmentation(cfg, masks, out, progress=False)
    finally:
        trainmod.poly_lr = real
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == stop_at
    assert not list(out.glob(".*.tmp"))


def test_predict_writes_one_mask_per_input(trained, tmp_path):
    base, root, _, _, _ = trained
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(ds.image_paths[0], other / ds.image_paths[0].name)  # same stem, different folder
    Image.open(ds.image_paths[1]).convert("RGB").save(other / "b.png")
    inputs = [str(ds.image_paths[0]), str(ds.image_paths[2]), str(other)]
    out = tmp_path / "pred"
    results = predict(inputs, base / "seg" / "checkpoint.pt", out, progress=False)
    assert len(results) == 4
    pngs = sorted(p.name for p in out.glob("*.png") if not p.name.endswith("_overlay.png"))
    assert len(pngs) == 4 and len(list(out.glob("*_overlay.jpg"))) == 4
    model, _, _ = load_segmenter(base / "seg" / "checkpoint.pt")
    for r in results:
        img = np.asarray(Image.open(r["image"]).convert("RGB"))
        mask = read_mask(r["mask"])
        assert mask.shape == img.shape[:2]
        np.testing.assert_array_equal(mask, predict_mask(model, img))
    # the overfit model's predictions match the ground truth of its training images
    gt = ds.load_mask(2)
    assert (read_mask(results[1]["mask"]) == gt).mean() > 0.9


def test_predict_from_a_classification_checkpoint(trained, tmp_path):
    pytest.importorskip("tokenseg.maps")
    base, root, _, _, _ = trained
    ckpt = tiny_classifier_checkpoint(tmp_path / "cls.pt", root, tmp_path)
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    results = predict([str(p) for p in ds.image_paths[:2]], ckpt, tmp_path / "pred", cls_threshold=0.0,
                      bg_threshold=0.5, overlay=False, progress=False)
    assert len(results) == 2
    for r, p in zip(results, ds.image_paths[:2]):
        mask = read_mask(r["mask"])
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1, 2}
        assert r["overlay"] is None


def test_predict_from_a_classifier_uses_its_background_model(trained, tmp_path):
    """A config whose pseudo masks use CLIP-ES's power background: predict scores the background as
    (1 − max_c map_c)^alpha (computed here by hand from the maps), unless --threshold is given."""
    from tokenseg.checkpoint import load_model_from_checkpoint
    from tokenseg.maps import compute_map_batch, normalise

    base, root, _, _, _ = trained
    ckpt = tiny_classifier_checkpoint(tmp_path / "cls.pt", root, tmp_path, "pseudo.background=power",
                                      "pseudo.alpha=4")
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    path = ds.image_paths[0]
    [power] = predict([str(path)], ckpt, tmp_path / "pow", cls_threshold=0.0, overlay=False, progress=False,
                      kind="fused")
    [const] = predict([str(path)], ckpt, tmp_path / "const", cls_threshold=0.0, bg_threshold=0.05, overlay=False,
                      progress=False, kind="fused")
    model, cfg, _ = load_model_from_checkpoint(ckpt)
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]
    labels = torch.ones(1, len(CLASSES))  # --cls-threshold 0: every class is predicted
    with torch.no_grad():
        maps = compute_map_batch(model.eval(), normalise(img), labels, cfg, ["fused"]).maps["fused"].numpy()
    bg = np.clip(1 - maps.max(0), 0, 1) ** 4  # the default constant 0.39 differs on 6 % of the pixels
    expected = np.concatenate([[0], np.arange(len(CLASSES)) + 1])[np.concatenate([bg[None], maps]).argmax(0)]
    np.testing.assert_array_equal(read_mask(power["mask"]), expected)
    expected = np.where(maps.max(0) > 0.05, maps.argmax(0) + 1, 0)
    np.testing.assert_array_equal(read_mask(const["mask"]), expected)


def test_weight_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(TokensegError, match="not found"):
        build_segmenter(SegmentConfig(backbone="resnet10t", weights=str(tmp_path / "missing.pth")), 3)
    with pytest.raises(TokensegError, match="unknown timm model"):
        build_segmenter(SegmentConfig(backbone="resnet_does_not_exist"), 3)
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TokensegError, match=r"segment\.weights=/path/to/resnet10t"):
        build_segmenter(SegmentConfig(backbone="resnet10t", pretrained=True), 3)
    monkeypatch.setattr(timm, "create_model", real)
    # a local weights file loads (and a wrong one is refused)
    import timm as t

    src = t.create_model("resnet10t")
    torch.save(src.state_dict(), tmp_path / "r10t.pth")
    net = build_segmenter(SegmentConfig(backbone="resnet10t", weights=str(tmp_path / "r10t.pth"), feature_stage=3), 3)
    torch.testing.assert_close(net.backbone.conv1[0].weight, src.conv1[0].weight)
    assert net.freeze_bn  # starting from weights: BatchNorm frozen as in DeepLab
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(TokensegError, match="segment.weights"):
        build_segmenter(SegmentConfig(backbone="resnet10t", weights=str(tmp_path / "bad.pth")), 3)


def test_segment_and_predict_cli(trained, tmp_path, capsys):
    base, root, masks, _, _ = trained
    cfg_file = write_config_file(tmp_path / "c.yaml", root, tmp_path)
    out = tmp_path / "seg"
    rc = main(["segment", "train", str(cfg_file), *SMALL, "segment.max_steps=4", "--masks", str(masks),
               "--out", str(out), "--quiet"])
    assert rc == 0 and (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    text = capsys.readouterr().out
    assert "checkpoint:" in text and "mIoU" in text  # evaluated on val at the end
    rc = main(["segment", "evaluate", str(cfg_file), *SMALL, "--checkpoint", str(base / "seg" / "checkpoint.pt"),
               "--split", "train", "--scales", "1,0.75", "--flip", "--json", str(tmp_path / "e.json"), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "box" in text and "disc" in text and "background" in text and (tmp_path / "e.json").is_file()
    ds = build_dataset(toy_config(root, tmp_path).data, "val")
    rc = main(["predict", *map(str, ds.image_paths), "--checkpoint", str(base / "seg" / "checkpoint.pt"),
               "--out", str(tmp_path / "p"), "--overlay-format", "png", "--quiet"])
    assert rc == 0 and len(list((tmp_path / "p").glob("*_overlay.png"))) == len(ds)
    rc = main(["predict", str(tmp_path / "missing.jpg"), "--checkpoint", str(base / "seg" / "checkpoint.pt"),
               "--out", str(tmp_path / "p2"), "--quiet"])
    assert rc == 2 and "no such image" in capsys.readouterr().err


def test_run_post_chain(tmp_path):
    root = make_toy_voc(tmp_path / "voc", n_train=8, n_val=2, size=40, seed=2)
    seeds = seeds_from_masks(root, tmp_path / "seeds", "train", blur=1.5)
    cfg = toy_config(root, tmp_path, "pseudo.threshold=0.4")
    res = run_post_chain(cfg, seeds, tmp_path / "chain", progress=False)
    assert res["mask_miou"] > 80
    assert res["seg_miou"] is not None and 0 <= res["seg_miou"] <= 100
    assert len(list((tmp_path / "chain" / "pseudo").glob("*.png"))) == 8
    assert (tmp_path / "chain" / "segment" / "checkpoint.pt").is_file()
    assert cfg.segment.backbone == "resnet101"  # the caller's config is not modified
