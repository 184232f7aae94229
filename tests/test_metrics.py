"""The one-pass threshold sweep against a brute-force per-threshold, per-pixel count."""
import numpy as np
import pytest

from tokenseg.core.metrics import (ThresholdSweep, confusion_matrix, pick_best, scores_from_confusion, seed_prediction, threshold_grid)


def brute_force(images, thresholds, n):
    out = []
    for t in thresholds:
        conf = np.zeros((n, n), np.int64)
        for maps, classes, gt in images:
            dense = np.zeros((n - 1,) + gt.shape, np.float32)
            dense[classes] = maps
            scores = np.concatenate([np.full((1,) + gt.shape, t, np.float32), dense])
            pred = scores.argmax(0)
            for g, p in zip(gt.ravel(), pred.ravel()):
                if g != 255:
                    conf[g, p] += 1
        out.append(conf)
    return np.stack(out)


@pytest.mark.parametrize("n_fg", [3, 20, 80])
def test_sweep_equals_brute_force(n_fg):
    rng = np.random.default_rng(n_fg)
    n = n_fg + 1
    images = []
    for _ in range(4):
        H, W = rng.integers(5, 12, 2)
        k = int(rng.integers(0, 3))
        classes = np.sort(rng.choice(n_fg, size=k, replace=False))
        maps = rng.random((k, H, W)).astype(np.float32)
        maps = np.round(maps, 2)  # exact ties with thresholds must go to background
        gt = rng.integers(0, n, (H, W))
        gt[rng.random((H, W)) < 0.1] = 255
        images.append((maps, classes, gt))
    thresholds = threshold_grid(0.0, 0.99, 0.01)
    sweep = ThresholdSweep(n, thresholds)
    for maps, classes, gt in images:
        sweep.update(*seed_prediction(maps, classes, gt.shape), gt)
    got = sweep.confusions()
    want = brute_force(images, thresholds, n)
    np.testing.assert_array_equal(got, want)


def test_scores_hand_computed():
    # gt: 4 bg, 2 cls1; pred: bg correct on 3, one bg->1, one 1->bg
    gt = np.array([0, 0, 0, 0, 1, 1, 255])
    pred = np.array([0, 0, 0, 1, 1, 0, 1])
    conf = confusion_matrix(pred, gt, 2)
    np.testing.assert_array_equal(conf, [[3, 1], [1, 1]])
    s = scores_from_confusion(conf)
    # IoU_bg = 3/(4+4-3) = 0.6, IoU_1 = 1/(2+2-1) = 1/3
    assert s["iou"] == pytest.approx([0.6, 1 / 3])
    assert s["miou"] == pytest.approx((0.6 + 1 / 3) / 2)
    # FP_c = (P - TP)/union: bg 1/5, cls1 1/3; FN_c = (T - TP)/union: bg 1/5, cls1 1/3
    assert s["fp"] == pytest.approx((0.2 + 1 / 3) / 2)
    assert s["fn"] == pytest.approx((0.2 + 1 / 3) / 2)


def test_pick_best_early_stop_like_authors():
    curve = [10, 20, 15, 30]
    assert pick_best(curve, early_stop=False) == 3
    assert pick_best(curve, early_stop=True) == 1
