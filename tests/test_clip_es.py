"""CLIP-ES: the authors' outputs (tests/fixtures/authors-clip-es, their code on random weights)
reproduced through the loader users use for real weights; the written-out Grad-CAM backward against
autograd; boxes against hand-computed cases; loading, text features and their cache, the authors'
.npy layout, the prompts."""
import json
import math
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from tokenseg.methods.clip_es import files as cef  # noqa: E402
from tokenseg.methods.clip_es import gradcam as ceg  # noqa: E402
from tokenseg.methods.clip_es import prompts as cep  # noqa: E402
from tokenseg.core.errors import TokensegError  # noqa: E402
from tokenseg.models import clip as mc  # noqa: E402
from tokenseg.models import clip_ops as mco  # noqa: E402

from authors_weights import authors_weights  # noqa: E402

FX = Path(__file__).parent / "fixtures" / "authors-clip-es"
LABELS = json.loads((FX / "labels.json").read_text())["labels"]
META = json.loads((FX / "meta.json").read_text())
IDS = sorted(LABELS)
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return mc.load_clip(authors_weights("authors-clip-es/visual_state_dict.pth"))


@pytest.fixture(scope="module")
def text():
    t = np.load(FX / "text_features.npz")
    return torch.from_numpy(t["fg"]), torch.from_numpy(t["bg"])


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FX / "cams.npz"))


def image(i: str) -> Image.Image:
    return Image.open(FX / "images" / f"{i}.png").convert("RGB")


def run(model, text, ids, labels=None, **opts):
    imgs = [image(i) for i in ids]
    x = torch.stack([mco.clip_input(im) for im in imgs])
    labels = labels or [LABELS[i] for i in ids]
    options = ceg.ClipESOptions(box_threshold=META["caa"]["box_threshold"], caa_layers=META["caa"]["last_layers"],
                               sinkhorn_rounds=META["caa"]["sinkhorn_rounds"], **opts)
    return ceg.clip_es_maps(model, x, labels, *text, [(im.height, im.width) for im in imgs], options,
                           intermediates=True)


# ---------------------------------------------------------------------------------------- the fixture
@pytest.mark.parametrize("img_id", IDS)
def test_every_array_equals_the_authors(model, text, ref, img_id):
    out = run(model, text, [img_id])[0]
    r = {k.split("/", 1)[1]: v for k, v in ref.items() if k.startswith(img_id + "/")}
    assert out.keys.tolist() == r["keys"].tolist()
    assert out.meta["input_size"] == r["input_size"].tolist()
    np.testing.assert_allclose(out.grid_cam.numpy(), r["grid_cam"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.highres.numpy(), r["highres"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.affinity.numpy(), r["affinity_last8_mean"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.maps.numpy(), r["attn_highres"], atol=TOL, rtol=0)


def test_batch_padding_order_and_chunks(model, text, ref):
    """Same-size images in one batch, with different class counts (padded slots) and orders, and the
    backward split into one class per chunk, give each image's own result."""
    single = run(model, text, ["img0"], labels=[[2]])[0]
    outs = run(model, text, ["img0"] * 3, labels=[[0, 2], [2, 0], [2]], class_chunk=1)
    np.testing.assert_allclose(outs[0].maps.numpy(), ref["img0/attn_highres"], atol=TOL, rtol=0)
    np.testing.assert_allclose(outs[1].maps.numpy(), ref["img0/attn_highres"][::-1], atol=TOL, rtol=0)
    assert outs[1].keys.tolist() == [2, 0]
    np.testing.assert_allclose(outs[2].maps.numpy(), single.maps.numpy(), atol=1e-6, rtol=0)
    # the softmax runs over the image's own classes: [2] alone is not [0, 2]'s map of class 2
    assert np.abs(single.grid_cam.numpy() - ref["img0/grid_cam"][1]).max() > 1e-3


def test_their_quirks_are_what_the_fixture_needs(model, text, ref):
    # position grid rounded to fp16 (their half Parameter): without it the CAM moves by > 1e-5
    off = run(model, text, ["img2"], pos_embed_fp16=False)[0]
    assert np.abs(off.grid_cam.numpy() - ref["img2/grid_cam"]).max() > 1e-4
    # boxes never cover the grid's last row/column (their clipped exclusive end)
    off = run(model, text, ["img0"], box_clip_last=False)[0]
    on = run(model, text, ["img0"])[0]
    assert np.abs(off.maps.numpy() - ref["img0/attn_highres"]).max() > 0.1
    assert off.box_mask[:, -1].any() and off.box_mask[:, :, -1].any()
    assert not on.box_mask[:, -1].any() and not on.box_mask[:, :, -1].any()


def test_no_refinement_gives_the_upsampled_gradcam(model, text, ref):
    out = run(model, text, ["img1"], refine=False)[0]
    np.testing.assert_allclose(out.maps.numpy(), ref["img1/highres"], atol=TOL, rtol=0)


def test_multi_hot_labels_and_seed(model, text, ref):
    x = mco.clip_input(image("img2"))[None]
    hot = torch.zeros(1, 5)
    hot[0, [0, 3, 4]] = 1
    out = ceg.clip_es_maps(model, x, hot, *text, (90, 120))[0]
    assert out.keys.tolist() == [0, 3, 4]  # ascending; each class's map does not depend on the order
    order = [ref["img2/keys"].tolist().index(c) for c in (0, 3, 4)]
    np.testing.assert_allclose(out.maps.numpy(), ref["img2/attn_highres"][order], atol=TOL, rtol=0)
    seed = out.seed()
    assert seed.classes.tolist() == [0, 3, 4] and seed.maps.shape == (3, 90, 120) and seed.background is None


def test_images_without_classes_and_bad_indices(model, text):
    outs = run(model, text, ["img0", "img0"], labels=[[], [1]])
    assert outs[0].maps.shape == (0, 75, 100) and outs[1].keys.tolist() == [1]
    assert run(model, text, ["img0"], labels=[[]])[0].maps.shape[0] == 0
    with pytest.raises(TokensegError, match="outside"):
        run(model, text, ["img0"], labels=[[7]])
    with pytest.raises(TokensegError, match="dtype"):
        run(model, text, ["img0"], dtype="int8")


def test_gpu_style_attention_path(model, text, ref):
    """One batched attention product per layer (what runs on a GPU) instead of the CPU's blocks."""
    out = run(model, text, ["img2"], blocked_attention=False)[0]
    np.testing.assert_allclose(out.maps.numpy(), ref["img2/attn_highres"], atol=TOL, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_is_close_and_cached(model, text, ref, dtype):
    out = run(model, text, ["img2"], dtype=dtype)[0]
    d = np.abs(out.grid_cam.numpy() - ref["img2/grid_cam"]).max()
    assert 1e-5 < d < 0.1  # really computed in low precision, and still about the same maps
    assert model.visual_in(torch.bfloat16) is model.visual_in(torch.bfloat16)
    assert model.visual_in(torch.bfloat16).conv1.weight.dtype == torch.bfloat16
    assert model.visual.conv1.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------- Grad-CAM vs autograd
def autograd_gradcam(visual, x_in, logit_scale, text_k, c):
    """Their GradCAM on open_clip's own block forward: hook ln_1 of the last block, backward p_c."""
    blk = visual.transformer.resblocks[-1]
    store = {}

    def hook(mod, inp, out):
        out.retain_grad()
        store["a"] = out

    h = blk.ln_1.register_forward_hook(hook)
    try:
        y = blk(x_in)
    finally:
        h.remove()
    f = visual.ln_post(y)[:, 1:].mean(1) @ visual.proj
    f = f / f.norm(dim=-1, keepdim=True)
    t = text_k / text_k.norm(dim=-1, keepdim=True)
    p = (logit_scale.exp() * f @ t.T).softmax(-1)
    p[0, c].backward()
    a, g = store["a"][0, 1:].detach(), store["a"].grad[0, 1:]
    cam = (a @ g.mean(0)).clamp_min(0)
    for _ in range(2):  # pytorch-grad-cam scales per layer, then the mean over layers again
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
    return cam


@pytest.mark.parametrize("act,ls", [("quick", None), ("gelu", 0.5)])
def test_written_out_backward_equals_autograd(act, ls):
    torch.manual_seed(3)
    vis = open_clip.transformer.VisionTransformer(
        image_size=64, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=4.0, ls_init_value=ls, output_dim=24,
        act_layer=open_clip.transformer.QuickGELU if act == "quick" else nn.GELU,
        norm_layer=open_clip.transformer.LayerNorm)
    with torch.no_grad():
        for name, prm in vis.named_parameters():
            if "ln" in name or "gamma" in name:
                prm.add_(0.3 * torch.randn_like(prm))  # LayerNorm/LayerScale not at their init
            if "in_proj_weight" in name:
                prm.mul_(3)  # peaky attention
    model = mc.ClipModel(vis.eval(), None, math.log(30.0))
    fg, bg = torch.randn(6, 24), torch.randn(4, 24)
    x = torch.randn(2, 1 + 12, 64)  # tokens entering the last block, a 3×4 grid
    labels = [[4, 1, 2], [5]]
    lab, valid = ceg._pad_labels(labels, 6, "cpu")
    cam, attn, probs = ceg.softmax_gradcam(model, x, (3, 4), lab, valid, fg, bg)
    for b, ls_b in enumerate(labels):
        for j, c in enumerate(ls_b):
            ref = autograd_gradcam(vis, x[b:b + 1], model.logit_scale, torch.cat([fg[ls_b], bg]), j)
            np.testing.assert_allclose(cam[b, j].reshape(-1).numpy(), ref.numpy(), atol=2e-5, rtol=0)
    assert cam[1, 1:].abs().max() == 0  # padded slots
    ref_attn = vis.transformer.resblocks[-1].attn(*(3 * [vis.transformer.resblocks[-1].ln_1(x)]))[1]
    np.testing.assert_allclose(attn.numpy(), ref_attn.detach().numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------- boxes
def test_box_mask_hand_computed():
    cam = torch.zeros(1, 6, 7)
    cam[0, 0, 0] = 1.0  # a single pixel in the corner
    cam[0, 1, 1] = 0.9  # diagonal neighbour: the same 8-connected component → box rows 0–1, cols 0–1
    cam[0, 3, 3:6] = 0.8  # a bar in row 3, cols 3–5
    cam[0, 4, 6] = 0.7  # touches the bar diagonally and the last column: box rows 3–4, cols 3–6
    cam[0, 5, 0] = 0.5  # on the last row: its box is empty after the clip
    cam[0, 2, 5] = 0.3  # below 0.4·max: no box
    got = ceg.box_mask(cam, 0.4)[0]
    want = torch.zeros(6, 7, dtype=torch.bool)
    want[0:2, 0:2] = True
    want[3:5, 3:6] = True  # exclusive end min(7, 6) = 6: the last column is dropped
    assert torch.equal(got, want)
    unclipped = ceg.box_mask(cam, 0.4, clip_last=False)[0]
    want[3:5, 3:7] = True
    want[5, 0] = True
    assert torch.equal(unclipped, want)


def test_box_threshold_after_uint8_quantisation():
    cam = torch.zeros(1, 4, 4)
    cam[0, 0, 0] = 1.0
    cam[0, 2, 2] = 0.401  # 255·0.401 = 102.3 → 102, not > int(0.4·255) = 102; as a float it is > 0.4
    assert not ceg.box_mask(cam, 0.4, clip_last=False)[0, 2, 2]
    assert ceg.box_mask(cam, 0.4, quantize=False, clip_last=False)[0, 2, 2]
    assert not ceg.box_mask(torch.zeros(2, 3, 3), 0.4).any()  # no contour: their [0, 0, 0, 0] box


# ---------------------------------------------------------------------------------------- input
def test_clip_input_is_their_torchvision_transform():
    from torchvision import transforms as T

    img = image("img4")  # 70×50 → 80×64
    tv = T.Compose([T.Resize((64, 80), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(mc.OPENAI_MEAN, mc.OPENAI_STD)])(img)
    ours = mco.clip_input(img)
    assert ours.shape == (3, 64, 80)
    assert torch.equal(ours, tv)


def test_position_grid_resize():
    pos = torch.randn(1 + 16, 8)
    same = mco.resize_clip_pos_embed(pos, (4, 4), fp16=False)
    assert torch.equal(same, pos)  # bilinear to the same size is the identity
    up = mco.resize_clip_pos_embed(pos, (6, 5))
    ref = F.interpolate(pos[1:].T.reshape(1, 8, 4, 4), size=(6, 5), mode="bilinear", align_corners=False)
    assert torch.equal(up[1:], ref.reshape(8, 30).T.half().float())
    assert torch.equal(up[0], pos[0].half().float())


# ---------------------------------------------------------------------------------------- loading
def _fixture_sd():
    return torch.load(authors_weights("authors-clip-es/visual_state_dict.pth"), weights_only=True)


@pytest.mark.parametrize("layout", ["wrapped", "safetensors", "torchscript"])
def test_other_file_layouts_give_the_same_model(tmp_path, model, layout):
    sd = _fixture_sd()
    if layout == "wrapped":
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items() if k != "visual.positional_embedding_new"}, path)
    else:
        class Holder(nn.Module):  # a TorchScript archive with OpenAI's key layout
            def __init__(self):
                super().__init__()
                self.visual = model.visual
                self.logit_scale = nn.Parameter(sd["logit_scale"].clone())

            def forward(self, x):
                return x * self.logit_scale

        path = tmp_path / "ViT-tiny.pt"
        with pytest.warns(FutureWarning):
            torch.jit.save(torch.jit.trace(Holder(), torch.ones(2)), str(path))
    m2 = mc.load_clip(path)
    assert float(m2.logit_scale) == pytest.approx(float(sd["logit_scale"]))
    for (k, a), (_, b) in zip(model.visual.state_dict().items(), m2.visual.state_dict().items()):
        assert torch.equal(a, b), k
    assert isinstance(m2.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_loader_errors(tmp_path):
    with pytest.raises(TokensegError, match="not found"):
        mc.load_clip(tmp_path / "nope.pt")
    with pytest.raises(TokensegError, match="folder"):
        mc.load_clip(tmp_path)
    with pytest.raises(TokensegError, match="needs CLIP weights"):
        mc.load_clip(False)
    bad = tmp_path / "deit.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 5, 8)}}, bad)
    with pytest.raises(TokensegError, match="not a CLIP ViT"):
        mc.load_clip(bad)
    sd = _fixture_sd()
    sd["visual.proj"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(TokensegError, match="visual.proj"):
        mc.load_clip(tmp_path / "shape.pth")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TokensegError, match="cannot read"):
        mc.load_clip(junk)
    with pytest.raises(TokensegError, match="neither a file nor an open_clip pretrained tag"):
        mc.load_clip("laion9000")


def test_offline_download_says_what_to_fetch(monkeypatch, tmp_path):
    def offline(url, cache_dir=None, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    # without network our check names the file at once; with network the failed download does
    with pytest.raises(TokensegError, match=r"ViT-B-16.pt.*model.pretrained=/path/to/ViT-B-16.pt"):
        mc.load_clip(True, cache_dir=tmp_path)


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(TokensegError, match=r'pip install "tokenseg\[clip\]"'):
        mc.require_open_clip()


# ---------------------------------------------------------------------------------------- text
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}


@pytest.fixture
def full_ckpt(tmp_path):
    """A tiny full CLIP (QuickGELU, as OpenAI's) saved as a plain state_dict."""
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(TINY_CFG["embed_dim"], TINY_CFG["vision_cfg"], TINY_CFG["text_cfg"],
                               quick_gelu=True).eval()
    path = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_text_features_are_their_zeroshot_classifier(full_ckpt, tmp_path):
    ref, path = full_ckpt
    model = mc.load_clip(path)
    names, templates = ["bird avian", "person with clothes,people,human", "sky"], ["a clean origami {}.", "a {}"]
    got = mco.text_features(model, names, templates, cache_dir=tmp_path / "cache")
    with torch.no_grad():  # per class: embed each prompt, normalise, mean over prompts, normalise
        want = []
        for n in names:
            e = ref.encode_text(open_clip.tokenize([t.format(n) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            want.append(e / e.norm())
    np.testing.assert_allclose(got.numpy(), torch.stack(want).numpy(), atol=1e-6)
    files = list((tmp_path / "cache" / "clip_text").glob("*.npz"))
    assert len(files) == 1
    # a second call reads the cache (the text tower is not run again)
    model.text.encode_text = None
    again = mco.text_features(model, names, templates, cache_dir=tmp_path / "cache")
    assert torch.equal(again, got)
    with pytest.raises(TypeError):  # another class list is another key: it needs the tower
        mco.text_features(model, names[:2], templates, cache_dir=tmp_path / "cache")


def test_text_cache_is_keyed_by_the_weights_and_repaired(full_ckpt, tmp_path):
    ref, path = full_ckpt
    cache = tmp_path / "cache"
    a = mco.text_features(mc.load_clip(path), ["cat"], "a {}", cache)
    f = next((cache / "clip_text").glob("*.npz"))
    f.write_bytes(b"damaged")
    assert torch.equal(mco.text_features(mc.load_clip(path), ["cat"], "a {}", cache), a)  # recomputed
    with torch.no_grad():
        ref.token_embedding.weight.mul_(2)
    torch.save(ref.state_dict(), tmp_path / "other.pt")
    b = mco.text_features(mc.load_clip(tmp_path / "other.pt"), ["cat"], "a {}", cache)
    assert len(list((cache / "clip_text").glob("*.npz"))) == 2 and not torch.allclose(a, b)
    with pytest.raises(TokensegError, match="template"):
        mco.text_features(mc.load_clip(path), ["cat"], "no placeholder", cache)


def test_vision_only_weights_have_no_text_features(model):
    with pytest.raises(TokensegError, match="no text tower"):
        mco.text_features(model, ["cat"])


def test_open_clip_config_for_a_checkpoint(full_ckpt, tmp_path):
    ref, path = full_ckpt
    cfg = tmp_path / "tiny-test-clip.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    m = mc.load_clip(path, arch="tiny-test-clip")  # open_clip's config: GELU, as LAION models
    assert isinstance(m.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert isinstance(mc.load_clip(path).visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    tok = open_clip.tokenize(["a cat"])
    with torch.no_grad():
        assert torch.allclose(m.encode_text(tok), ref.encode_text(tok), atol=1e-5) is False  # GELU ≠ QuickGELU
        assert torch.allclose(mc.load_clip(path).encode_text(tok), ref.encode_text(tok), atol=1e-6)


# ---------------------------------------------------------------------------------------- prompts and files
def test_voc_and_coco_prompts_and_background_words(tmp_path):
    from tokenseg.data.coco import COCO_CLASSES
    from tokenseg.data.voc import VOC_CLASSES

    assert cep.dataset_kind(VOC_CLASSES) == "voc" and cep.dataset_kind(COCO_CLASSES) == "coco"
    voc = cep.prompt_names(VOC_CLASSES, "voc")
    assert [voc[i] for i in (2, 8, 14, 19)] == ["bird avian", "chair seat", "person with clothes,people,human",
                                                "tvmonitor screen"]
    coco = cep.prompt_names(COCO_CLASSES, "coco")
    assert [coco[i] for i in (0, 3, 24, 25, 26, 27, 31, 44, 62, 65, 78)] == [
        "person with clothes,people,human", "motorbike", "backpack,bag", "umbrella,parasol", "handbag,purse",
        "necktie", "sknowboard", "dessertspoon", "tvmonitor screen", "remote control", "hairdrier,blowdrier"]
    assert len(cep.background_words("voc")) == 25 and cep.background_words("voc")[:3] == ["ground", "land", "grass"]
    assert len(cep.background_words("coco")) == 23 and "keyboard" not in cep.background_words("coco")
    assert cep.background_words("custom") == cep.background_words("voc")
    assert cep.BOX_THRESHOLDS == {"voc": 0.4, "coco": 0.7}
    words = tmp_path / "bg.txt"
    words.write_text("# mine\nfloor\n\nsky\n")
    assert cep.background_words("voc", str(words)) == ["floor", "sky"]
    assert cep.background_words("voc", ["wall"]) == ["wall"]


def test_custom_classes_with_a_synonyms_file(tmp_path):
    names = ["cat", "dog", "traffic_cone"]
    syn_json = tmp_path / "syn.json"
    syn_json.write_text(json.dumps({"dog": ["dog", "puppy"], "traffic_cone": "traffic cone"}))
    syn = cep.load_synonyms(syn_json)
    assert cep.prompt_names(names, "custom", syn) == ["cat", "dog,puppy", "traffic cone"]
    syn_yaml = tmp_path / "syn.yaml"
    syn_yaml.write_text("cat: kitten\n")
    assert cep.prompt_names(names, "custom", cep.load_synonyms(syn_yaml)) == ["kitten", "dog", "traffic_cone"]
    with pytest.raises(TokensegError, match="not among"):
        cep.prompt_names(names, "custom", {"cow": "cow"})
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(TokensegError, match="map each class"):
        cep.load_synonyms(tmp_path / "bad.json")


def test_their_npy_layout_round_trip(tmp_path, model, text, ref):
    out = run(model, text, ["img2"])[0]
    path = tmp_path / "2007_000032.npy"
    cef.save_clip_es_npy(path, out.keys, out.maps)
    d = np.load(path, allow_pickle=True).item()  # what their eval_cam.py does
    assert sorted(d) == ["attn_highres", "keys"]
    assert d["keys"].dtype == np.int64 and d["attn_highres"].dtype == np.float16
    assert d["keys"].tolist() == ref["img2/keys"].tolist()
    seed = cef.load_clip_es_npy(path)  # restricted unpickling
    np.testing.assert_allclose(seed.maps, ref["img2/attn_highres"], atol=1e-3)
    assert seed.classes.tolist() == [3, 4, 0]
    np.save(tmp_path / "evil.npy", {"keys": np.zeros(1), "attn_highres": Path("x")}, allow_pickle=True)
    with pytest.raises(TokensegError, match="not allowed"):
        cef.load_clip_es_npy(tmp_path / "evil.npy")
    np.save(tmp_path / "other.npy", {0: np.zeros((2, 2))}, allow_pickle=True)
    with pytest.raises(TokensegError, match="not a CLIP-ES seed file"):
        cef.load_clip_es_npy(tmp_path / "other.npy")


def test_dataset_text_side(full_ckpt, tmp_path):
    from tokenseg.data.coco import COCO_CLASSES
    from tokenseg.data.voc import VOC_CLASSES

    _, path = full_ckpt
    model = mc.load_clip(path)
    voc = cep.clip_es_text(model, VOC_CLASSES, cache_dir=tmp_path)
    assert voc.kind == "voc" and voc.box_threshold == 0.4 and voc.fg.shape == (20, 32) and voc.bg.shape == (25, 32)
    np.testing.assert_allclose(voc.fg[14].numpy(), mco.text_features(
        model, ["person with clothes,people,human"], cep.DEFAULT_TEMPLATE)[0].numpy(), atol=1e-6)
    coco = cep.clip_es_text(model, COCO_CLASSES, fmt="coco", cache_dir=tmp_path)
    assert coco.box_threshold == 0.7 and coco.bg.shape[0] == 23 and coco.prompts[31] == "sknowboard"
    (tmp_path / "syn.json").write_text(json.dumps({"cone": ["traffic cone", "pylon"]}))
    (tmp_path / "bg.txt").write_text("road\nsky\n")
    mine = cep.clip_es_text(model, ["cone", "car"], synonyms=tmp_path / "syn.json", background=tmp_path / "bg.txt")
    assert mine.kind == "custom" and mine.prompts == ["traffic cone,pylon", "car"]
    assert mine.background == ["road", "sky"]
    assert mine.box_threshold == 0.4
