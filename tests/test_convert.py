"""Checkpoint compatibility with the authors' MCTformer layouts (tokenseg.methods.mctformer.convert)."""
import argparse

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import ModelConfig
from tokenseg.data import VOC_CLASSES
from tokenseg.engine import load_model_from_checkpoint, read_checkpoint
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed
from tokenseg.core.masks import save_palette_png
from tokenseg.methods.mctformer.model import build_model
from tokenseg.methods.mctformer.convert import (detect_layout, export_authors_state, load_authors_checkpoint,
                                     model_from_state, unwrap_state_dict)

KW = {"img_size": 64, "embed_dim": 64, "depth": 3, "num_heads": 2}


def tiny(method="mctformer-plus", C=4, seed=0, kw=KW, img_size=64):
    cfg = ModelConfig(method=method, backbone="vit_tiny_patch16_224", backbone_kwargs=dict(kw), img_size=img_size,
                      drop_path=0.0)
    torch.manual_seed(seed)
    return build_model(cfg, C).eval()


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def save_authors(path, model, method, wrap=True, prefix="", extra=None):
    sd = {prefix + k: v for k, v in export_authors_state(model, method).items()}
    if extra:
        sd.update(extra)
    obj = {"model": sd, "epoch": 44, "args": argparse.Namespace(lr=5e-4, data_set="VOC12")} if wrap else sd
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("method", ["mctformer-v1", "mctformer-v2", "mctformer-plus"])
def test_roundtrip_in_memory(method):
    model = tiny(method)
    sd = export_authors_state(model, method)
    info = detect_layout(sd)
    assert info.layout == method and info.num_classes == 4 and info.depth == 3 and info.grid == (4, 4)
    if method == "mctformer-plus":
        assert sd["pos_embed_cls"].shape == (1, 4, 64) and sd["pos_embed_pat"].shape == (1, 16, 64)
    else:
        assert sd["pos_embed"].shape == (1, 20, 64) and "pos_embed_cls" not in sd
    assert sd["cls_token"].shape == (1, 4, 64)
    assert ("head.weight" in sd) == (method != "mctformer-v1")
    back, cfg, names = model_from_state({"model": sd}, num_heads=2)
    assert same_state(model, back)
    assert cfg.model.method == method and cfg.model.img_size == 64 and len(names) == 4
    again = export_authors_state(back, method)
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)


def test_roundtrip_through_files_and_cli(tmp_path):
    model = tiny("mctformer-plus", C=20, kw={"img_size": 64, "embed_dim": 128, "depth": 2, "num_heads": 2})
    src = save_authors(tmp_path / "authors.pth", model, "mctformer-plus", prefix="module.")
    assert main(["convert", str(src), str(tmp_path / "ours.pt")]) == 0  # heads = 128/64, VOC names for 20
    state = read_checkpoint(tmp_path / "ours.pt")
    assert state["class_names"] == VOC_CLASSES and state["config"]["model"]["method"] == "mctformer-plus"
    loaded, cfg, names = load_model_from_checkpoint(tmp_path / "ours.pt")
    assert same_state(model, loaded)
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "back.pth")]) == 0  # --to authors
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    orig = export_authors_state(model, "mctformer-plus")
    assert back.keys() == orig.keys() and all(torch.equal(back[k], orig[k]) for k in orig)
    # V2 layout of the same weights, loaded straight from the authors' file (no conversion step)
    v2 = tiny("mctformer-v2", C=20, kw={"img_size": 64, "embed_dim": 128, "depth": 2, "num_heads": 2})
    save_authors(tmp_path / "v2.pth", v2, "mctformer-v2")
    m2, cfg2, names2 = load_model_from_checkpoint(tmp_path / "v2.pth")
    assert same_state(v2, m2) and cfg2.model.method == "mctformer-v2" and names2 == VOC_CLASSES
    assert cfg2.maps.layer_reduce == "sum" and cfg2.maps.fusion == "product"


def deit_s_plus_state(C=20, grid=28, D=384):
    """An MCTformer+ DeiT-S state dict in the authors' layout (448 px -> 28×28 grid), random values."""
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, C, D), "pos_embed_cls": (1, C, D), "pos_embed_pat": (1, grid * grid, D),
              "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,), "head.weight": (C, D, 3, 3), "head.bias": (C,)}
    for i in range(12):
        for name, shape in {"norm1": (D,), "attn.qkv": (3 * D, D), "attn.proj": (D, D), "norm2": (D,),
                            "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    return {k: torch.randn(v, generator=g) for k, v in shapes.items()}


def test_deit_small_448_plus_layout_gets_the_standard_backbone():
    sd = deit_s_plus_state()
    model, cfg, names = model_from_state({"model": sd})
    assert cfg.model.backbone == "deit_small_patch16_224" and cfg.model.backbone_kwargs == {}
    assert cfg.model.img_size == 448 and model.blocks[0].attn.num_heads == 6 and names == VOC_CLASSES
    assert model.pos_embed_pat.shape == (1, 384, 28, 28)
    back = export_authors_state(model, "mctformer-plus")
    assert back.keys() == sd.keys() and all(torch.equal(sd[k], back[k]) for k in sd)


def test_v1_file_with_timm_linear_head(tmp_path):
    model = tiny("mctformer-v1")
    p = save_authors(tmp_path / "v1.pth", model, "mctformer-v1",
                     extra={"head.weight": torch.randn(4, 64), "head.bias": torch.zeros(4)})
    m, cfg = load_authors_checkpoint(p, num_heads=2)
    assert cfg.model.method == "mctformer-v1" and m.head is None and same_state(model, m)
    assert m.class_names == ["class_0", "class_1", "class_2", "class_3"]


def test_mismatches_are_clear_errors(tmp_path):
    model = tiny("mctformer-v2")
    sd = export_authors_state(model, "mctformer-v2")
    with pytest.raises(TokensegError, match="4 class tokens, but 20"):
        model_from_state(sd, num_heads=2, num_classes=20)
    with pytest.raises(TokensegError, match="not mctformer-v1"):
        model_from_state(sd, num_heads=2, method="mctformer-v1")
    v1 = export_authors_state(tiny("mctformer-v1"), "mctformer-v1")
    with pytest.raises(TokensegError, match="needs the PatchCAM conv head"):
        model_from_state(v1, num_heads=2, method="mctformer-plus")
    broken = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(TokensegError, match="missing keys: blocks.1.attn.qkv.weight"):
        model_from_state(broken, num_heads=2)
    gap = {k.replace("blocks.2.", "blocks.3."): v for k, v in sd.items()}  # depth 4 with block 2 absent
    with pytest.raises(TokensegError, match="missing keys: blocks.2"):
        model_from_state(gap, num_heads=2)
    bad_head = dict(sd, **{"head.weight": torch.zeros(5, 64, 3, 3)})
    with pytest.raises(TokensegError, match="5 outputs for 4 class tokens"):
        model_from_state(bad_head, num_heads=2)
    odd = dict(sd, pos_embed=sd["pos_embed"][:, :-1])
    with pytest.raises(TokensegError, match="square grid"):
        model_from_state(odd, num_heads=2)
    with pytest.raises(TokensegError, match="unexpected keys"):
        model_from_state(dict(sd, **{"fc_norm.weight": torch.ones(64)}), num_heads=2)
    with pytest.raises(TokensegError, match="--num-heads"):
        model_from_state(export_authors_state(tiny("mctformer-v2", kw=dict(KW, embed_dim=96, num_heads=2)),
                                              "mctformer-v2"))
    with pytest.raises(TokensegError, match="no cls_token"):
        model_from_state({"model": {"conv1.weight": torch.zeros(1)}})
    with pytest.raises(TokensegError, match="3 class names given for 4"):
        model_from_state(sd, num_heads=2, class_names=["a", "b", "c"])
    # the CLI reports them with exit status 2
    p = save_authors(tmp_path / "v2.pth", model, "mctformer-v2")
    assert main(["convert", str(p), str(tmp_path / "x.pt"), "--num-heads", "2", "--num-classes", "20"]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_untrusted_pickle_needs_allow_pickle(tmp_path):
    from fractions import Fraction  # any class outside the allow-list

    model = tiny("mctformer-plus")
    p = tmp_path / "odd.pth"
    torch.save({"model": export_authors_state(model, "mctformer-plus"), "extra": Fraction(1, 3)}, p)
    with pytest.raises(TokensegError, match="--allow-pickle"):
        load_authors_checkpoint(p, num_heads=2)
    m, _ = load_authors_checkpoint(p, num_heads=2, allow_pickle=True)
    assert same_state(model, m)
    # `tokenseg maps --checkpoint` reads through read_checkpoint: tensors-only as well
    with pytest.raises(TokensegError, match="tokenseg convert .* --allow-pickle"):
        read_checkpoint(p, allow_foreign=True)
    assert read_checkpoint(p, allow_foreign=True, allow_pickle=True)["extra"] == Fraction(1, 3)


def deit_like(tmp_path, layout="deit"):
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **KW)
    sd = vit.state_dict()
    if layout == "deit":
        obj = {"model": sd}
    else:  # DINO training checkpoint: teacher weights under 'backbone.'
        obj = {"teacher": {"backbone." + k: v for k, v in sd.items() if not k.startswith("head")},
               "epoch": 100}
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    return path, sd


@pytest.mark.parametrize("layout", ["deit", "dino"])
def test_imagenet_checkpoint_initialises_class_tokens(tmp_path, layout):
    path, sd = deit_like(tmp_path, layout)
    # build_model with model.pretrained=PATH, as training does: class token repeated C times,
    # 4×4 grid copied 2×2 for a 2× training size (MCTformer+), no distinct_init
    cfg = ModelConfig(method="mctformer-plus", backbone="vit_tiny_patch16_224", backbone_kwargs=dict(KW),
                      img_size=128, pretrained=str(path))
    m = build_model(cfg, 5)
    assert torch.equal(m.cls_tokens, sd["cls_token"].expand(1, 5, 64))
    assert torch.equal(m.pos_embed_cls, sd["pos_embed"][:, :1].expand(1, 5, 64))
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    assert torch.equal(m.pos_embed_pat, grid.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(m.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    # the same through `tokenseg convert` (224-style training size: identity grid, V2)
    out = tmp_path / "init.pt"
    assert main(["convert", str(path), str(out), "--method", "mctformer-v2", "--num-classes", "5",
                 "--num-heads", "2"]) == 0
    init, cfg2, names = load_model_from_checkpoint(out)
    assert torch.equal(init.cls_tokens, sd["cls_token"].expand(1, 5, 64)) and len(names) == 5
    assert cfg2.model.method == "mctformer-v2" and init.head.weight.shape == (5, 64, 3, 3)
    # without a class count it says what is missing
    with pytest.raises(TokensegError, match="one class token"):
        load_authors_checkpoint(path, num_heads=2)


def test_unwrap_and_detect():
    sd = export_authors_state(tiny("mctformer-plus"), "mctformer-plus")
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}
    assert unwrap_state_dict(wrapped).keys() == sd.keys()
    assert detect_layout(unwrap_state_dict({"model": sd})).layout == "mctformer-plus"


# ------------------------------------------------------------------------------------- CLI: maps
def voc_toy(root, n=2):
    """A VOC-layout folder with the 20 VOC classes (labels from the masks)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        h, w = 50 + 7 * i, 70
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[5:30, 10:40] = 1 + i
        mask[30:45, 40:60] = 15
        save_palette_png(root / "SegmentationClass" / f"im{i}.png", mask)
        ids.append(f"im{i}")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")


def test_cli_maps_and_evaluate_with_authors_checkpoint(tmp_path):
    voc_toy(tmp_path / "voc")
    kw = {"img_size": 64, "embed_dim": 128, "depth": 2, "num_heads": 2}
    model = tiny("mctformer-plus", C=20, kw=kw)
    ckpt = save_authors(tmp_path / "mct_plus.pth", model, "mctformer-plus")
    cfg = {"preset": "mctformer-plus", "output_dir": str(tmp_path / "run"),
           "data": {"format": "voc", "root": str(tmp_path / "voc"), "num_workers": 0},
           "model": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": kw, "img_size": 64},
           "train": {"device": "cpu"},
           "maps": {"split": "train", "scales": [1.0], "layers": 2, "kinds": ["fused_affinity"], "batch_size": 2},
           "eval": {"split": "train"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    seeds = tmp_path / "seeds"
    assert main(["maps", str(tmp_path / "cfg.yaml"), "--checkpoint", str(ckpt), "--out", str(seeds), "--quiet"]) == 0
    s = load_seed(seeds / "fused_affinity" / "im1.npz")
    assert list(s.classes) == [1, 14] and s.maps.shape == (2, 57, 70)
    # their .npy format, evaluated by `tokenseg evaluate`
    assert main(["convert", str(seeds / "fused_affinity"), str(tmp_path / "npy")]) == 0
    d = np.load(tmp_path / "npy" / "im0.npy", allow_pickle=True).item()
    assert sorted(d) == [0, 14]
    assert main(["evaluate", str(tmp_path / "cfg.yaml"), "--seeds", str(tmp_path / "npy"), "--quiet"]) == 0
