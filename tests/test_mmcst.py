"""MMCST (METHODS.md §9, [I] §9.2) on a tiny ViT with a small random open_clip tower: the textual tokens,
which parts train, the loss going down, the maps of every switchable reading against a plain
explicit-attention reference, and a checkpoint that rebuilds and gives the same maps without the CLIP file."""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import build_dataset
from tokenseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed
from tokenseg.methods import get_method

from floors import background_only_miou

TINY = ["data.format=synthetic", "data.train_split=train", "data.val_split=val", "data.num_workers=0",
        "data.synthetic={num_classes: 3, image_size: 48, train_images: 48, val_images: 16, seed: 1}",
        "maps.split=val", "eval.split=val", "model.method=mmcst", "mmcst.clip=random", "mmcst.text_dim=64",
        "maps.layers=2", "model.cct_weight=0.0"]
TOWER = {"context_length": 32, "width": 64, "heads": 2, "layers": 2, "image_size": 64, "image_patch": 16,
         "image_width": 64, "image_layers": 1}
READINGS = {
    "default": [],
    "classifier": ["mmcst.text_tokens=classifier"],
    "concat": ["mmcst.context_mode=concat"],
    "patches": ["mmcst.image_context=patches"],
    "no-context": ["mmcst.image_context=none", "mmcst.visual_context=false"],
    "visual-only-maps": ["mmcst.map_groups=visual"],
    "textual-only-maps": ["mmcst.map_groups=textual"],
}


def _cfg(tmp_path, extra=()):
    return load_config("tiny", [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
                                *extra])


def _build(tmp_path, extra=()):
    cfg = _cfg(tmp_path, extra)
    torch.manual_seed(0)
    return get_method("mmcst").build(cfg, 3), cfg


def _images(n=2, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_textual_tokens_are_the_random_open_clip_text_embeddings_of_the_prompts(tmp_path):
    model, _ = _build(tmp_path)
    assert model.prompts == ["a photo of a disc.", "a photo of a block.", "a photo of a wedge."]
    # independent reference: the same open_clip CLIP built from the config dict, its own tokenizer
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(64, vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=1, head_width=32),
                               text_cfg=dict(context_length=32, width=64, heads=2, layers=2), quick_gelu=True).eval()
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=32)(model.prompts)
    with torch.no_grad():
        expect = F.normalize(ref.encode_text(tokens), dim=-1)
    assert torch.allclose(model.text_embeddings, expect, atol=1e-5)
    assert "text_embeddings" in model.state_dict() and not any(n.startswith("text.") for n in model.state_dict())
    # what enters the first block: [visual tokens + visual context; projected text + image-language context]
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    model.eval()
    x = _images()
    with torch.no_grad():
        model(x)
        patches, _ = model.embed_patches(x)
        img = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        img = (img - torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]) / \
            torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
        e_img = F.normalize(ref.visual(F.interpolate(img, size=(64, 64), mode="bicubic", antialias=True)), dim=-1)
        vis = model.cls_tokens + model.pos_embed_cls + patches.mean(1, keepdim=True)
        txt = model.text_proj(expect)[None] + model.context_proj(e_img)[:, None]
    C = 3
    assert torch.allclose(seen["x"][:, :C], vis, atol=1e-5)
    assert torch.allclose(seen["x"][:, C:2 * C], txt, atol=1e-5)
    assert torch.allclose(seen["x"][:, 2 * C:], patches, atol=1e-6)


def test_contexts_are_sample_specific_and_absent_when_switched_off(tmp_path):
    x = _images(2)
    model, _ = _build(tmp_path)
    with torch.no_grad():
        tok, _, _ = model.embed_all(x)
    shift = tok[0, :6] - tok[1, :6]  # one vector per token group, the same for every class
    assert shift.abs().max() > 1e-3
    assert torch.allclose(shift[:3], shift[:1].expand(3, -1), atol=1e-6)
    assert torch.allclose(shift[3:], shift[3:4].expand(3, -1), atol=1e-6)
    bare, _ = _build(tmp_path, READINGS["no-context"])
    with torch.no_grad():
        tok, _, _ = bare.embed_all(x)
    assert torch.equal(tok[0, :6], tok[1, :6])


def test_gradients_reach_only_the_parts_that_train(tmp_path):
    for reading in ("default", "classifier", "concat", "patches"):
        model, cfg = _build(tmp_path, READINGS[reading])
        method = get_method("mmcst")
        model.train()
        batch = {"image": _images(4), "labels": torch.tensor([[1., 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])}
        terms = method.loss(method.forward(model, batch, None, cfg), batch, None, cfg)
        assert set(terms) == {"cls", "text", "patch"}
        sum(terms.values()).backward()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert model.text_embeddings.grad is None and not model.text_embeddings.requires_grad
        if reading != "patches":  # image_context=clip: the CLIP image tower is frozen
            assert {n for n in frozen if n.startswith("clip_visual.")} == \
                {f"clip_visual.{n}" for n, _ in model.clip_visual.named_parameters()}
            assert all(p.grad is None for p in model.clip_visual.parameters())
        else:
            assert model.clip_visual is None
        assert frozen - {n for n in frozen if n.startswith("clip_visual.")} == {"norm.weight", "norm.bias"}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == [], (reading, missing)
        assert "text_proj.weight" in trainable and "cls_tokens" in trainable and "head.weight" in trainable
        groups = method.param_groups(model, cfg)
        in_groups = {id(p) for g in groups for p in g["params"]}
        assert in_groups == {id(p) for p in trainable.values()}


def test_text_center_subtracts_the_class_mean_of_the_prompt_embeddings(tmp_path):
    """mmcst.text_center (off in the paper preset): the C embeddings minus their mean, L2-normalised;
    a hand-made case and the random tower's (whose prompts are nearly one vector) against numpy."""
    from tokenseg.methods.mmcst.model import center_embeddings

    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    mean = e.mean(0)
    expect = (e - mean) / (e - mean).norm(dim=-1, keepdim=True)
    assert torch.allclose(center_embeddings(e), expect, atol=1e-6)
    assert torch.allclose(center_embeddings(e[:1]), e[:1])  # one class: nothing to centre on
    plain, _ = _build(tmp_path)
    assert not load_config("mmcst").mmcst.text_center
    centred, _ = _build(tmp_path, ["mmcst.text_center=true"])
    raw = plain.text_embeddings.numpy().astype(np.float64)
    ref = raw - raw.mean(0)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(centred.text_embeddings.numpy(), ref, atol=1e-5)
    off_diag = ~np.eye(3, dtype=bool)
    assert (raw @ raw.T)[off_diag].min() > 0.8  # the random tower: C near-copies of one token
    assert (ref @ ref.T)[off_diag].max() < 0.5


def test_cct_weight_adds_mctformer_plus_cct_on_each_token_group(tmp_path):
    """mmcst.cct_weight > 0 (0 in the paper preset: no term, no layer tokens kept): the terms equal
    core.losses' CCT on the visual and on the textual tokens of every layer, computed from a hooked forward."""
    from tokenseg.core.losses import contrastive_class_token_loss

    method = get_method("mmcst")
    batch = {"image": _images(4), "labels": torch.tensor([[1., 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])}
    model, cfg = _build(tmp_path)
    assert load_config("mmcst").mmcst.cct_weight == 0.0
    out = method.forward(model.train(), batch, None, cfg)
    assert "layer_cls_tokens" not in out and set(method.loss(out, batch, None, cfg)) == {"cls", "text", "patch"}
    model, cfg = _build(tmp_path, ["mmcst.cct_weight=0.5"])
    seen = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda mod, args, res: seen.append(res[:, :6].detach()))
    model.eval()
    terms = method.loss(method.forward(model, batch, None, cfg), batch, None, cfg)
    y = batch["labels"]
    assert len(seen) == len(model.blocks)
    assert torch.allclose(terms["cct"], 0.5 * contrastive_class_token_loss([t[:, :3] for t in seen], y), atol=1e-6)
    assert torch.allclose(terms["cct_text"], 0.5 * contrastive_class_token_loss([t[:, 3:] for t in seen], y),
                          atol=1e-6)
    model, cfg = _build(tmp_path, ["mmcst.cct_weight=0.5", "mmcst.text_tokens=classifier"])
    terms = method.loss(method.forward(model, batch, None, cfg), batch, None, cfg)
    assert "cct" in terms and "cct_text" not in terms  # no textual tokens in the sequence
    with pytest.raises(TokensegError, match="mmcst.cct_weight"):
        _cfg(tmp_path, ["mmcst.cct_weight=-1"])


def test_a_few_steps_lower_the_loss(tmp_path):
    from tokenseg.engine import build_optimizer

    model, cfg = _build(tmp_path, ["train.lr=5e-3", "train.lr_base_batch=8", "train.warmup_epochs=0",
                                   "train.lr_schedule=step"])
    method = get_method("mmcst")
    opt, lr = build_optimizer(method, model, cfg, steps_per_epoch=12, total_steps=12)
    batch = {"image": _images(8, seed=3), "labels": (torch.rand(8, 3, generator=torch.Generator().manual_seed(1))
                                                     > 0.5).float()}
    model.train()
    history = []
    for step in range(12):
        for g in opt.param_groups:
            g["lr"] = lr(step, 0)
        terms = method.loss(method.forward(model, batch, None, cfg), batch, None, cfg)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.75 * sum(first.values()), history
    assert all(last[k] < first[k] for k in ("cls", "text", "patch")), history


def _reference_maps(model, x, last_k):
    """Brute force: every block by hand with the full (B, H, N, N) attention materialised."""
    with torch.no_grad():
        tokens, grid, txt = model.embed_all(x)
        C, P, L = model.num_classes, model.num_prefix, len(model.blocks)
        rows, aff = 0, 0
        for li, blk in enumerate(model.blocks):
            a = blk.attn
            h = blk.norm1(tokens)
            B, N, D = h.shape
            q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            probs = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)
            tokens = tokens + a.proj((probs @ v).transpose(1, 2).reshape(B, N, D))
            tokens = tokens + blk.mlp(blk.norm2(tokens))
            mean = probs.mean(1)
            aff = aff + mean[:, P:, P:]
            if li >= L - last_k:
                rows = rows + mean[:, :P, P:] / last_k
        vis = rows[:, :C]
        if model.text_tokens == "tokens":
            text = rows[:, C:2 * C]
        else:
            text = (txt @ tokens[:, P:].transpose(1, 2) / model.embed_dim ** 0.5).softmax(-1)
        att = {"both": (vis + text) / 2, "visual": vis, "textual": text}[model.map_groups]
        pat = tokens[:, P:].transpose(1, 2).reshape(B, D, *grid)
        pc = F.relu(model.head(pat)).flatten(2)
        fused = (att * pc).sqrt()
        return {"attention": att, "patchcam": pc, "fused": fused, "attention_affinity": att @ aff.transpose(1, 2),
                "fused_affinity": fused @ aff.transpose(1, 2)}


@pytest.mark.parametrize("reading", sorted(READINGS))
def test_maps_of_every_reading_match_an_explicit_attention_reference(tmp_path, reading):
    model, cfg = _build(tmp_path, READINGS[reading])
    model.eval()
    x = _images(2, size=40)  # another grid than training: interpolated patch positions
    labels = torch.tensor([[1., 0, 1], [0, 1, 1]])
    classes = torch.tensor([0, 1, 2])
    kinds = ["attention", "attention_affinity", "patchcam", "fused", "fused_affinity"]
    combine = get_method("mmcst").recipe.combine
    got = combine(model, x, labels, classes, cfg, kinds)
    ref = _reference_maps(model, x, cfg.maps.layers)
    for k in kinds:
        assert got[k].shape == (2, 3, 5, 5)
        assert torch.allclose(got[k].flatten(2), ref[k], rtol=1e-4, atol=1e-6), (reading, k)
    if reading == "default":  # the average over the two groups really differs from the visual group alone
        # mmcst.map_groups is read at maps time, from the command's config (not the checkpoint's)
        vis_cfg = _cfg(tmp_path, READINGS["visual-only-maps"])
        v = combine(model, x, labels, classes, vis_cfg, ["attention"])["attention"]
        assert (v - got["attention"]).abs().max() > 1e-4
        assert torch.allclose(v.flatten(2), _reference_maps(model, x, cfg.maps.layers)["attention"], atol=1e-6)


def test_concat_reading_starts_as_the_sum(tmp_path):
    add, _ = _build(tmp_path)
    cat, _ = _build(tmp_path, READINGS["concat"])
    missing, unexpected = cat.load_state_dict(add.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["txt_fuse.bias", "txt_fuse.weight", "vis_fuse.bias",
                                                  "vis_fuse.weight"]
    add.eval(), cat.eval()
    x = _images(2)
    with torch.no_grad():
        t_add, t_cat = add.embed_all(x)[0], cat.embed_all(x)[0]
        assert torch.allclose(t_add, t_cat, atol=1e-6)
        ctx = cat.context_proj(cat.image_embedding(x))[:, None]  # the image-language context (B, 1, D)
        cat.txt_fuse.weight[:, 32:].mul_(3.0)  # the context half of the concatenation: now 3x the context
        t3 = cat.embed_all(x)[0]
    assert torch.allclose(t3[:, 3:6] - t_add[:, 3:6], 2 * ctx.expand(-1, 3, -1), atol=1e-6)
    assert torch.equal(t3[:, :3], t_cat[:, :3]) and torch.equal(t3[:, 6:], t_cat[:, 6:])


def test_dino_layout_backbone_weights_load(tmp_path):
    """model.pretrained=<file in DINO's layout> (no head, plain keys) loads through the MMCST build."""
    import timm

    kw = {"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    sd = {k: v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "dino_tiny.pth")
    model, _ = _build(tmp_path, [f"model.pretrained={tmp_path / 'dino_tiny.pth'}", "model.stem=patch"])
    assert torch.equal(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(model.cls_tokens[0, 2], src.cls_token[0, 0])  # the papers' copy, C times
    # the preset's ViT-B/16 has exactly DINO's ViT-B/16 key layout (dino_vitbase16_pretrain.pth)
    with torch.device("meta"):
        vitb = timm.create_model("vit_base_patch16_224", num_classes=0)
    dino = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
            "patch_embed.proj.bias": (768,), "norm.weight": (768,), "norm.bias": (768,)}
    for i in range(12):
        for name, shape in (("norm1", (768,)), ("attn.qkv", (2304, 768)), ("attn.proj", (768, 768)),
                            ("norm2", (768,)), ("mlp.fc1", (3072, 768)), ("mlp.fc2", (768, 3072))):
            dino[f"blocks.{i}.{name}.weight"] = shape
            dino[f"blocks.{i}.{name}.bias"] = (shape[0],)
    assert {k: tuple(v.shape) for k, v in vitb.state_dict().items()} == dino
    cfg = load_config("mmcst")
    assert cfg.model.backbone == "vit_base_patch16_224" and cfg.train.keep_best and cfg.maps.layers == 6


def _tiny_clip_file(tmp_path):
    """A tiny CLIP checkpoint file with its own open_clip config name (what a real ViT-B-16.pt is to ViT-B-16)."""
    (tmp_path / "oc").mkdir(exist_ok=True)
    (tmp_path / "oc" / "tokenseg-test-tiny.json").write_text(json.dumps(
        {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
         "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}))
    open_clip.add_model_config(tmp_path / "oc")
    torch.manual_seed(5)
    m = open_clip.create_model("tokenseg-test-tiny", pretrained=None, force_quick_gelu=True)
    torch.save(m.state_dict(), tmp_path / "tiny_clip.pt")
    return tmp_path / "tiny_clip.pt"


def test_checkpoint_rebuilds_and_gives_the_same_maps_without_the_clip_file(tmp_path, capsys):
    clip_file = _tiny_clip_file(tmp_path)
    over = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", f"mmcst.clip={clip_file}",
            "mmcst.clip_arch=tokenseg-test-tiny", "mmcst.text_dim=48", "train.epochs=1", "train.batch_size=8",
            "train.keep_best=true", "maps.scales=[1.0]"]
    assert main(["train", "tiny", *over, "--quiet"]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").is_file() and (run / "checkpoint_best.pt").is_file()
    state = torch.load(run / "checkpoint_best.pt", weights_only=False)
    assert "val_map" in state and state["model"]["text_embeddings"].shape == (3, 48)
    # the CLIP file's outputs, filled in at the first step (the build deferred them): its text embeddings of
    # the prompts and its image tower, untouched by training
    ref = open_clip.create_model("tokenseg-test-tiny", pretrained=None, force_quick_gelu=True).eval()
    ref.load_state_dict(torch.load(clip_file, weights_only=True))
    prompts = ["a photo of a disc.", "a photo of a block.", "a photo of a wedge."]
    with torch.no_grad():
        expect = F.normalize(ref.encode_text(open_clip.tokenizer.SimpleTokenizer(context_length=24)(prompts)), dim=-1)
    assert torch.allclose(state["model"]["text_embeddings"], expect, atol=1e-5)
    for k, v in ref.visual.state_dict().items():
        assert torch.equal(state["model"][f"clip_visual.{k}"], v), k
    assert main(["maps", "tiny", *over, "--checkpoint", str(run / "checkpoint_best.pt"), "--quiet"]) == 0
    clip_file.unlink()  # the CLIP file is gone: the checkpoint alone must rebuild the model
    assert main(["maps", "tiny", *over, "--checkpoint", str(run / "checkpoint_best.pt"), "--split", "val",
                 "--out", str(tmp_path / "again"), "--quiet"]) == 0
    first = sorted((run / "seeds" / "val" / "fused_affinity").glob("*.npz"))
    assert len(first) == 16
    for f in first:
        a, b = load_seed(f), load_seed(tmp_path / "again" / "fused_affinity" / f.name)
        assert np.array_equal(a.classes, b.classes) and np.array_equal(a.maps, b.maps)
    capsys.readouterr()
    assert main(["evaluate", "tiny", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    miou = json.loads((tmp_path / "e.json").read_text())["fused_affinity"]["miou"]
    floor = background_only_miou(build_dataset(load_config("tiny", over).data, "val"))
    assert floor < miou <= 100, (miou, floor)
    # training without the file stops with a message naming the key
    code = main(["train", "tiny", *[o for o in over if not o.startswith("output_dir")],
                 f"output_dir={tmp_path / 'run2'}", "--quiet"])
    assert code != 0 and "mmcst.clip" in capsys.readouterr().err


def test_bad_settings_name_their_key(tmp_path):
    with pytest.raises(TokensegError, match="mmcst.text_tokens"):
        _cfg(tmp_path, ["mmcst.text_tokens=both"])
    with pytest.raises(TokensegError, match="mmcst.clip"):
        _cfg(tmp_path, ["mmcst.clip="])
    with pytest.raises(TokensegError, match="mmcst.prompt"):
        _cfg(tmp_path, ["mmcst.prompt=a photo"])
    from tokenseg.methods.mmcst.model import load_text_side

    clip_file = _tiny_clip_file(tmp_path)
    cfg = _cfg(tmp_path, [f"mmcst.clip={clip_file}", "mmcst.clip_arch=tokenseg-test-tiny"])
    with pytest.raises(TokensegError, match="set mmcst.text_dim=48"):
        load_text_side(cfg.mmcst, lambda: ["a", "b", "c"], 3, tmp_path, rebuilding=False)
    cfg = _cfg(tmp_path, ["mmcst.clip=/nonexistent/ViT-B-16.pt"])
    with pytest.raises(TokensegError, match="mmcst.clip: CLIP weights file /nonexistent/ViT-B-16.pt not found"):
        load_text_side(cfg.mmcst, lambda: ["a", "b", "c"], 3, tmp_path, rebuilding=False)


def test_demo_preset_needs_no_file_and_keeps_the_best_checkpoint(tmp_path):
    from tokenseg.pipeline import demo_preset

    assert demo_preset("mmcst") == "demo-mmcst"
    cfg = load_config("demo-mmcst", [f"data.cache_dir={tmp_path / 'cache'}", "mmcst.class_names=[a, b, c, d, e]"])
    assert cfg.mmcst.clip == "random" and cfg.train.keep_best and cfg.maps.kinds[-1] == "fused_affinity"
    # issue 31: only the demo recipe leaves the paper (no visual context, centred prompts, CCT)
    paper = load_config("mmcst").mmcst
    assert (paper.visual_context, paper.text_center, paper.cct_weight) == (True, False, 0.0)
    assert (cfg.mmcst.visual_context, cfg.mmcst.text_center, cfg.mmcst.cct_weight) == (False, True, 1.0)
    model = get_method("mmcst").build(cfg, 5)
    assert not model._text_pending and model.num_prefix == 10 and model.text_embeddings.shape == (5, 64)
    assert model.prompts[0] == "a photo of a a."
