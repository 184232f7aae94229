"""IRN mask step (``pseudo.refine=irn``): IR labels, path affinities, the walk against a dense
reference, the loss against a brute-force loop, training resume, the whole chain through the CLI,
POT's variant, and worker processes that die with their parent."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from test_post_common import (make_toy_voc, one_thread, seeds_from_masks, toy_config,  # noqa: E402,F401
                              write_config_file)

from tokenseg.cli import main  # noqa: E402
from tokenseg.config import load_config  # noqa: E402
from tokenseg.data import build_dataset  # noqa: E402
from tokenseg.core.seeds import SeedMaps, load_seed, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import read_mask, voc_palette  # noqa: E402
from tokenseg.refine import irn, irn_walk  # noqa: E402
from tokenseg.refine.irn_net import IRNet, direction_path, irn_loss, path_max, search_directions  # noqa: E402

# a tiny network and crop: the suite stays fast
TINY = ["pseudo.refine=irn", "pseudo.irn.backbone=resnet10t", "pseudo.irn.crop=64", "pseudo.irn.batch_size=3",
        "pseudo.irn.train_radius=5", "pseudo.crf_backend=torch", "pseudo.irn.infer_batch=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    base = tmp_path_factory.mktemp("irn")
    root = make_toy_voc(base / "voc", n_train=6, n_val=2, size=40)
    seeds = seeds_from_masks(root, base / "seeds", "train", blur=2.0)
    return base, root, seeds


# ----------------------------------------------------------------------------- independent references
def ref_path(dy: int, dx: int) -> set[tuple[int, int]]:
    """Grid points of the bounding box within distance 1 of the line (IRN's path), by geometry."""
    pts = set()
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            dist = abs(dy * x - dx * y) / np.hypot(dy, dx)  # point-to-line distance
            if dist < 1 - 1e-12:
                pts.add((y, x))
    return pts


def dense_walk(x: np.ndarray, edge: np.ndarray, radius: int, beta: float, exp_times: int) -> np.ndarray:
    """The authors' dense approach in float64, written from the definitions: A (M×M) with unit
    diagonal and a_ij = 1 − max_path edge for pairs within the radius, T = A^β / column sums,
    T^(2^exp_times), rw = (x ⊙ (1 − edge)) T."""
    h, w = edge.shape
    M = h * w
    A = np.eye(M)
    for y in range(h):
        for x0 in range(w):
            for dy in range(-radius + 1, radius):
                for dx in range(-radius + 1, radius):
                    if (dy, dx) == (0, 0) or dy * dy + dx * dx >= radius * radius:
                        continue
                    y1, x1 = y + dy, x0 + dx
                    if 0 <= y1 < h and 0 <= x1 < w:
                        m = max(edge[y + py, x0 + px] for py, px in ref_path(dy, dx))
                        A[y * w + x0, y1 * w + x1] = 1 - m
    assert np.allclose(A, A.T)
    T = A ** beta
    T = T / T.sum(0, keepdims=True)
    T = np.linalg.matrix_power(T, 2 ** exp_times)
    v = (x * (1 - edge)[None]).reshape(len(x), M)
    return (v @ T).reshape(len(x), h, w)


# ----------------------------------------------------------------------------- 1. IR labels
def two_object_seed(H: int = 24, W: int = 32) -> tuple[SeedMaps, np.ndarray]:
    """Class 0 ramps 1 → 0 from the left edge, class 1 from the right edge; an image of two flat colours."""
    xs = np.arange(W, dtype=np.float32)
    left = np.clip(1 - xs / 12, 0, 1)[None].repeat(H, 0)
    right = np.clip(1 - (W - 1 - xs) / 12, 0, 1)[None].repeat(H, 0)
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = (200, 40, 40)
    image[:, W // 2:] = (40, 40, 200)
    return SeedMaps(np.array([0, 1]), np.stack([left, right])), image


def test_ir_labels_put_the_disagreement_band_to_255():
    seed, image = two_object_seed()
    cfg = load_config(None, ["pseudo.refine=irn", "pseudo.irn.label_crf=false"])
    lab = irn.ir_label(seed, image, cfg.pseudo.irn)
    m = seed.maps.max(0)
    expected = np.full(m.shape, 255, np.uint8)
    expected[m > 0.30] = (seed.maps.argmax(0) + 1)[m > 0.30]  # confident foreground (ties -> background)
    expected[m <= 0.05] = 0  # both maps say background
    np.testing.assert_array_equal(lab, expected)
    assert {0, 1, 2, 255} == set(np.unique(lab))
    # IRN's combination rule, written as their three assignments
    fg = np.where(m > 0.30, seed.maps.argmax(0) + 1, 0)
    bg = np.where(m > 0.05, seed.maps.argmax(0) + 1, 0)
    conf = fg.copy()
    conf[fg == 0] = 255
    conf[bg + fg == 0] = 0
    np.testing.assert_array_equal(lab, conf)


def test_ir_labels_with_the_crf_follow_the_image():
    # red object | dark background | blue object; the seeds spill 3 px past both objects
    seed, _ = two_object_seed()
    image = np.full((24, 32, 3), 30, np.uint8)
    image[:, :6] = (220, 40, 40)
    image[:, 26:] = (40, 40, 220)
    truth = np.zeros((24, 32), np.uint8)
    truth[:, :6], truth[:, 26:] = 1, 2
    cfg = load_config(None, ["pseudo.refine=irn"])
    plain = irn.ir_label(seed, image, load_config(None, ["pseudo.irn.label_crf=false"]).pseudo.irn)
    lab = irn.ir_label(seed, image, cfg.pseudo.irn, backend="torch")
    assert (plain == truth).mean() < 0.8 and (plain == 255).any()
    assert (lab == truth).mean() > 0.97  # both label maps snap to the colour edges
    # the unary is pydensecrf's unary_from_labels(gt_prob=0.7, zero_unsure=False): -log 0.7 / -log 0.15
    from tokenseg.core.crf import label_probs, unary_from_probs

    u = unary_from_probs(label_probs(np.array([[0, 2]]), 3, 0.7))
    np.testing.assert_allclose(u[:, 0, 0], -np.log([0.7, 0.15, 0.15]), rtol=1e-6)
    np.testing.assert_allclose(u[:, 0, 1], -np.log([0.15, 0.15, 0.7]), rtol=1e-6)


def test_pot_labels_use_the_seed_background_and_have_no_band(tmp_path):
    seed, image = two_object_seed()
    seed.background = np.full(seed.maps.shape[1:], 0.2, np.float32)
    ic = load_config(None, ["pseudo.irn.variant=pot", "pseudo.irn.label_crf=false"]).pseudo.irn
    lab = irn.ir_label(seed, image, ic)
    scores = np.concatenate([seed.background[None], seed.maps])
    np.testing.assert_array_equal(lab, np.array([0, 1, 2])[scores.argmax(0)])
    assert not (lab == 255).any()
    # [I] different background multipliers bring a band back
    ic.pot_bg_scale = 0.25
    assert (irn.ir_label(seed, image, ic) == 255).any()
    save_seed(tmp_path / "s.npz", SeedMaps(seed.classes, seed.maps))
    with pytest.raises(TokensegError, match="background channel"):
        irn.load_checked_seed(tmp_path / "s.npz", "pot")


# ----------------------------------------------------------------------------- geometry and affinities
def test_search_directions_and_paths_are_irns():
    dirs = search_directions(5)
    assert len(dirs) == 34 and len(search_directions(10)) == 152
    assert (0, 0) not in dirs and all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in dirs)
    full = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert set(dirs) | {(-dy, -dx) for dy, dx in dirs} == full and len(full) == 68
    for r in (5, 10):
        for d in search_directions(r):
            assert set(direction_path(*d)) == ref_path(*d)
    assert set(direction_path(0, 3)) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert set(direction_path(2, -2)) == {(0, 0), (1, -1), (2, -2), (0, -1), (1, 0), (1, -2), (2, -1)}


def test_path_max_and_its_gradient_equal_a_per_cell_loop():
    """The running maximum and the one scatter-add backward against a loop over cells and path points
    (ties, saturated edges included: the gradient goes to the first arg-max along the path)."""
    g = torch.Generator().manual_seed(3)
    B, H, W, r, top, left, h, w = 2, 9, 11, 3, 0, 2, 7, 7
    edge = torch.rand(B, H, W, generator=g, dtype=torch.float64)
    edge[0, 2:5, 3:8] = 1.0  # a saturated block: many equal maxima
    edge[1, :, 5] = 0.5
    weights = torch.randn(B, len(search_directions(r)), h, w, generator=g, dtype=torch.float64)
    x = edge.clone().requires_grad_(True)
    out = path_max(x, r, top, left, h, w)
    (out * weights).sum().backward()
    want_out = torch.zeros_like(out)
    want_grad = torch.zeros_like(edge)
    for b in range(B):
        for d, (dy, dx) in enumerate(search_directions(r)):
            path = direction_path(dy, dx)
            for i in range(h):
                for j in range(w):
                    vals = [float(edge[b, top + i + y, left + j + x]) for y, x in path]
                    k = int(np.argmax(vals))  # the first maximum
                    want_out[b, d, i, j] = vals[k]
                    want_grad[b, top + i + path[k][0], left + j + path[k][1]] += weights[b, d, i, j]
    assert torch.equal(out.detach(), want_out)
    assert torch.allclose(x.grad, want_grad, atol=1e-12)
    with torch.no_grad():  # the walk's path (no gradient) gives the same maxima
        assert torch.equal(path_max(edge, r, top, left, h, w), want_out)


def test_boundary_affinity_is_high_inside_regions_and_low_across_the_edge():
    # a clean two-region image: its boundary map is 1 on the column between the regions
    h, w = 12, 14
    edge = torch.zeros(1, h, w, dtype=torch.float64)
    edge[0, :, 6] = 1.0
    bands = irn.boundary_bands(edge, 5)[0]
    offsets = irn.walk_offsets(5)
    assert bands.shape == (len(offsets), h, w) and len(offsets) == 69
    region = np.full((h, w), -1)
    region[:, :6], region[:, 7:] = 0, 1
    b = bands.numpy()
    within, across = [], []
    for k, (dy, dx) in enumerate(offsets[1:], 1):
        inside = np.zeros((h, w), bool)  # cells whose neighbour p + o exists
        inside[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = True
        assert (b[k][~inside] == 0).all()  # no neighbour outside the grid
        nb = np.full((h, w), -2)
        nb[inside] = np.roll(region, (-dy, -dx), (0, 1))[inside]
        known = inside & (region >= 0) & (nb >= 0)
        within.append(b[k][known & (region == nb)])
        across.append(b[k][known & (region != nb)])
    within, across = np.concatenate(within), np.concatenate(across)
    assert within.min() == 1.0 and across.max() == 0.0 and len(across) > 100
    # symmetric: a(p, p + o) == a(p + o, p)
    for k, (dy, dx) in enumerate(offsets):
        kr = offsets.index((-dy, -dx))
        ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
        ys1, xs1 = slice(ys.start + dy, ys.stop + dy), slice(xs.start + dx, xs.stop + dx)
        torch.testing.assert_close(bands[k, ys, xs], bands[kr, ys1, xs1])
    # a soft boundary: affinity = 1 - the largest boundary value on the path
    soft = torch.zeros(1, h, w)
    soft[0, 5, 5] = 0.7
    b = irn.boundary_bands(soft, 5)[0]
    assert b[offsets.index((0, 2)), 5, 4] == pytest.approx(0.3)  # passes over (5, 5)
    assert b[offsets.index((2, 0)), 4, 4] == 1.0  # does not


def test_walk_spreads_inside_a_region_but_not_across_a_boundary():
    h, w = 16, 20
    edge = torch.zeros(1, h, w)
    edge[0, :, 9] = 1.0  # a closed wall
    x = torch.zeros(1, 1, h, w)
    x[0, 0, 8, 3] = 1.0
    rw = irn.propagate(x, edge, radius=5, beta=10, exp_times=6)[0, 0]
    assert (rw[:, :9] > 1e-6).all()  # reaches every cell of its region
    assert (rw[:, 9:] == 0).all()  # nothing crosses the boundary
    assert rw[:, :9].std() < 0.2 * rw[:, :9].mean()  # close to uniform after 64 steps
    # without the wall it spreads to the other side
    rw2 = irn.propagate(x, torch.zeros(1, h, w), radius=5, beta=10, exp_times=6)[0, 0]
    assert (rw2[:, 10:] > 1e-6).all()


@pytest.mark.parametrize("impl", ["banded", "sparse"])
def test_walk_equals_the_dense_reference(impl):
    g = torch.Generator().manual_seed(0)
    edge = torch.rand(9, 11, generator=g, dtype=torch.float64) ** 3
    x = torch.rand(2, 9, 11, generator=g, dtype=torch.float64)
    ref = dense_walk(x.numpy(), edge.numpy(), 5, 10.0, 6)
    got = irn.propagate(x[None], edge[None], None, 5, 10.0, 6, impl)[0]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)
    # float32: the same walk up to rounding accumulated over the steps
    got32 = irn.propagate(x[None].float(), edge[None].float(), None, 5, 10.0, 6, impl)[0]
    assert np.abs(got32.double().numpy() - ref).max() < 1e-5
    # a batch padded to one grid: each image walks as if alone, padding stays 0
    e2 = torch.rand(6, 7, generator=g, dtype=torch.float64)
    x2 = torch.rand(2, 6, 7, generator=g, dtype=torch.float64)
    E = torch.ones(2, 9, 11, dtype=torch.float64)
    V = torch.zeros(2, 9, 11, dtype=torch.bool)
    X = torch.zeros(2, 2, 9, 11, dtype=torch.float64)
    E[0], V[0], X[0] = edge, True, x
    E[1, :6, :7], V[1, :6, :7], X[1, :, :6, :7] = e2, True, x2
    out = irn.propagate(X, E, V, 5, 10.0, 6, impl)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(out[1, :, :6, :7].numpy(), dense_walk(x2.numpy(), e2.numpy(), 5, 10.0, 6), atol=1e-10)
    assert out[1, :, 6:].abs().max() == 0 and out[1, :, :, 7:].abs().max() == 0


def test_irn_loss_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(1)
    B, h, w, r = 2, 9, 12, 3
    logits = torch.randn(B, 1, h, w, generator=g, dtype=torch.float64)
    disp = torch.randn(B, 2, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (B, h, w), generator=g)
    labels[0, :2] = 255
    loss, parts = irn_loss(logits, disp, labels, r)
    e = torch.sigmoid(logits[:, 0])
    sums = {k: 0.0 for k in ("bg", "fg", "neg", "dfg", "dbg")}
    counts = {"bg": 0, "fg": 0, "neg": 0}
    dirs = [(0, dx) for dx in range(1, r)] + [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r)
                                             if dy * dy + dx * dx < r * r]
    for b in range(B):
        for y in range(0, h - (r - 1)):
            for x in range(r - 1, w - (r - 1)):  # IRN's source window
                for dy, dx in dirs:
                    la, lb = int(labels[b, y, x]), int(labels[b, y + dy, x + dx])
                    if la == 255 or lb == 255:
                        continue
                    a = 1 - max(float(e[b, y + py, x + px]) for py, px in ref_path(dy, dx))
                    pd = disp[b, :, y, x] - disp[b, :, y + dy, x + dx]
                    if la != lb:
                        sums["neg"] += -np.log(1 + 1e-5 - a)
                        counts["neg"] += 1
                    elif la == 0:
                        sums["bg"] += -np.log(a + 1e-5)
                        sums["dbg"] += float(pd.abs().sum())
                        counts["bg"] += 1
                    else:
                        sums["fg"] += -np.log(a + 1e-5)
                        sums["dfg"] += float((pd - torch.tensor([dy, dx], dtype=pd.dtype)).abs().sum())
                        counts["fg"] += 1
    l_bg = sums["bg"] / (counts["bg"] + 1e-5)
    l_fg = sums["fg"] / (counts["fg"] + 1e-5)
    l_neg = sums["neg"] / (counts["neg"] + 1e-5)
    l_dfg = sums["dfg"] / (2 * counts["fg"] + 1e-5)
    l_dbg = sums["dbg"] / (2 * counts["bg"] + 1e-5)
    expected = (l_bg / 2 + l_fg / 2 + l_neg) / 2 + (l_dfg + l_dbg) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert float(parts["neg"]) == pytest.approx(l_neg, rel=1e-9) and min(counts.values()) > 20


# ----------------------------------------------------------------------------- network
def test_network_branches_backbone_and_weights(tmp_path):
    torch.manual_seed(0)
    net = IRNet("resnet10t")
    edge, disp = net(torch.randn(2, 3, 64, 48))
    assert edge.shape == (2, 1, 16, 12) and disp.shape == (2, 2, 16, 12)
    # layer4 keeps stride 1 and no dilation (IRN's strides (2, 2, 2, 1))
    convs = [m for m in net.encoder.layer4.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.dilation == (1, 1) and m.stride == (1, 1) for m in convs)
    net.train()
    assert not net.encoder.training  # frozen BatchNorm
    loss, _ = irn_loss(edge, disp, torch.zeros(2, 16, 12, dtype=torch.long), 3)
    loss.backward()
    assert all(p.grad is None for p in net.encoder.parameters())  # the backbone is frozen
    assert all(p.grad is not None for p in net.edge_parameters() + net.displacement_parameters())
    # edge-branch initialisation does not depend on the displacement branch
    torch.manual_seed(0)
    net2 = IRNet("resnet10t", displacement=False)
    for a, b in zip(net.edge_parameters(), net2.edge_parameters()):
        assert torch.equal(a, b)
    # local ImageNet weights (offline); a file that does not fit is an error naming the key
    import timm

    ref = timm.create_model("resnet10t")
    torch.save(ref.state_dict(), tmp_path / "r10t.pth")
    loaded = IRNet("resnet10t", weights=str(tmp_path / "r10t.pth"))
    assert torch.equal(loaded.encoder.conv1[0].weight, ref.conv1[0].weight)
    bad = dict(ref.state_dict())
    bad["fc.weight"] = bad["fc.weight"][:10]  # ignored (no classifier here)
    bad["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(TokensegError, match="pseudo.irn.weights.*does not fit"):
        IRNet("resnet10t", weights=str(tmp_path / "bad.pth"))
    with pytest.raises(TokensegError, match="pseudo.irn.backbone"):
        IRNet("not_a_model")
    with pytest.raises(TokensegError, match="not a timm ResNet"):
        IRNet("vit_tiny_patch16_224")


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TokensegError, match=r"pseudo\.irn\.weights=/path/to/resnet10t"):
        IRNet("resnet10t", pretrained=True)


def test_config_checks():
    for bad, key in [("pseudo.irn.variant=psa", "variant"), ("pseudo.irn.crop=30", "crop"),
                     ("pseudo.irn.walk=dense", "walk"), ("pseudo.irn.fg_threshold=1.5", "fg_threshold"),
                     ("pseudo.irn.crf_preset=nope", "crf_preset"), ("pseudo.irn.walk_dtype=half", "walk_dtype")]:
        with pytest.raises(TokensegError, match=key):
            irn.validate_irn(load_config(None, ["pseudo.refine=irn", bad]))
    cfg = load_config(None, ["pseudo.refine=irn"])
    ic = cfg.pseudo.irn
    irn.validate_irn(cfg)
    assert (ic.fg_threshold, ic.bg_threshold, ic.crop, ic.batch_size, ic.epochs, ic.lr, ic.weight_decay) == \
        (0.30, 0.05, 512, 32, 3, 0.1, 1e-4)
    assert (ic.beta, ic.exp_times, ic.radius, ic.sem_bg_threshold, ic.momentum, ic.pot_power) == \
        (10.0, 8, 5, 0.25, 0.9, 1.5)


# ----------------------------------------------------------------------------- training and resume
def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_resumes_to_the_same_weights(toy, tmp_path):
    base, root, seeds = toy
    cfg = toy_config(root, tmp_path, *TINY, "pseudo.irn.max_steps=6", "pseudo.irn.checkpoint_every=2",
                     "pseudo.irn.momentum=0.0001")
    ds = build_dataset(cfg.data, "train")
    from tokenseg.refine.pseudo import _Task, find_seed_file

    tasks = [_Task(i, find_seed_file(seeds, i), ds.image_paths[k], tmp_path / f"{i}.png")
             for k, i in enumerate(ds.ids)]
    labels = irn.make_ir_labels(cfg, tasks, seeds, tmp_path / "labels", progress=False)
    once = irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "a", progress=False, labels=labels)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels,
                      step_hook=kill_at_5)
    mid = _state(tmp_path / "b" / "irn.pt")
    assert mid["step"] == 4 and not mid["done"]  # the last checkpoint before the kill
    seen = []
    twice = irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels,
                          step_hook=seen.append)
    assert seen == [5, 6]  # it went on from step 4
    a, b = _state(once), _state(twice)
    assert a["done"] and b["done"] and a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    groups = a["optimizer"]["param_groups"]
    assert [g["momentum"] for g in groups] == [1e-4, 1e-4]  # the code-faithful momentum, as asked
    assert [g["base_lr"] for g in groups] == [0.1, 1.0]  # the displacement branch at 10x
    assert groups[0]["lr"] == pytest.approx(0.1 * (1 - 5 / 6) ** 0.9)  # poly lr of the last step
    # a finished checkpoint is reused; one made with other settings is refused
    assert irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels,
                         step_hook=seen.append) == twice and seen == [5, 6]
    cfg.pseudo.irn.lr = 0.05
    with pytest.raises(TokensegError, match="other settings"):
        irn.train_irn(cfg, ds, ds.ids, tmp_path / "labels", tmp_path / "b", progress=False, labels=labels)
    cfg.pseudo.irn.fg_threshold = 0.4
    with pytest.raises(TokensegError, match="IR labels were made with other settings"):
        irn.make_ir_labels(cfg, tasks, seeds, tmp_path / "labels", progress=False)


# ----------------------------------------------------------------------------- padding to the batch
def test_pad_size_rounds_the_largest_side_up_to_16_at_most_the_crop():
    assert irn._pad_size([(375, 500), (333, 500)], 512) == 512  # a VOC batch: IRN's 512 crop
    assert irn._pad_size([(96, 96), (90, 64)], 512) == 96
    assert irn._pad_size([(100, 90)], 512) == 112
    assert irn._pad_size([(100, 90)], 104) == 104  # never more than the crop ...
    assert irn._pad_size([(600, 400)], 512) == 608  # ... unless the image is larger (not cropped at inference)


@pytest.mark.parametrize("scale, crop, side", [(1.0, 128, 48), (12.5, 512, 512)])
def test_batches_are_padded_only_as_far_as_their_largest_image(toy, tmp_path, scale, crop, side):
    """40-px images in a 128 crop: the batch is 48² and cuts padding only; images scaled to 500 px (VOC
    size) in IRN's 512 crop: exactly the crop-padded batch."""
    from tokenseg.core.masks import save_palette_png
    from tokenseg.data.crops import CropDataset

    base, root, seeds = toy
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    rng = np.random.default_rng(0)
    for image_id in ds.ids:  # labels with an ignore band, as IR labels have
        save_palette_png(tmp_path / f"{image_id}.png", rng.choice([0, 1, 2, 255], size=(40, 40)).astype(np.uint8))
    args = (ds, list(range(len(ds.ids))), tmp_path, crop, (scale, scale), True)
    full = CropDataset(*args, seed=3)
    lean = CropDataset(*args, seed=3, extent=True)
    samples = [lean[k] for k in range(3)]
    x, y = irn._BatchPad(crop, 5)(samples)
    assert x.shape == (3, 3, side, side) and y.shape == (3, side, side)
    xf = torch.stack([full[k][0] for k in range(3)])
    yf = torch.stack([full[k][1] for k in range(3)])
    torch.testing.assert_close(x, xf[:, :, :side, :side], rtol=0, atol=0)
    torch.testing.assert_close(y, yf[:, :side, :side], rtol=0, atol=0)
    assert not xf[:, :, side:].any() and not xf[..., side:].any()  # what was cut is padding only
    assert bool((yf[:, side:] == 255).all()) and bool((yf[..., side:] == 255).all())


def test_the_training_radius_sets_the_least_batch_side():
    x = torch.zeros(3, 512, 512)  # a crop holding a 40-px image
    y = torch.zeros(512, 512, dtype=torch.long)
    xb, yb = irn._BatchPad(512, 10)([(x, y, torch.tensor([40, 40]))] * 2)
    assert xb.shape[-1] == 80 and yb.shape[-1] == 80  # irn_loss needs a side > 8 · (10 − 1)


# ----------------------------------------------------------------------------- the chain
def test_irn_chain_through_the_cli(toy, tmp_path, capsys):
    base, root, seeds = toy
    cfg_file = write_config_file(tmp_path / "c.yaml", root, tmp_path)
    out, work = tmp_path / "masks", tmp_path / "work"
    args = ["pseudo", str(cfg_file), *TINY, "pseudo.irn.max_steps=12", "--seeds", str(seeds), "--out", str(out),
            "--work", str(work), "--eval", "--json", str(tmp_path / "r.json"), "--quiet"]
    with pytest.warns(UserWarning, match="without ImageNet weights") as caught:
        assert main(args) == 0
    assert sum("without ImageNet weights" in str(w.message) for w in caught) == 1
    text = capsys.readouterr().out
    assert "mIoU" in text and "6 written" in text
    ds = build_dataset(toy_config(root, tmp_path).data, "train")
    for image_id in ds.ids:
        with Image.open(out / f"{image_id}.png") as im:
            assert im.mode == "P" and im.size == (40, 40)
            np.testing.assert_array_equal(np.array(im.getpalette()[:9]).reshape(3, 3), voc_palette(3))
            mask = np.asarray(im)
        present = set(load_seed(seeds / f"{image_id}.npz").classes + 1)
        assert set(np.unique(mask)) <= {0} | present  # only background and the image's own classes
    labels = [read_mask(p) for p in sorted((work / "labels").glob("*.png"))]
    assert len(labels) == 6 and any((lab == 255).any() for lab in labels)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"]["irn"]["checkpoint"] == str(work / "irn.pt") and report["eval"]["miou"] > 30
    # everything is reused on a second run
    assert main(args) == 0
    assert "0 written, 6 already there" in capsys.readouterr().out


def test_pot_variant_walks_the_seed_background(toy, tmp_path):
    base, root, seeds = toy
    pot_seeds = tmp_path / "pot_seeds"
    for f in sorted(seeds.glob("*.npz")):
        s = load_seed(f)
        s.background = np.clip(1 - s.maps.astype(np.float32).max(0), 0, 1)
        save_seed(pot_seeds / f.name, s)
    cfg = toy_config(root, tmp_path, *TINY, "pseudo.irn.variant=pot", "pseudo.irn.max_steps=4",
                     "pseudo.irn.walk=sparse", "pseudo.irn.walk_dtype=float32")
    from tokenseg.refine.pseudo import make_pseudo_masks

    summary = make_pseudo_masks(cfg, pot_seeds, tmp_path / "m", work_dir=tmp_path / "w", progress=False)
    assert summary["written"] == 6 and summary["irn"]["variant"] == "pot"
    assert not any((read_mask(p) == 255).any() for p in (tmp_path / "w" / "labels").glob("*.png"))
    # the masks are the argmax of the walked [background, maps]^1.5, no threshold
    net = irn.load_irn(tmp_path / "w" / "irn.pt")
    ds = build_dataset(cfg.data, "train")
    image = np.asarray(ds.load_image(0), dtype=np.uint8)
    seed = load_seed(pot_seeds / f"{ds.ids[0]}.npz")
    edge = irn.boundary_maps(net, [image], "cpu", 64)[0]
    v, keys = irn.seed_grid(seed, tuple(edge.shape), cfg.pseudo.irn)
    ref = dense_walk(v.double().numpy(), edge.double().numpy(), 5, 10.0, 8)
    up = F.interpolate(torch.from_numpy(ref)[None], scale_factor=4, mode="bilinear",
                       align_corners=False)[0, :, :40, :40]
    expected = keys[up.argmax(0).numpy()]
    assert (read_mask(tmp_path / "m" / f"{ds.ids[0]}.png") == expected).mean() > 0.995
    # a batch walked one image at a time (what a CPU does with large images) gives the same masks
    images = [np.asarray(ds.load_image(k), dtype=np.uint8) for k in range(4)]
    batch_seeds = [load_seed(pot_seeds / f"{i}.npz") for i in ds.ids[:4]]
    together = irn.irn_masks(net, images, batch_seeds, cfg.pseudo.irn)
    irn_walk.WALK_CACHE_BYTES, saved = 1, irn_walk.WALK_CACHE_BYTES
    try:
        alone = irn.irn_masks(net, images, batch_seeds, cfg.pseudo.irn)
    finally:
        irn_walk.WALK_CACHE_BYTES = saved
    assert all((a == b).all() for a, b in zip(together, alone))
    with pytest.raises(TokensegError, match="background channel"):
        make_pseudo_masks(cfg, seeds, tmp_path / "m2", work_dir=tmp_path / "w2", progress=False)


# ----------------------------------------------------------------------------- worker processes
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method + /proc")
def test_workers_exit_when_the_parent_is_killed(toy, tmp_path):
    base, root, seeds = toy
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    cfg_file = write_config_file(tmp_path / "c.yaml", root, tmp_path)
    script = textwrap.dedent(f"""
        import os, time
        import tokenseg.refine.pseudo as P
        from tokenseg.config import load_config

        def slow(task, *args, **kwargs):  # a task that outlives its parent
            open(os.path.join({str(pid_dir)!r}, str(os.getpid())), "w").close()
            time.sleep(120)

        P._run_task = slow
        cfg = load_config({str(cfg_file)!r}, ["pseudo.workers=2"])
        P.make_pseudo_masks(cfg, {str(seeds)!r}, {str(tmp_path / 'm')!r}, progress=False)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def children(pid: int) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            out.append(int(d))
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    pass
        return out

    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not any(pid_dir.iterdir()) and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        assert any(pid_dir.iterdir()), parent.stderr.read().decode() if parent.poll() is not None else "no task"
        workers = children(parent.pid)
        assert len(workers) >= 2  # both pool workers (one busy, one idle)
        assert {int(p.name) for p in pid_dir.iterdir()} <= set(workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:  # never leave a stray process behind, even if the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
