"""Affinity random walk (dense and sparse), the MCTformer special case, and AffinityNet's pieces
(pairs, sparse affinity, loss, PSA labels) against hand-made cases and brute force."""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import torch

from tokenseg.core.seeds import SeedMaps
from tokenseg.refine.affinitynet import (affinity_loss, pair_offsets, psa_label, sparse_affinity)
from tokenseg.refine.randomwalk import random_walk, transition_matrix, walk_maps

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import one_thread  # noqa: E402,F401  (autouse: 1 torch thread)


def test_transition_is_row_stochastic_and_walk_is_a_matrix_power():
    rng = np.random.default_rng(0)
    W = rng.uniform(0, 3, (12, 12))
    beta, steps = 3.0, 5
    G = transition_matrix(torch.from_numpy(W), beta).double().numpy()
    ref = (W / W.max()) ** beta
    ref = ref / ref.sum(1, keepdims=True)
    np.testing.assert_allclose(G, ref, rtol=1e-5)
    v = rng.uniform(0, 1, (3, 12))
    out = random_walk(torch.from_numpy(v), torch.from_numpy(G), steps).double().numpy()
    np.testing.assert_allclose(out, v @ np.linalg.matrix_power(ref, steps).T, rtol=1e-4)


def wall_affinity(h: int, w: int, wall: int) -> np.ndarray:
    """4-neighbour affinity 1 on an h×w grid, 0 across the wall between columns wall-1 and wall."""
    M = h * w
    A = np.eye(M)
    for y, x in itertools.product(range(h), range(w)):
        for dy, dx in ((0, 1), (1, 0)):
            y2, x2 = y + dy, x + dx
            if y2 < h and x2 < w and not (x < wall <= x2):
                A[y * w + x, y2 * w + x2] = A[y2 * w + x2, y * w + x] = 1.0
    return A


def test_walk_spreads_inside_a_region_but_not_across_a_zero_affinity_wall():
    h, w, wall = 6, 8, 4
    A = wall_affinity(h, w, wall)
    fg = np.zeros((h, w))
    fg[:, :2] = 1.0  # seeded: the left half of the left region
    scores = np.stack([np.full((h, w), 0.3), fg]).astype(np.float32)  # [background, class]
    before = scores.argmax(0)
    assert before[:, 2:wall].max() == 0  # not yet spread
    truth = np.zeros((h, w), np.int64)
    truth[:, :wall] = 1
    dense = walk_maps(scores, torch.from_numpy(A), (h, w), beta=1.0, steps=64)
    np.testing.assert_array_equal(dense.argmax(0), truth)
    assert np.all(dense[1][:, wall:] == 0)  # nothing leaks through the wall
    sparse = walk_maps(scores, torch.from_numpy(A).to_sparse(), (h, w), beta=1.0, steps=64)
    np.testing.assert_allclose(sparse, dense, atol=1e-5)


def test_one_step_beta_one_is_mctformers_affinity_refinement():
    rng = np.random.default_rng(1)
    L, M = 3, 16  # attention summed over L layers: every row sums to L
    att = sum(rng.dirichlet(np.ones(M), M) for _ in range(L))
    maps = rng.uniform(0, 1, (2, M))
    out = random_walk(torch.from_numpy(maps), transition_matrix(torch.from_numpy(att), 1.0), 1).double().numpy()
    np.testing.assert_allclose(out, (att @ maps.T).T / L, rtol=1e-5)  # A_ref = Â_p2p · A, up to the constant L


def test_pair_offsets_cover_each_pair_within_the_radius_once():
    r, h, w = 5, 9, 11
    cells = list(itertools.product(range(h), range(w)))
    brute = {frozenset((a, b)) for a in cells for b in cells
             if a != b and (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 < r * r}
    got = set()
    for dy, dx in pair_offsets(r):
        for y, x in cells:
            if 0 <= y + dy < h and 0 <= x + dx < w:
                pair = frozenset(((y, x), (y + dy, x + dx)))
                assert pair not in got
                got.add(pair)
    assert got == brute


def test_sparse_affinity_is_symmetric_with_psa_values():
    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.normal(size=(6, 5, 7)).astype(np.float32))
    A = sparse_affinity(feats, 3).to_dense().numpy()
    np.testing.assert_allclose(A, A.T)
    np.testing.assert_allclose(np.diag(A), 1.0)
    f = feats.numpy().reshape(6, -1)
    i, j = 1 * 7 + 2, 2 * 7 + 3  # (1,2) and (2,3): distance² 2 < 9
    assert np.isclose(A[i, j], np.exp(-np.abs(f[:, i] - f[:, j]).mean()), rtol=1e-5)
    assert A[0, 4 * 7 + 6] == 0  # too far apart


def test_affinity_loss_counts_pairs_and_rewards_separated_features():
    labels = torch.full((1, 6, 6), 255, dtype=torch.long)
    labels[0, :, :2] = 0
    labels[0, :, 3:] = 1  # column 2 unknown
    r = 3
    # brute-force pair counts
    lab = labels[0].numpy()
    cells = [(y, x) for y in range(6) for x in range(6)]
    bg = fg = neg = 0
    for a, b in itertools.combinations(cells, 2):
        if (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 >= r * r:
            continue
        la, lb = lab[a], lab[b]
        if la == 255 or lb == 255:
            continue
        if la != lb:
            neg += 1
        elif la == 0:
            bg += 1
        else:
            fg += 1
    good = torch.zeros(1, 4, 6, 6)
    good[0, :, :, 3:] = 5.0  # features equal within each side, far apart across
    loss_good, parts = affinity_loss(good, labels, r)
    assert parts["pairs"] == (bg, fg, neg)
    loss_flat, _ = affinity_loss(torch.zeros(1, 4, 6, 6), labels, r)  # everything "affine": negatives pay
    assert float(loss_good) < 0.01 < float(loss_flat)


def test_psa_label_keeps_confident_foreground_and_background_only():
    H, W = 4, 9
    m = np.zeros((1, H, W), np.float32)
    m[0, :, :3] = 0.9  # confident: foreground at alpha 1 (0.9 > 0.1)
    m[0, :, 3:6] = 0.3  # uncertain: background at alpha 1 (0.7), foreground at alpha 12 (0.7^12 = 0.014)
    seed = SeedMaps(np.array([4]), m)  # class 4 -> label 5
    lab = psa_label(seed, np.zeros((H, W, 3), np.uint8), 1.0, 12.0, crf=None)
    np.testing.assert_array_equal(lab[0], [5, 5, 5, 255, 255, 255, 0, 0, 0])
