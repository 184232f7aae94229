"""maps.mode=authors: what the authors' fixtures (test_authors_fixtures.py) do not cover — the position
embedding offset rule, equality with the batched default path, the authors' layout round trip, the .npy
seed files and their restricted unpickling."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tokenseg.config import MapsConfig, ModelConfig, load_config
from tokenseg.data import WSSSDataset
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed
from tokenseg.maps import compute_maps, normalise
from tokenseg.maps import generate_seeds
from tokenseg.methods.mctformer.authors import (authors_patch_pos, compute_maps_authors, export_seeds_npy, AUTHORS_HOOKS, import_seeds_npy, uses_dino_offset)
from tokenseg.methods.mctformer.convert import export_authors_state, model_from_state
from tokenseg.methods.mctformer.model import build_model

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
KINDS = {"mctformer-v1": ["attention", "attention_affinity"],
         "mctformer-v2": ["attention", "attention_affinity", "patchcam", "fused", "fused_affinity"],
         "mctformer-plus": ["attention", "attention_affinity", "patchcam", "fused", "fused_affinity"]}
RECIPE = {"mctformer-v1": dict(layers=2, layer_reduce="sum", fusion="product"),
          "mctformer-v2": dict(layers=2, layer_reduce="sum", fusion="product"),
          "mctformer-plus": dict(layers=3, layer_reduce="mean", fusion="sqrt")}


def tiny(method="mctformer-plus", C=4, seed=0, sharpen=1.0):
    """A random 3-block ViT. ``sharpen`` scales q/k/v: random attention is near uniform, so the
    min–max of affinity-smoothed maps would magnify float rounding; trained attention is peaky."""
    cfg = ModelConfig(method=method, backbone="vit_tiny_patch16_224",
                      backbone_kwargs={"img_size": 64, "embed_dim": 64, "depth": 3, "num_heads": 2},
                      img_size=64, drop_path=0.0)
    torch.manual_seed(seed)
    model = build_model(cfg, C).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(sharpen)
    return model


def random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth-ish, like a photo


def test_dino_offset_position_embedding():
    torch.manual_seed(0)
    pos = torch.randn(1, 8, 4, 4)
    # training grid and a square input: no interpolation at all
    assert torch.equal(authors_patch_pos(pos, (4, 4), True, True), pos.flatten(2).transpose(1, 2))
    # same grid, non-square input: the +0.1 offset still resamples (their code's condition)
    same = authors_patch_pos(pos, (4, 4), True, False)
    assert not torch.allclose(same, pos.flatten(2).transpose(1, 2))
    # the offset is the scale factor (g'+0.1)/g, not the output size
    got = authors_patch_pos(pos, (3, 5), True, False)
    exp = F.interpolate(pos, scale_factor=(3.1 / 4, 5.1 / 4), mode="bicubic", align_corners=False)
    assert torch.equal(got, exp.flatten(2).transpose(1, 2))
    plain = F.interpolate(pos, size=(3, 5), mode="bicubic", align_corners=False)
    assert not torch.allclose(got, plain.flatten(2).transpose(1, 2))
    assert torch.equal(authors_patch_pos(pos, (3, 5), False, False), plain.flatten(2).transpose(1, 2))
    assert uses_dino_offset("mctformer-v2", MapsConfig()) and not uses_dino_offset("mctformer-plus", MapsConfig())
    assert uses_dino_offset(None, MapsConfig(layer_reduce="sum"))


def test_plus_at_scale_one_equals_default_path():
    """MCTformer+, one scale, a multiple-of-16 image: both pipelines compute the same thing."""
    model = tiny("mctformer-plus", sharpen=4.0)
    img = random_image(96, 80, seed=3)
    labels = np.array([0, 1, 1, 0], np.float32)
    cfg = MapsConfig(scales=[1.0], flip=True, layers=3, kinds=KINDS["mctformer-plus"])
    a = compute_maps_authors(model, img, labels, cfg, method="mctformer-plus")
    x = normalise(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None])
    d = compute_maps(model, x, torch.from_numpy(labels)[None], cfg)
    for kind in cfg.kinds:
        np.testing.assert_allclose(a[kind], d[kind][0, [1, 2]].numpy(), atol=2e-5, err_msg=kind)


def test_an_image_without_classes_gets_empty_maps_and_a_capped_photo_smaller_views():
    """No present class: no maps (and no forward pass); maps.max_side shrinks the views of a large
    photo while the seeds keep its size."""
    model = tiny("mctformer-plus")
    img = random_image(96, 80, seed=2)
    cfg = MapsConfig(scales=[1.0, 1.5], flip=True, layers=3, kinds=["fused", "attention_affinity"])
    empty = compute_maps_authors(model, img, np.zeros(4, np.float32), cfg, method="mctformer-plus")
    assert all(m.shape == (0, 80, 96) for m in empty.values())
    labels = np.array([0, 1, 0, 1], np.float32)
    capped = MapsConfig(scales=[1.0, 1.5], flip=True, layers=3, kinds=["fused"], max_side=96)
    same = MapsConfig(scales=[2 / 3, 1.0], flip=True, layers=3, kinds=["fused"])  # 96 / (96 * 1.5)
    a = compute_maps_authors(model, img, labels, capped, method="mctformer-plus")["fused"]
    b = compute_maps_authors(model, img, labels, same, method="mctformer-plus")["fused"]
    assert a.shape == (2, 80, 96)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", ["mctformer-v2", "mctformer-plus"])
def test_maps_from_authors_layout_equal_native(method):
    model = tiny(method)
    loaded, loaded_cfg, _ = model_from_state({"model": export_authors_state(model, method)}, num_heads=2)
    assert loaded_cfg.model.method == method  # the method that makes its maps
    img = random_image(70, 50, seed=1)
    labels = np.array([1, 1, 0, 0], np.float32)
    cfg = MapsConfig(scales=[1.0, 0.75], kinds=["fused_affinity", "attention"], **RECIPE[method])
    a, b = (compute_maps_authors(m, img, labels, cfg) for m in (model, loaded))
    for k in cfg.kinds:
        assert np.array_equal(a[k], b[k])
    x = normalise(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None])
    y = torch.from_numpy(labels)[None]
    a, b = (compute_maps(m, x, y, cfg) for m in (model, loaded))
    for k in cfg.kinds:
        assert torch.equal(a[k], b[k])


# ------------------------------------------------------------------------- seeds on disk
def make_dataset(root, sizes=((83, 61), (64, 64), (70, 50)), C=4):
    (root / "img").mkdir(parents=True)
    paths, labels = [], []
    for i, (w, h) in enumerate(sizes):
        p = root / "img" / f"im{i}.png"
        random_image(w, h, seed=10 + i).save(p)
        paths.append(p)
        labels.append(sorted({i % C, (i + 2) % C}))
    return WSSSDataset("toy", [f"c{i}" for i in range(C)], [f"im{i}" for i in range(len(sizes))], paths, labels)


def test_generate_seeds_authors_npz_and_npy(tmp_path):
    model = tiny("mctformer-v2")
    ds = make_dataset(tmp_path / "data")
    cfg = MapsConfig(scales=[1.0, 0.5], kinds=["fused_affinity"], **RECIPE["mctformer-v2"])
    out = generate_seeds(model, ds, tmp_path / "seeds", cfg, progress=False, method="mctformer-v2", hooks=AUTHORS_HOOKS)
    meta = json.loads((out / "maps_meta.json").read_text())
    assert meta["mode"] == "authors" and meta["dino_pos_offset"] is True
    npy = generate_seeds(model, ds, tmp_path / "npy", cfg, progress=False, method="mctformer-v2",
                                 export_npy=True, hooks=AUTHORS_HOOKS)
    for i, image_id in enumerate(ds.ids):
        a = load_seed(out / "fused_affinity" / f"{image_id}.npz")
        b = load_seed(npy / "fused_affinity" / f"{image_id}.npy")  # restricted unpickler, no flag needed
        assert list(a.classes) == list(b.classes) == ds.labels[i]
        w, h = Image.open(ds.image_paths[i]).size
        assert b.maps.shape == (2, h, w) and b.maps.dtype == np.float32
        np.testing.assert_allclose(a.maps.astype(np.float32), b.maps, atol=1e-3)  # npz is float16
        # the authors' reader: np.load(...).item() -> {class: map}
        d = np.load(npy / "fused_affinity" / f"{image_id}.npy", allow_pickle=True).item()
        assert sorted(d) == ds.labels[i] and all(isinstance(k, int) for k in d)
        assert math.isclose(float(max(m.max() for m in d.values())), 1.0, abs_tol=1e-3)
    # resume: nothing to do, files untouched
    mtime = os.path.getmtime(npy / "fused_affinity" / "im0.npy")
    generate_seeds(model, ds, tmp_path / "npy", cfg, progress=False, export_npy=True, hooks=AUTHORS_HOOKS)
    assert os.path.getmtime(npy / "fused_affinity" / "im0.npy") == mtime
    # folder conversions both ways
    assert export_seeds_npy(out, tmp_path / "exp") == 3
    assert import_seeds_npy(tmp_path / "exp", tmp_path / "back") == 3
    r = load_seed(tmp_path / "back" / "fused_affinity" / "im1.npz")
    assert np.array_equal(r.maps, load_seed(out / "fused_affinity" / "im1.npz").maps)


def test_npy_seed_pickle_is_restricted(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "x.npy"
    np.save(p, {0: Evil()}, allow_pickle=True)
    with pytest.raises(TokensegError, match="not allowed.*allow-pickle"):
        load_seed(p)
    np.save(p, {3: np.ones((2, 3), np.float32), np.int64(1): np.zeros((2, 3))}, allow_pickle=True)
    s = load_seed(p)
    assert list(s.classes) == [1, 3] and s.maps.shape == (2, 2, 3)
    assert list(load_seed(p, allow_pickle=True).classes) == [1, 3]


def test_maps_mode_config_key():
    assert load_config("mctformer-v2", ["maps.mode=authors"]).maps.mode == "authors"
    with pytest.raises(TokensegError, match="maps.mode"):
        load_config("mctformer-v2", ["maps.mode=fast"])


def test_v1_model_rejects_patchcam_kinds():
    model = tiny("mctformer-v1")
    with pytest.raises(TokensegError, match="PatchCAM"):
        compute_maps_authors(model, random_image(40, 40), np.ones(4), MapsConfig(kinds=["fused"]))
