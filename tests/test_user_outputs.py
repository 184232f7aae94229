"""What a new user hits, output side: `tokenseg predict` on a big photo runs at the model's working size
(masks at full size, progress per image), and the demo gallery's titles, class legend and heat-map
labels."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import CLASSES, make_toy_voc, seeds_from_masks, tiny_classifier_checkpoint, toy_config  # noqa: E402

from tokenseg.data import build_dataset  # noqa: E402
from tokenseg.core.masks import read_mask, voc_palette  # noqa: E402
from tokenseg.segment.predict import predict, upsample_argmax, working_size  # noqa: E402


# ------------------------------------------------------------------------------------ predict
@pytest.mark.parametrize("L,h,w,H,W,band", [(5, 7, 9, 61, 83, 32 << 20), (81, 12, 16, 300, 400, 1 << 16),
                                            (3, 20, 10, 20, 10, 1 << 20), (4, 30, 40, 7, 9, 1 << 20)])
def test_upsample_argmax_is_bilinear_then_argmax(L, h, w, H, W, band):
    g = torch.Generator().manual_seed(L)
    scores = torch.rand(L, h, w, generator=g)
    ref = F.interpolate(scores[None], size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    got = upsample_argmax(scores, H, W, band_bytes=band)
    assert got.dtype == np.uint8 and got.shape == (H, W)
    assert (got == ref).mean() > 0.9999  # float rounding may flip an exact near-tie, nothing else
    values = np.arange(L, dtype=np.uint8)[::-1] + 1
    np.testing.assert_array_equal(upsample_argmax(scores, H, W, values, band_bytes=band), values[got])


def test_working_size_keeps_the_aspect_ratio():
    assert working_size(3000, 4000, 642) == (482, 642)
    assert working_size(4000, 3000, 128) == (128, 96)
    assert working_size(300, 400, 0) == (300, 400) and working_size(300, 400, 500) == (300, 400)


def _segmentation_checkpoint(path: Path) -> Path:
    from tokenseg.config import load_config
    from tokenseg.segment.deeplab import build_segmenter
    from tokenseg.segment.train import save_segmentation_checkpoint

    cfg = load_config("demo", [])  # the demo's small CPU network (ResNet-10-T, 64 px crops), random weights
    torch.manual_seed(0)
    model = build_segmenter(cfg.segment, len(CLASSES) + 1)
    save_segmentation_checkpoint(path, model, None, None, 0, 0, cfg, CLASSES)
    return path


def _photo(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h // 10, w // 10, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC).save(path)
    return path


def test_predict_runs_at_the_working_size_and_writes_full_size_masks(tmp_path, capsys, monkeypatch):
    from tokenseg.segment import load_segmenter, predict_mask
    from tokenseg.segment.evaluate import infer_probs

    pr = sys.modules["tokenseg.segment.predict"]  # tokenseg.segment.predict is also the function's name
    ckpt = _segmentation_checkpoint(tmp_path / "seg.pt")
    photo = _photo(tmp_path / "photo.jpg", 400, 300)
    model, cfg, _ = load_segmenter(ckpt)
    seen = []

    def hooked(*a, **k):  # record the sizes the network is run at
        m, c, n = load_segmenter(*a, **k)
        m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
        return m, c, n

    monkeypatch.setattr(pr, "load_segmenter", hooked)
    res = predict([photo], ckpt, tmp_path / "p64", max_side=64, overlay=False, progress=True)
    err = capsys.readouterr().err
    assert seen == [(48, 64)]  # the longer side at 64, the ratio kept
    assert "predict: 1/1 img" in err and "processed at 64 px on their longer side" in err
    mask = read_mask(res[0]["mask"])
    assert mask.shape == (300, 400)
    img = np.asarray(Image.open(photo).convert("RGB"))
    small = np.asarray(Image.fromarray(img).resize((64, 48), Image.BICUBIC))
    probs = infer_probs(model, small)
    ref = F.interpolate(probs[None], size=(300, 400), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert (mask == ref).mean() > 0.999
    # default: twice the training crop (the demo's 64 px) -> 128; 0 = the full size, as before
    seen.clear()
    predict([photo], ckpt, tmp_path / "pdef", overlay=False, progress=False)
    assert seen == [(96, 128)]
    assert json.loads((tmp_path / "pdef" / "predictions.json").read_text())["max_side"] == 2 * cfg.segment.crop_size
    seen.clear()
    res = predict([photo], ckpt, tmp_path / "pfull", max_side=0, overlay=False, progress=False)
    assert seen == [(300, 400)]
    np.testing.assert_array_equal(read_mask(res[0]["mask"]), predict_mask(model, img))


def test_predict_from_a_classifier_at_the_working_size(tmp_path, monkeypatch):
    pytest.importorskip("tokenseg.maps")
    import tokenseg.maps as maps

    root = make_toy_voc(tmp_path / "voc", n_train=2, n_val=1, size=48)
    ckpt = tiny_classifier_checkpoint(tmp_path / "cls.pt", root, tmp_path)
    photo = _photo(tmp_path / "wide.jpg", 320, 200)
    sizes = []
    real = maps.compute_map_batch

    def recording(model, images, *a, **k):
        sizes.append(tuple(images.shape[-2:]))
        return real(model, images, *a, **k)

    monkeypatch.setattr(maps, "compute_map_batch", recording)
    res = predict([photo], ckpt, tmp_path / "pred", max_side=80, cls_threshold=0.0, bg_threshold=0.5,
                  overlay=True, progress=False)
    assert sizes == [(50, 80)]
    mask = read_mask(res[0]["mask"])
    assert mask.shape == (200, 320) and set(np.unique(mask)) <= {0, 1, 2}
    ov = np.asarray(Image.open(res[0]["overlay"]))
    assert ov.shape[1:] == (320, 3) and ov.shape[0] > 200  # the image, then the band naming the colours


# ------------------------------------------------------------------------------------ gallery
def test_gallery_titles_are_wrapped_not_cut():
    from tokenseg.core import viz
    from PIL import ImageDraw

    titles = ["input", "fused (attention x PatchCAM)", "argmax fused (attention x PatchCAM)", "supercalifragilistic"]
    tiles = [np.zeros((8, 8, 3), np.uint8)] * len(titles)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        layout = viz.gallery([tiles], titles, Path(d) / "g.png", cell=96)
        saved = Image.open(Path(d) / "g.png")
        assert saved.size == layout["size"]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = viz._font(11)
    for t, lines in zip(titles, layout["title_lines"]):
        assert "".join(lines).replace(" ", "") == t.replace(" ", "")  # every character is shown
        assert all(draw.textlength(line, font=font) <= layout["text_width"] for line in lines)
    assert len(layout["title_lines"][2]) >= 2


def test_demo_gallery_has_a_legend_and_labelled_heat_maps(tmp_path, monkeypatch):
    from tokenseg import pipeline

    root = make_toy_voc(tmp_path / "voc", n_train=1, n_val=3, size=48, seed=3)
    cfg = toy_config(root, tmp_path, f"output_dir={tmp_path / 'run'}", "eval.split=val")
    for kind in ("attention", "fused"):
        seeds_from_masks(root, tmp_path / "run" / "seeds" / "val" / kind, "val")
    ds = build_dataset(cfg.data, "val")
    results = {"attention": {"miou": 40.0, "threshold": 0.4}, "fused": {"miou": 50.0, "threshold": 0.4}}
    captured = {}
    real = pipeline.gallery

    def capture(rows, titles, path, **kw):
        captured.update(kw, titles=titles, layout=real(rows, titles, path, **kw))
        return captured["layout"]

    monkeypatch.setattr(pipeline, "gallery", capture)
    path = pipeline.write_gallery(cfg, ds, results, tmp_path / "gallery.png", n=3)
    # the argmax column says the background threshold it used; the notes say why each row shows its class
    assert captured["titles"][-1] == "argmax fused (attention x PatchCAM), background t = 0.40"
    assert "most ground-truth pixels" in " ".join(captured["notes"]) and "t = 0.40" in " ".join(captured["notes"])
    pal = voc_palette()
    shown = set()
    for i, caps in enumerate(captured["captions"]):
        gt = ds.load_mask(i)
        biggest = int(np.bincount(gt.ravel(), minlength=256)[1:3].argmax())
        assert caps == ["", "", f"{CLASSES[biggest]} (most gt pixels)", f"{CLASSES[biggest]} (most gt pixels)", ""]
        shown |= set(np.unique(gt).tolist())
    legend = captured["legend"]
    assert [n for n, _ in legend][:1] == ["background"]
    assert {n for n, _ in legend} >= {"background"} | {CLASSES[v - 1] for v in shown if 0 < v < 255}
    img = np.asarray(Image.open(path).convert("RGB"))
    for sw in captured["layout"]["legend"]:
        x0, y0, x1, y1 = sw["box"]
        name = sw["name"]
        value = 0 if name == "background" else CLASSES.index(name) + 1
        assert tuple(img[(y0 + y1) // 2, (x0 + x1) // 2]) == tuple(pal[value]) == sw["colour"]
    # the heat maps' colour bar runs from the colour of 0 to the colour of 1
    from tokenseg.core.viz import heatmap

    x0, y0, x1, y1 = captured["layout"]["colorbar"]
    ends = heatmap(np.array([0.0, 1.0]))
    assert tuple(img[(y0 + y1) // 2, x0]) == tuple(ends[0]) and tuple(img[(y0 + y1) // 2, x1 - 1]) == tuple(ends[1])
