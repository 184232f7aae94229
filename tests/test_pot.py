"""POT (METHODS.md §11): the prototype stages on inputs with a known answer, the code's fusion and its
IS_CAM + IS_CAM1 seeds by hand, the CLIP-ES maps co-augmented with their image, the recipe, and the
whole chain through the CLI (train, resume, maps, evaluate) on the tiny synthetic set."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import MapsConfig, load_config
from tokenseg.data import WSSSDataset, build_dataset
from tokenseg.core.seeds import SeedMaps, load_seed, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.methods import get_method
from tokenseg.methods.base import StepContext
from tokenseg.maps import generate_seeds
from tokenseg.methods.pot import POTConfig, POTView, code_hooks, to_released_state
from tokenseg.methods.pot.model import code_fusion, paper_stage

TINY = ["data.format=synthetic", "data.train_split=train", "data.val_split=val", "data.num_workers=0",
        "data.synthetic={num_classes: 3, image_size: 48, train_images: 48, val_images: 16, seed: 1}",
        "maps.split=val", "eval.split=val", "model.img_size=48", "model.pretrained=false",
        "pot.backbone=resnet10t", "pot.backbone_kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
        "pot.output_stride=8", "pot.freeze_bn=false", "pot.freeze_stem=false", "pot.crop=48",
        "pot.resize_long=[40, 56]", "pot.resize=48", "train.epochs=1", "train.batch_size=8", "train.lr=0.05",
        "train.lr_base_batch=8", "train.amp=none", "train.eval_every=0", "maps.scales=[1.0]", "maps.batch_size=8"]


# ------------------------------------------------------------------------------ the paper's stages
def _two_cluster_batch(noise: float = 0.03):
    """2 images on a 4×6 grid, D = 8. Image 0: class 0 = columns 0–1 (feature e0) + columns 2–3 (e1),
    background e7 elsewhere. Image 1: class 1 = row 0 (e2) + row 1 (e3); class 2 = row 3 columns 0–2 (e4)
    + row 3 columns 3–5 (e5); row 2 background. The baseline is 0.9 on a class's pixels, 0.1 elsewhere.
    A class's two clusters are the same size, so any of the marginals is uniform over them."""
    g = torch.Generator().manual_seed(0)
    h, w, D = 4, 6, 8
    owner = torch.full((2, h, w), 7)  # the feature index of every pixel
    owner[0, :, 0:2], owner[0, :, 2:4] = 0, 1
    owner[1, 0, :], owner[1, 1, :] = 2, 3
    owner[1, 3, 0:3], owner[1, 3, 3:6] = 4, 5
    feats = torch.eye(D)[owner].permute(0, 3, 1, 2) + noise * torch.randn(2, D, h, w, generator=g)
    cls_of = {0: (0, 0), 1: (0, 0), 2: (1, 1), 3: (1, 1), 4: (1, 2), 5: (1, 2)}  # feature -> (image, class)
    present = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    base = torch.full((2, 3, h, w), 0.1)
    for f, (b, c) in cls_of.items():
        base[b, c][owner[b] == f] = 0.9
    return feats, base, present, owner, cls_of


def _options(**kw):
    return dataclasses.replace(POTConfig(clusters=2), **kw)


@pytest.mark.parametrize("solver,marginal", [("code", "relu"), ("log", "relu"), ("code", "similarity"),
                                             ("code", "uniform")])
def test_paper_stage_sends_each_feature_to_its_cluster(solver, marginal):
    feats, base, present, owner, cls_of = _two_cluster_batch()
    feats.requires_grad_(True)
    valid = torch.ones(2, 4, 6)
    st = paper_stage(feats, base, present, valid, _options(solver=solver, marginal=marginal, ot_iters=300),
                     torch.Generator().manual_seed(1))
    assert [tuple(x) for x in torch.stack([st.slots.b, st.slots.c], 1).tolist()] == [(0, 0), (1, 1), (1, 2)]
    for g, (b, c) in enumerate([(0, 0), (1, 1), (1, 2)]):
        own = owner[b].flatten()
        mine = [f for f, bc in cls_of.items() if bc == (b, c)]
        # k-means: the confident set splits into the two true clusters (up to relabelling)
        lab = st.kmeans_labels[g]
        for f in mine:
            assert len(set(lab[own == f].tolist())) == 1
        assert lab[own == mine[0]][0] != lab[own == mine[1]][0]
        # the plan sends every feature of a cluster to that cluster, with almost all of its row mass
        for f in mine:
            k = int(lab[own == f][0])
            rows = st.plan[g][own == f]
            assert (rows.argmax(-1) == k).all()
            assert (rows[:, k] / rows.sum(-1)).min() > 0.99
        cam = st.cam[b, c].flatten()
        inside = torch.isin(own, torch.tensor(mine))
        assert cam[inside].min() > 0.9 and cam[~inside].max() < 0.1  # background e7 ⟂ the prototypes
        assert torch.allclose(st.marginal[g].sum(), torch.tensor(1.0))
    assert (st.cam[0, 1:] == 0).all() and (st.cam[1, 0] == 0).all()  # absent classes
    assert torch.allclose(st.background, 1 - st.cam.amax(1, keepdim=True))
    st.cam.sum().backward()
    assert feats.grad.abs().sum() > 0  # prototypes and activations carry the gradient


def test_paper_stage_equals_a_per_pair_reference_with_pot_library():
    """One pair at a time in numpy, the plan from the POT library's Sinkhorn (``import ot``)."""
    import ot as pot_lib

    feats, base, present, owner, _ = _two_cluster_batch(noise=0.3)
    valid = torch.ones(2, 4, 6)
    valid[1, 0, 5] = 0  # a padded pixel: no mass, no map
    pc = _options(solver="log", ot_iters=2000, marginal="similarity", marginal_temperature=0.5)
    st = paper_stage(feats.double(), base, present, valid, pc, torch.Generator().manual_seed(3))
    X = feats.double().flatten(2).transpose(1, 2).numpy()
    for g, (b, c) in enumerate(zip(st.slots.b.tolist(), st.slots.c.tolist())):
        x = X[b]
        v = valid[b].flatten().numpy() > 0
        lab = st.kmeans_labels[g].numpy()
        p = np.stack([x[lab == k].mean(0) for k in range(2)])
        q = x[lab >= 0].mean(0)
        unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
        cos_pq = unit(p) @ unit(q)
        nu = np.exp(cos_pq / 0.5) / np.exp(cos_pq / 0.5).sum()
        assert np.allclose(st.marginal[g].numpy(), nu, atol=1e-6)
        cost = 1 - unit(x[v]) @ unit(p).T
        T = pot_lib.sinkhorn(np.full(v.sum(), 1 / v.sum()), nu, cost, reg=0.1, numItermax=20000, stopThr=1e-12)
        assert np.allclose(st.plan[g].numpy()[v], T, atol=1e-7)
        omega = lab[v] >= 0
        p2 = np.stack([(T[omega, k:k + 1] * x[v][omega]).sum(0) / T[omega, k].sum() for k in range(2)])
        act = np.maximum(unit(x[v]) @ unit(p2).T, 0)
        m = ((T / T.sum(1, keepdims=True)) * act).sum(1)
        m = m / (m.max() + 1e-5)
        ours = st.cam[b, c].flatten().numpy()
        assert np.allclose(ours[v], m, atol=1e-6) and (ours[~v] == 0).all()


def test_paper_stage_few_confident_pixels_and_none():
    feats, base, present, _, _ = _two_cluster_batch()
    base[0, 0] = 0.1
    base[0, 0, 0, 0] = 0.9  # one confident pixel: one live cluster
    base[1, 1] = 0.1  # none: no map for this class
    st = paper_stage(feats, base, present, torch.ones(2, 4, 6), _options(), None)
    assert (st.plan[0][:, 1] == 0).all() and st.marginal[0].tolist() == [1.0, 0.0]
    assert st.cam[0, 0].max() > 0.99 and (st.cam[1, 1] == 0).all() and st.cam[1, 2].max() > 0.99
    assert torch.isfinite(st.cam).all()


# ------------------------------------------------------------------------------ the released code
def test_code_fusion_at_inference_by_hand():
    """Two pixels, two classes (METHODS.md §11.4 / §16.21: no 0.15·bg, no row-mean zeroing, + 0.3·cc)."""
    clip = torch.tensor([[0.8, 0.0], [0.1, 0.3]]).view(1, 2, 1, 2)  # pixel A, pixel B
    cam_class = torch.tensor([[0.3, 0.5], [0.9, 0.1], [0.2, 0.6]]).view(1, 3, 1, 2)
    cc, fused = code_fusion(cam_class, clip, None, training=False)
    # clip bg = 1 - max: A 0.2, B 0.7; fg = relu(fg - 0.5 bg): A (0.8, 0.1), B (0, 0.25); bg = 1 - max
    assert torch.allclose(cc.view(3, 2), torch.tensor([[0.2, 0.75], [0.8, 0.0], [0.1, 0.25]]))
    # [bg, clip] = A (0.2, 0.8, 0.1) sum 1.1, B (0.7, 0, 0.3) sum 1.0; relu(1.2x - 0.2 sum):
    # A (0.02, 0.74, 0), B (0.64, 0, 0.16); per-channel max-norm; both argmaxes agree -> + 0.3 cc, cap 1
    e = 1e-5
    expect = torch.tensor([[0.02 / (0.64 + e) + 0.06, 1.0], [1.0, 0.0], [0.03, 1.0]])
    assert torch.allclose(fused.view(3, 2), expect, atol=1e-5)


def test_code_fusion_in_training_by_hand():
    """Training adds ReLU(clip − 0.15·bg), the valid mask and the row-mean zeroing, + 0.2·cc."""
    clip = torch.tensor([[0.8, 0.0], [0.1, 0.3]]).view(1, 2, 1, 2)
    cam_class = torch.tensor([[0.3, 0.5], [0.9, 0.1], [0.2, 0.6]]).view(1, 3, 1, 2)
    _, fused = code_fusion(cam_class, clip, torch.ones(1, 3, 1, 2), training=True)
    # fg = relu(clip - 0.15 bg): A (0.77, 0.07), B (0, 0.195); bg' = 1 - max: A 0.23, B 0.805
    # sums A 1.07, B 1.0; relu(1.2x - 0.2 s): A (0.062, 0.71, 0), B (0.766, 0, 0.034); max-norm per channel
    # -> A (0.0809, 1, 0), B (1, 0, 1); row means (0.540, 0.5, 0.5): A's 0.0809 < 0.27 is zeroed
    # argmax: A 1 (cc: 1), B 0 (cc: 0) -> + 0.2 cc: A (0 + 0.04, 1, 0.02), B (1, 0, 1)
    e = 1e-5
    b0 = 0.766 / (0.766 + e)
    b2 = 0.034 / (0.034 + e)
    assert b0 > b2
    expect = torch.tensor([[0.04, 1.0], [1.0, 0.0], [0.02, 1.0]])
    assert torch.allclose(fused.view(3, 2), expect, atol=1e-4)


class _Stub(nn.Module):
    patch_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.pot_cfg = POTConfig()


def _pattern(n_views: int, K: int, reverse: bool, factor: float) -> torch.Tensor:
    j = torch.arange(8.0)
    row = (8 - j) if reverse else (j + 1)
    m = torch.stack([(k + 1) * factor * row.expand(8, 8) for k in range(K)])
    return m.expand(n_views, K, 8, 8).clone()


def _fake_combine(model, x, labels, classes, cfg, kinds, extras=None):
    """Per scale (input side 8 or 16), on a fixed 8×8 grid; the flipped half returns flipped maps, so
    un-flipping gives the same pattern twice. is_cam: scale 1 (j+1), scale 2 reversed ×3; is_cam1:
    scale 1 (j+1), scale 2 reversed ×2; backgrounds constant."""
    s2 = x.shape[-1] == 16
    B2, K = x.shape[0], len(classes)
    out = {}
    for kind, factor in (("is_cam", 3.0), ("is_cam1", 2.0)):
        if kind in kinds:
            m = _pattern(B2, K, s2, factor if s2 else 1.0)
            m[B2 // 2:] = m[B2 // 2:].flip(-1)
            out[kind] = m
            out[kind + "@background"] = torch.full((B2, 1, 8, 8), 0.5 if kind == "is_cam" else 0.25)
    return out


def test_code_seeds_combine_is_cam_and_is_cam1_by_hand(tmp_path):
    """§16.21: IS_CAM = first scale only; IS_CAM1 = all scales, then foreground × 2 and background
    + 0.4; the seed = IS_CAM + IS_CAM1; their npy dict alongside."""
    paths = []
    for i in range(2):
        p = tmp_path / "img" / f"i{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(p)
        paths.append(p)
    ds = WSSSDataset("t", ["a", "b", "c"], ["i0", "i1"], paths, [[0, 2], [1]], None)
    mc = MapsConfig(scales=[1.0, 2.0], flip=True, kinds=["is_cam_sum", "is_cam1", "is_cam"], batch_size=4,
                    save_dtype="float32")
    generate_seeds(_Stub(), ds, tmp_path / "out", mc, progress=False, export_npy=True, hooks=code_hooks(_fake_combine))
    j = np.arange(8.0)[None].repeat(8, 0)
    e = 1e-5
    # is_cam: scale 1 only: 2(k+1)(j+1), max-normalised -> (j+1)/8; background 2·0.5 -> 1
    is_cam = [(2 * (k + 1) * (j + 1)) / (2 * (k + 1) * 8 + e) for k in range(2)]
    # is_cam1: 2(k+1)[(j+1) + 2(8-j)] = 2(k+1)(17-j), normalised by its max 2(k+1)·17, then × 2;
    # background 2·0.25·(1 + 2) normalised to 1, + 0.4
    is_cam1 = [2 * (2 * (k + 1) * (17 - j)) / (2 * (k + 1) * 17 + e) for k in range(2)]
    bg1 = 1.5 / (1.5 + e) + 0.4
    for image, classes in (("i0", [0, 2]), ("i1", [1])):
        s_cam, s_cam1, s_sum = (load_seed(tmp_path / "out" / k / f"{image}.npz") for k in ("is_cam", "is_cam1",
                                                                                              "is_cam_sum"))
        assert s_sum.classes.tolist() == classes
        for r in range(len(classes)):  # class slot r of the batch's present classes
            slot = {0: 0, 1: 1, 2: 2}[classes[r]]  # the batch holds classes 0, 1, 2 -> pattern k = slot
            assert np.allclose(s_cam.maps[r], is_cam[0] * 0 + (j + 1) / (8 + e / (2 * (slot + 1))), atol=1e-6)
            assert np.allclose(s_cam1.maps[r], 2 * (17 - j) / (17 + e / (2 * (slot + 1))), atol=1e-6)
            assert np.allclose(s_sum.maps[r], s_cam.maps[r] + s_cam1.maps[r], atol=1e-6)
        assert np.allclose(s_cam.background, 1.0 / (1.0 + e), atol=1e-6)
        assert np.allclose(s_cam1.background, bg1, atol=1e-6)
        assert np.allclose(s_sum.background, 1.0 / (1.0 + e) + bg1, atol=1e-6)
        d = np.load(tmp_path / "out" / "npy" / f"{image}.npy", allow_pickle=True).item()
        assert d["keys"].tolist() == [0] + [c + 1 for c in classes]
        assert np.allclose(d["IS_CAM1"][1:], s_cam1.maps) and np.allclose(d["IS_CAM"][0], s_cam.background)
    assert np.allclose(is_cam[1][0, 0], 1 / 8, atol=1e-5) and np.allclose(is_cam1[0][0, 0], 2.0, atol=1e-5)


# ------------------------------------------------------------------------------ co-augmented CLIP-ES maps
def _blob_sample():
    """A 48×64 image with a red square at rows 10–21, columns 6–17 (left of centre) and a CLIP-ES map of
    class 1 that is 1 on the same square."""
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[10:22, 6:18, 0] = 255
    cam = np.zeros((1, 48, 64), np.float32)
    cam[0, 10:22, 6:18] = 1.0
    return Image.fromarray(arr), {"clip_classes": np.array([1]), "clip_maps": cam, "clip_num_classes": np.int64(3)}


def _centroid(m: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[:m.shape[0], :m.shape[1]]
    return np.array([(m * yy).sum(), (m * xx).sum()]) / m.sum()


@pytest.mark.parametrize("augment", ["sipe", "resize"])
def test_clip_maps_get_the_flip_and_crop_of_their_image(augment):
    img, extras = _blob_sample()
    pc = POTConfig(augment=augment, resize_long=[60, 60], crop=48, resize=48, output_stride=8, flip="true")
    view = POTView(pc)
    flips = set()
    for seed in range(10):
        random.seed(seed)
        x, out = view(img, extras)
        assert x.shape == (3, 48, 48) and out["clip"].shape == (3, 6, 6) and out["valid"].shape == (6, 6)
        assert (out["clip"][[0, 2]] == 0).all()
        red = x[0].numpy() * 0.229 + 0.485  # back to [0, 1]
        blob = (red > 0.5).astype(np.float64)
        cy, cx = _centroid(blob)
        flips.add(cx > 24)  # the square sits left of centre unless the view flipped it
        # the map on the 6×6 grid (cell r covers pixels 8r..8r+7, centre 8r + 3.5) has the square's centroid
        gy, gx = _centroid(out["clip"][1].astype(np.float64)) * 8 + 3.5
        assert abs(gy - cy) < 2.5 and abs(gx - cx) < 2.5, (seed, (gy, gx), (cy, cx))
        if augment == "sipe":  # 45×60 after the resize: 3 rows of padding (exact zeros), inside the crop
            pad = (x == 0).all(0).all(1).numpy()  # padded rows
            assert pad.sum() == 3
            rows = np.flatnonzero(~pad)
            expect = np.zeros(6)
            for r in range(6):
                expect[r] = float(8 * r in rows)  # nearest: grid row r reads pixel row 8r
            assert np.array_equal(out["valid"][:, 0], expect)
        else:
            assert (out["valid"] == 1).all()
    assert flips == {True, False}


def test_clip_seeds_errors_name_the_folder_and_the_images(tmp_path, tiny_overrides):
    cfg = load_config("pot", [*TINY, *tiny_overrides, f"pot.clip_seeds={tmp_path / 'nope'}"])
    ds = build_dataset(cfg.data, "train")
    with pytest.raises(TokensegError, match="pot.clip_seeds: folder .*nope"):
        get_method("pot").extras(cfg, ds)
    (tmp_path / "clip").mkdir()
    save_seed(tmp_path / "clip" / f"{ds.ids[0]}.npz", SeedMaps(np.array([0]), np.zeros((1, 48, 48)), {}))
    cfg.pot.clip_seeds = str(tmp_path / "clip")
    with pytest.raises(TokensegError, match=f"47 of 48 images have no CLIP-ES seed.*{ds.ids[1]}"):
        get_method("pot").extras(cfg, ds)
    with pytest.raises(TokensegError, match="pot.mode=code needs pot.clip_seeds"):
        load_config("pot", [*TINY, "pot.mode=code"])
    with pytest.raises(TokensegError, match="pot.marginal"):
        load_config("pot", [*TINY, "pot.marginal=max"])


# ------------------------------------------------------------------------------ recipe
def test_recipe_groups_momentum_and_frozen_layers():
    from tokenseg.engine import build_optimizer

    for mode, extra, mom in (("paper", [], 0.9), ("code", ["pot.clip_seeds=x"], 1e-4),
                             ("paper", ["pot.momentum=code"], 1e-4)):
        cfg = load_config("pot", [*TINY, "pot.freeze_stem=true", f"pot.mode={mode}", *extra])
        model = get_method("pot").build(cfg, 3)
        opt, lr = build_optimizer(get_method("pot"), model, cfg, 6, 6)
        assert isinstance(opt, torch.optim.SGD) and [g["lr_mult"] for g in opt.param_groups] == [1.0, 10.0]
        assert all(g["momentum"] == mom and g["weight_decay"] == 1e-4 for g in opt.param_groups)
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        stem = list(model.body.conv1.parameters()) + list(model.body.bn1.parameters())
        assert all(id(p) not in ids and not p.requires_grad for p in stem)
        new = {id(p) for m in model.new_modules() for p in m.parameters()}
        assert {id(p) for p in opt.param_groups[1]["params"]} == new
        assert lr(0, 0) == pytest.approx(0.05) and lr(3, 0) == pytest.approx(0.05 * 0.5 ** 0.9)
    cfg = load_config("pot", [*TINY, "pot.freeze_bn=true"])
    model = get_method("pot").build(cfg, 3).train()
    assert all(not m.training for m in model.body.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.side1.training
    strides = [m.stride for m in model.body.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert all(s == (1, 1) for s in strides)  # stride 1 without dilation (the code's strides=(2, 2, 2, 1))


def test_a_few_steps_lower_the_loss(tiny_overrides):
    cfg = load_config("pot", [*TINY, *tiny_overrides, "pot.freeze_bn=true"])
    method = get_method("pot")
    torch.manual_seed(0)
    model = method.build(cfg, 3)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 48, 48, generator=g), "labels": torch.tensor(
        [[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]]), "valid": torch.ones(4, 6, 6)}
    batch["image"][:, 0] += 2 * batch["labels"][:, :1, None] * (torch.arange(48) < 24).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for step in range(6):
        ctx = StepContext(0, step, 6, 6)
        out = method.forward(model, batch, ctx, cfg)
        terms = method.loss(out, batch, ctx, cfg)
        total = sum(v for k, v in terms.items() if not k.startswith("_"))
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert set(terms) == {"cls", "con", "_omega"}
    assert totals[-1] < totals[0] - 0.05, totals


def test_before_start_epoch_a_step_trains_the_classifier_alone(tiny_overrides):
    """pot.start_epoch: earlier steps skip the prototype stages (no consistency term, no gradient into the side
    convs); from that epoch on a step is the default one, term for term."""
    method = get_method("pot")
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 48, 48, generator=g), "labels": torch.tensor(
        [[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]]), "valid": torch.ones(4, 6, 6)}

    def step(epoch, *extra):
        cfg = load_config("pot", [*TINY, *tiny_overrides, *extra])
        torch.manual_seed(0)
        model = method.build(cfg, 3)
        ctx = StepContext(epoch, 3 * epoch, 6, 3)
        terms = method.loss(method.forward(model, batch, ctx, cfg), batch, ctx, cfg)
        sum(v for k, v in terms.items() if not k.startswith("_")).backward()
        return {k: float(v.detach()) for k, v in terms.items()}, model

    early, model = step(1, "pot.start_epoch=2")
    assert set(early) == {"cls", "con"} and early["con"] == 0.0
    assert not model.side1.weight.grad.abs().any() and model.classifier.weight.grad.abs().any()
    plain, _ = step(1)
    assert early["cls"] == pytest.approx(plain["cls"])
    late, _ = step(2, "pot.start_epoch=2")
    plain, _ = step(2)
    assert set(late) == {"cls", "con", "_omega"} and plain["con"] > 0
    assert all(late[k] == pytest.approx(plain[k]) for k in plain)
    with pytest.raises(TokensegError, match="pot.start_epoch"):
        load_config("pot", [*TINY, "pot.start_epoch=-1"])


# ------------------------------------------------------------------------------ the chain through the CLI
def _fake_clip_seeds(cfg, root, splits=("train", "val")):
    """CLIP-ES-like seeds from the ground truth: each present class's mask, blurred, max 1."""
    import torch.nn.functional as F

    for split in splits:
        ds = build_dataset(cfg.data, split)
        for i in range(len(ds)):
            m = ds.load_mask(i)
            classes = np.array(sorted(ds.labels[i]), np.int64)
            maps = np.stack([(m == c + 1).astype(np.float32) for c in classes]) if len(classes) else \
                np.zeros((0,) + m.shape, np.float32)
            t = F.avg_pool2d(torch.from_numpy(maps)[None], 5, 1, 2)[0].numpy()
            t = t / np.maximum(t.reshape(len(t), -1).max(1), 1e-6)[:, None, None] if len(t) else t
            save_seed(root / split / "clip" / f"{ds.ids[i]}.npz", SeedMaps(classes, t, {}))


def test_pot_trains_maps_and_evaluates_through_the_cli(tmp_path, capsys):
    over = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "maps.kinds=[pot, cam]"]
    assert main(["train", "pot", *over, "--quiet"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["pot"]["mode"] == "paper" and state["config"]["model"]["method"] == "pot"
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"cls", "con", "_omega"} <= set(r) for r in log if "cls" in r)
    assert main(["maps", "pot", *over, "--quiet"]) == 0
    seed = load_seed(next((tmp_path / "run" / "seeds" / "val" / "pot").glob("*.npz")))
    assert seed.maps.shape[1:] == (48, 48) and seed.background is not None
    assert float(seed.maps.max()) == pytest.approx(1.0, abs=1e-2)
    capsys.readouterr()
    assert main(["evaluate", "pot", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res) == {"pot", "cam"} and all(r["background"] == "channel" and 0 < r["miou"] <= 100
                                               for r in res.values())


def test_pot_on_clip_es_seeds_code_mode_chain(tmp_path, capsys):
    """pot.mode=code on CLIP-ES seeds: 512→48 square resize, their fusion target, IS_CAM + IS_CAM1 seeds
    made by POT's own loop (fed each image's seeds), evaluated with the channel background."""
    over = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
    cfg = load_config("pot-clip-es", over)
    _fake_clip_seeds(cfg, tmp_path / "clip")
    over += [f"pot.clip_seeds={tmp_path / 'clip'}/{{split}}", "pot.mode=code"]
    cfg = load_config("pot-clip-es", over)
    assert cfg.maps.mode == "authors" and cfg.maps.kinds == ["is_cam_sum", "is_cam1"]
    assert main(["train", "pot-clip-es", *over, "--quiet"]) == 0
    over += ["maps.kinds=[is_cam_sum, is_cam1, is_cam, pot]"]  # pot: the paper's stages on the CLIP-ES seeds
    assert main(["maps", "pot-clip-es", *over, "--quiet", "--export-npy"]) == 0
    root = tmp_path / "run" / "seeds" / "val"
    for kind in ("is_cam_sum", "is_cam1", "is_cam", "pot"):
        seeds = sorted((root / kind).glob("*.npz"))
        assert len(seeds) == 16
        s = load_seed(seeds[0])
        assert s.background is not None and s.maps.shape[1:] == (48, 48)
    d = np.load(next((root / "npy").glob("*.npy")), allow_pickle=True).item()
    assert set(d) == {"keys", "IS_CAM", "IS_CAM1"} and d["keys"][0] == 0
    capsys.readouterr()
    assert main(["evaluate", "pot-clip-es", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["is_cam_sum"]["background"] == "channel" and res["is_cam_sum"]["miou"] > 0
    # the CLIP-ES seeds here are the ground truth blurred and IS_CAM is mostly them (the network has had
    # 6 steps): it is far above background-only (~15) only if each image got its own seeds, aligned
    assert res["is_cam"]["miou"] > 40, res["is_cam"]["miou"]
    assert res["pot"]["background"] == "channel" and res["pot"]["miou"] > 0


def test_killed_and_resumed_training_matches_uninterrupted(tmp_path):
    from tokenseg.engine import train

    common = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.batch_size=16",
              "train.checkpoint_every=2"]
    cfg = load_config("pot", [*common, f"output_dir={tmp_path / 'x'}"])
    _fake_clip_seeds(cfg, tmp_path / "clip", splits=("train",))
    common += [f"pot.clip_seeds={tmp_path / 'clip'}/{{split}}"]  # paper mode on CLIP seeds, SIPE views
    a = load_config("pot", [*common, f"output_dir={tmp_path / 'a'}"])
    b = load_config("pot", [*common, f"output_dir={tmp_path / 'b'}"])
    train(a, progress=False)

    def kill(step, _):
        if step == 3:  # dies after step 3, before its epoch-end checkpoint; the last one is from step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, progress=False, on_step=kill)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    train(b, resume=True, progress=False)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 6
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_released_code_checkpoint_layout_loads(tmp_path):
    """Their ``{'net': ...}`` state dict (``resnet50.*`` + stage/backbone aliases + f9) rebuilds our model."""
    from tokenseg.checkpoint import load_model_from_checkpoint

    cfg = load_config("pot-clip-es", ["pot.mode=code", "pot.clip_seeds=x", "model.pretrained=false"])
    torch.manual_seed(0)
    ours = get_method("pot").build(cfg, 20).eval()
    sd = {}
    for k, v in ours.state_dict().items():
        if k.startswith("body."):
            sd["resnet50." + k[5:]] = v
            if k.startswith("body.layer1."):
                sd["stage1.0." + k[12:]] = v  # their Sequential aliases of the same modules
        else:
            sd[k] = v
    sd["f9.weight"] = torch.zeros(2048, 2 + 3 + 2048, 1, 1)
    torch.save({"net": sd}, tmp_path / "final.pth")
    model, cfg2, names = load_model_from_checkpoint(tmp_path / "final.pth")
    assert cfg2.pot.mode == "code" and len(names) == 20 and names[0] == "aeroplane"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["cam"], ours(x)["cam"])


def test_our_model_written_in_the_released_layout_reads_back(tmp_path):
    """``to_released_state`` (for ``tokenseg convert``) has every key their ``Net`` has, aliases included."""
    from tokenseg.checkpoint import load_model_from_checkpoint

    cfg = load_config("pot-clip-es", ["pot.mode=code", "pot.clip_seeds=x", "model.pretrained=false"])
    ours = get_method("pot").build(cfg, 20).eval()
    sd = to_released_state(ours)
    for k in ("resnet50.layer4.2.bn3.running_var", "stage0.0.weight", "stage0.1.num_batches_tracked",
              "stage4.0.2.conv3.weight", "backbone.3.0.5.bn2.weight", "newly_added.0.weight", "newly_added.5.weight",
              "f9.weight", "side4.weight"):
        assert k in sd, k
    assert sd["newly_added.5.weight"].shape == (256, 2048 + 3, 1, 1) and torch.equal(sd["stage0.0.weight"],
                                                                                       sd["resnet50.conv1.weight"])
    torch.save({"net": sd}, tmp_path / "final.pth")
    model, _, _ = load_model_from_checkpoint(tmp_path / "final.pth")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x)["features"], ours(x)["features"])


def test_local_imagenet_weights_file_loads_and_a_missing_one_is_named(tmp_path):
    import timm

    ref = timm.create_model("resnet10t", num_classes=1000)
    torch.save(ref.state_dict(), tmp_path / "r10.pth")  # torchvision/timm layout, with its fc head
    cfg = load_config("pot", [*TINY, f"model.pretrained={tmp_path / 'r10.pth'}", "pot.backbone_kwargs={}"])
    model = get_method("pot").build(cfg, 3)
    assert torch.equal(model.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    cfg.model.pretrained = str(tmp_path / "none.pth")
    with pytest.raises(TokensegError, match="model.pretrained: weights file .*none.pth not found"):
        get_method("pot").build(cfg, 3)


def test_code_mode_masks_read_the_seeds_code_mode_makes():
    """pot.mode=code makes is_cam_sum / is_cam1, not `pot`: the preset's pseudo.kind follows (their IRN
    reads IS_CAM1), so `tokenseg pseudo` finds its seeds."""
    cfg = load_config("pot-clip-es", ["pot.mode=code"])
    assert cfg.maps.kinds == ["is_cam_sum", "is_cam1"] and cfg.pseudo.kind == "is_cam1"
    assert load_config("pot-clip-es").pseudo.kind == "pot"  # paper mode keeps its own seeds

