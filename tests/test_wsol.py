"""PxAP / pIoU (wsolevaluation's MaskEvaluator protocol) against independent references.

References: a brute-force loop over every threshold written here (prediction = score >= t for
t in np.arange(0, 1, 0.001) plus the overflow edges 1 and 2; precision·Δrecall summed where something
is predicted; peak tp/(tp+fp+fn)); scikit-learn's average precision on scores that lie on the bin
edges (there the binned curve is the exact one); a case computed by hand; and the OpenImages fixture of
test_data_openimages with seeds written by tokenseg.core.seeds.save_seed.
"""
import re

import numpy as np
import pytest
from PIL import Image
import torch
from sklearn.metrics import average_precision_score

from test_data_openimages import make_openimages
from tokenseg.data import WSSSDataset
from tokenseg.data.openimages import load_openimages
from tokenseg.core.seeds import SeedMaps, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import save_palette_png
from tokenseg.core.plot import line_plot
from tokenseg.wsol import WSOLSweep, evaluate_wsol, format_wsol, normalize_scoremaps, save_pr_curve, wsol_step
from tokenseg.core.masks import nearest_indices

STEP = 0.001


def brute_force(scores, targets):
    """Per-threshold counts over concatenated pixels; targets 1 / 0 / 255 (ignored)."""
    s = np.concatenate([np.asarray(x, np.float64).ravel() for x in scores])
    t = np.concatenate([np.asarray(x).ravel() for x in targets])
    pos, neg = s[t == 1], s[t == 0]
    thresholds = [2.0, 1.0] + list(np.arange(0, 1, STEP)[::-1])
    prec, rec, iou = [], [], []
    for th in thresholds:
        tp = float((pos >= th).sum())
        fp = float((neg >= th).sum())
        fn = len(pos) - tp
        prec.append(tp / (tp + fp) if tp + fp > 0 else None)
        rec.append(tp / len(pos))
        iou.append(tp / (tp + fp + fn))
    ap = 0.0
    for j in range(1, len(thresholds)):
        if prec[j] is not None:
            ap += prec[j] * (rec[j] - rec[j - 1])
    best = int(np.argmax(iou))
    return {"pxap": 100 * ap, "piou": 100 * iou[best], "best_threshold": thresholds[best],
            "precision": prec, "recall": rec, "iou": iou}


def random_case(seed):
    rng = np.random.default_rng(seed)
    edges = np.arange(0, 1, STEP)
    scores, targets = [], []
    for _ in range(4):
        h, w = rng.integers(6, 20, 2)
        s = rng.random((h, w))
        on_edge = rng.random((h, w)) < 0.2  # exactly on a bin edge: must count for that threshold
        s[on_edge] = rng.choice(edges, on_edge.sum())
        s.flat[rng.integers(0, s.size, 3)] = 1.0  # the [1, 2) overflow bin
        s.flat[rng.integers(0, s.size, 3)] = 0.0
        t = (rng.random((h, w)) < 0.4).astype(np.uint8)
        t[rng.random((h, w)) < 0.15] = 255
        scores.append(s)
        targets.append(t)
    return scores, targets


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_equals_brute_force(seed, backend):
    scores, targets = random_case(seed)
    sweep = WSOLSweep(STEP, backend=backend)
    sweep.update(np.concatenate([s.ravel() for s in scores[:2]]), np.concatenate([t.ravel() for t in targets[:2]]))
    for s, t in zip(scores[2:], targets[2:]):  # any batching gives the same counts
        sweep.update(torch.from_numpy(s), torch.from_numpy(t))
    got = sweep.compute()
    ref = brute_force(scores, targets)
    assert got["pxap"] == pytest.approx(ref["pxap"], abs=1e-9)
    assert got["piou"] == pytest.approx(ref["piou"], abs=1e-9)
    assert got["best_threshold"] == ref["best_threshold"]
    np.testing.assert_allclose(got["recall"], ref["recall"], atol=1e-12)
    np.testing.assert_allclose(got["iou"], ref["iou"], atol=1e-12)
    p_ref = np.array([np.nan if p is None else p for p in ref["precision"]])
    np.testing.assert_allclose(got["precision"], p_ref, atol=1e-12)  # NaN where nothing is predicted
    assert got["positive_pixels"] == sum(int((t == 1).sum()) for t in targets)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_histograms_equal_numpy_histogram_with_their_edges(backend):
    """np.histogram on their right edges (arange + 1, 2, 3) is what their MaskEvaluator counts with;
    the torch backend (the GPU default) finds the bins arithmetically and must count the same."""
    rng = np.random.default_rng(7)
    edges = np.append(np.arange(0, 1, STEP), [1.0, 2.0, 3.0])
    s = np.concatenate([rng.random(5000), rng.choice(edges, 2000), [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, -0.1, np.inf],
                        np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    t = rng.choice(np.array([0, 1, 255], np.uint8), s.size)
    sweep = WSOLSweep(STEP, backend=backend)
    sweep.update(np.append(s, np.nan), np.append(t, 1))  # NaN is never counted
    pos, neg = sweep.histograms()
    np.testing.assert_array_equal(pos, np.histogram(s[t == 1], bins=edges)[0])
    np.testing.assert_array_equal(neg, np.histogram(s[t == 0], bins=edges)[0])
    other = WSOLSweep(STEP, backend="numpy" if backend == "torch" else "torch")
    other.update(torch.from_numpy(s[:100]), torch.from_numpy(t[:100].astype(np.int64)))
    sweep.merge(other)
    np.testing.assert_array_equal(sweep.histograms()[0], pos + np.histogram(s[:100][t[:100] == 1], bins=edges)[0])


def test_pxap_is_sklearn_average_precision_on_edge_scores():
    rng = np.random.default_rng(5)
    s = rng.choice(np.arange(0, 1, STEP), 3000)  # every score on a bin edge: no binning loss
    y = (rng.random(3000) < s * 0.8 + 0.1).astype(np.uint8)
    sweep = WSOLSweep(STEP)
    sweep.update(s, y)
    assert sweep.compute()["pxap"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-9)


def test_hand_computed_case():
    # positives 0.9005, 0.3005; negatives 0.6005, 0.1005; a 0.95 ignore pixel that must not count
    # t >= 0.9: P 1, R 1/2 ; t >= 0.6: P 1/2 ; t >= 0.3: P 2/3, R 1 ; t >= 0.1: P 1/2
    # PxAP = 1·(1/2) + (2/3)·(1/2) = 5/6 ; IoU: 1/2, 1/3, 2/3, 1/2 -> pIoU 2/3 at t = 0.300
    sweep = WSOLSweep(STEP)
    sweep.update(np.array([0.9005, 0.6005, 0.3005, 0.1005, 0.95]), np.array([1, 0, 1, 0, 255]))
    r = sweep.compute()
    assert r["pxap"] == pytest.approx(100 * 5 / 6, abs=1e-9)
    assert r["piou"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    assert r["best_threshold"] == pytest.approx(0.3, abs=1e-12)


def test_normalize_and_nearest_rule():
    maps = np.array([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, np.nan], [1.0, 2.0]]])
    out = normalize_scoremaps(maps)
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    np.testing.assert_array_equal(out[1], 0)  # constant -> zeros (their normalize_scoremap)
    np.testing.assert_array_equal(out[2], 0)  # NaN -> zeros
    np.testing.assert_array_equal(nearest_indices(448, 224), np.arange(224) * 2)
    np.testing.assert_array_equal(nearest_indices(112, 224), np.arange(224) // 2)
    np.testing.assert_array_equal(nearest_indices(3, 5), [0, 0, 1, 1, 2])  # floor(x · 3/5)


def _seeds_for(ds, folder, extra_class=True, scale=1):
    """Random seed maps at each image's size, for its class and (to be ignored) one other class."""
    rng = np.random.default_rng(1)
    maps = {}
    for i, image_id in enumerate(ds.ids):
        w, h = ds.load_image(i).size
        c = ds.labels[i][0]
        classes = [c] + ([(c + 1) % ds.num_classes] if extra_class else [])
        m = (rng.random((len(classes), h, w)) * scale).astype(np.float32)
        save_seed(folder / f"{image_id}.npz", SeedMaps(np.array(classes), m), dtype="float32")
        maps[image_id] = m[0]
    return maps


def test_evaluate_wsol_openimages_fixture_end_to_end(tmp_path):
    oi = make_openimages(tmp_path)
    ds = load_openimages(oi["root"], "test", oi["meta"])
    seeds = tmp_path / "seeds"
    maps = _seeds_for(ds, seeds, scale=3.0)
    res = evaluate_wsol(seeds, ds, 224, interp="area", progress=False, workers=2, batch_size=1)
    # reference: their protocol by hand: scoremap at 224 (448 -> 2x2 box mean), min-max, masks by hand
    scores, targets = [], []
    for stem, m in maps.items():
        m = m.astype(np.float64)
        if m.shape[0] == 448:
            m = m.reshape(224, 2, 224, 2).mean((1, 3))
        scores.append((m - m.min()) / (m.max() - m.min()))
        exp = oi["expected"][stem]
        targets.append(np.where(exp["fg224"], 1, np.where(exp["ignore224"], 255, 0)))
    ref = brute_force(scores, targets)
    assert res["pxap"] == pytest.approx(ref["pxap"], abs=1e-9)
    assert res["piou"] == pytest.approx(ref["piou"], abs=1e-9)
    assert res["best_threshold"] == ref["best_threshold"]
    assert res["images"] == res["scoremaps"] == 3 and res["missing_maps"] == 0
    key = f"{ref['best_threshold']:.3f}"
    assert res["curve"][key]["iou"] == pytest.approx(ref["piou"], abs=1e-3)
    assert set(res["curve"]) == {f"{t:.3f}" for t in np.arange(0, 1, STEP)} | {"1.000"}
    line = format_wsol("wsol [test]", res)
    assert f"PxAP {res['pxap']:.2f}" in line and "224×224" in line
    # at image size (resize=None) the 448 masks meet the 224 images' seeds: still one map per image
    native = evaluate_wsol(seeds, ds, None, progress=False)
    assert native["resize"] is None and native["scoremaps"] == 3
    png = tmp_path / "pr.png"
    save_pr_curve(png, res)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (640, 480)


def test_evaluate_wsol_multilabel_at_mask_resolution(tmp_path):
    """VOC-style masks: every (image, class) pair is one scoremap; other classes' pixels are negatives."""
    rng = np.random.default_rng(3)
    masks, paths, labels, scores, targets = tmp_path / "masks", [], [], [], []
    seeds = tmp_path / "seeds"
    for k, (h, w) in enumerate([(17, 23), (30, 11)]):
        gt = rng.integers(0, 4, (h, w)).astype(np.uint8)  # background + classes 0..2
        gt[rng.random((h, w)) < 0.1] = 255
        save_palette_png(masks / f"im{k}.png", gt)
        present = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        m = rng.random((len(present), h, w)).astype(np.float32)
        save_seed(seeds / f"im{k}.npz", SeedMaps(np.array(present), m), dtype="float32")
        paths.append(masks / f"im{k}.png")
        labels.append(present)
        for j, c in enumerate(present):
            x = m[j].astype(np.float64)
            scores.append((x - x.min()) / (x.max() - x.min()))
            targets.append(np.where(gt == 255, 255, (gt == c + 1).astype(np.uint8)))
    ds = WSSSDataset(name="toy", class_names=["a", "b", "c"], ids=["im0", "im1"], image_paths=paths,
                     labels=labels, mask_paths=paths)
    res = evaluate_wsol(seeds, ds, resize=None, progress=False, workers=1)
    ref = brute_force(scores, targets)
    assert res["scoremaps"] == sum(len(x) for x in labels) == len(scores)
    assert res["pxap"] == pytest.approx(ref["pxap"], abs=1e-9)
    assert res["piou"] == pytest.approx(ref["piou"], abs=1e-9)


def test_wsol_step_evaluates_every_seed_kind(tmp_path, capsys):
    """What `tokenseg evaluate CONFIG --wsol --curve-png F` runs: kinds found, JSON + one chart written."""
    import json

    from tokenseg.config import Config

    oi = make_openimages(tmp_path)
    cfg = Config()
    cfg.data.format, cfg.data.root, cfg.eval.split = "openimages", str(oi["root"]), "test"
    cfg.output_dir = str(tmp_path / "run")
    ds = load_openimages(oi["root"], "test", oi["meta"])
    seeds = tmp_path / "run" / "seeds" / "test"
    _seeds_for(ds, seeds / "fused_affinity")
    _seeds_for(ds, seeds / "attention", extra_class=False)
    png = tmp_path / "pr.png"
    res = wsol_step(cfg, curve_png=png, progress=False)
    assert sorted(res) == ["attention", "fused_affinity"]
    single = evaluate_wsol(seeds / "attention", ds, progress=False)
    assert res["attention"]["pxap"] == single["pxap"]
    saved = json.loads((seeds / "wsol_attention.json").read_text())
    assert saved["pxap"] == pytest.approx(single["pxap"]) and saved["curve"]["0.500"]["recall"] is not None
    out = capsys.readouterr().out
    assert "fused + patch affinity [test]: PxAP" in out
    with Image.open(png) as im:
        assert im.size == (640, 480)
    with pytest.raises(TokensegError, match="no seed files"):
        wsol_step(cfg, seeds=tmp_path / "empty", progress=False)


def test_missing_seed_file_and_missing_class_map(tmp_path):
    oi = make_openimages(tmp_path)
    ds = load_openimages(oi["root"], "test", oi["meta"])
    seeds = tmp_path / "seeds"
    _seeds_for(ds, seeds)
    gone = seeds / f"{ds.ids[1]}.npz"
    gone.unlink()
    with pytest.raises(TokensegError, match=re.escape(str(gone)) + ": seed file not found"):
        evaluate_wsol(seeds, ds, progress=False)
    # a seed without the ground-truth class: scored as a zero map (every pixel at t = 0 only)
    save_seed(gone, SeedMaps(np.array([(ds.labels[1][0] + 1) % 3]), np.ones((1, 224, 224), np.float32)))
    res = evaluate_wsol(seeds, ds, progress=False)
    assert res["missing_maps"] == 1
    assert "1 missing class maps" in format_wsol("x", res)


def test_line_plot_draws_series_where_the_layout_says(tmp_path):
    path = tmp_path / "plot.png"
    xs = np.linspace(0, 100, 101)
    lay = line_plot(path, {"diagonal": (xs, xs), "flat": ([0, 100], [20, 20])}, "recall (%)", "precision (%)",
                    "title", size=(400, 300), xlim=(0, 100), ylim=(0, 100))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (400, 300)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    left, top, right, bottom = lay["box"]
    assert 0 < left < right < 400 and 0 < top < bottom < 300

    def colour_near(x, y, colour):
        cx = left + x / 100 * (right - left)
        cy = bottom - y / 100 * (bottom - top)
        patch = rgb[int(cy) - 2:int(cy) + 3, int(cx) - 2:int(cx) + 3]
        return (np.abs(patch - np.array(colour)).sum(-1) < 60).any()

    assert colour_near(40, 40, (31, 119, 180))  # first series colour on the diagonal
    assert colour_near(70, 20, (214, 39, 40))  # second series on y = 20
    assert not colour_near(80, 50, (31, 119, 180)) and not colour_near(80, 50, (214, 39, 40))
    with pytest.raises(TokensegError, match="2 x values but 3 y values"):
        line_plot(tmp_path / "bad.png", {"s": ([0, 1], [0, 1, 2])})
    assert not (tmp_path / "bad.png").exists()


def test_cli_evaluate_wsol_and_data_check_on_openimages(tmp_path, capsys):
    """As a user runs it: the metadata somewhere else (data.metadata_root), `data check` reports no false
    mask-size problems (masks there are larger than their images), `evaluate --wsol` writes JSON and a PNG."""
    import json
    import shutil

    from tokenseg.cli import main

    oi = make_openimages(tmp_path / "oi")
    meta = tmp_path / "elsewhere" / "OpenImages"
    shutil.move(str(oi["meta"]), str(meta))
    common = ["data.format=openimages", f"data.root={oi['root']}", f"data.metadata_root={meta}",
              "data.train_split=train", "data.val_split=test", "eval.split=test", f"output_dir={tmp_path / 'run'}"]
    assert main(["data", "check", "mctformer-plus", "--split", "test", "--json", str(tmp_path / "check.json"),
                 "--quiet", *common]) in (0, None)
    report = json.loads((tmp_path / "check.json").read_text())
    assert "mask is" not in json.dumps(report)
    ds = load_openimages(oi["root"], "test", meta)
    _seeds_for(ds, tmp_path / "run" / "seeds" / "test" / "fused_affinity")
    png = tmp_path / "curve.png"
    main(["evaluate", "mctformer-plus", *common, "--wsol", "--wsol-size", "0", "--curve-png", str(png), "--quiet"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "seeds" / "test" / "wsol_fused_affinity.json").read_text())
    ref = evaluate_wsol(tmp_path / "run" / "seeds" / "test" / "fused_affinity", ds, resize=None, progress=False)
    assert saved["pxap"] == pytest.approx(ref["pxap"]) and saved["resize"] in (None, 0)
    assert "PxAP" in out and png.exists()
    assert main(["evaluate", "mctformer-plus", *common, "eval.wsol_interp=cubic", "--wsol"]) != 0
    assert "eval.wsol_interp" in capsys.readouterr().err
