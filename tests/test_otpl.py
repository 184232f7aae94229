"""OTPL (METHODS.md §12): the proxy pieces against direct formulas, the composition on MCTformer+ through
the registry, the CLIP-ES variant with co-augmented seeds, training, resume and the CLI chain.
(Sinkhorn and top-K themselves are tested against POT / by hand in tests/test_ot.py.)"""
import json
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import build_dataset
from tokenseg.engine import train
from tokenseg.core.seeds import SeedMaps, load_seed, save_seed, seed_path
from tokenseg.core.errors import TokensegError
from tokenseg.methods import get_method
from tokenseg.methods.otpl import OTPLConfig, SeedCropView, fuse, otpl_terms
from tokenseg.methods.otpl.proxies import (Assignment, ProxyConv, assign, classifier_cam, make_proxies, positives,
                                          proxy_patch_contrastive)

from floors import background_only_miou

TINY = ["model.method=otpl", "maps.kinds=[fused, proxy, otpl, otpl_affinity]", "train.eval_every=0"]
CLIP_MODEL = ["model.method=otpl-clip-es", "maps.kinds=[proxy]", "train.eval_every=0", "train.augment=simple",
              "model.backbone=vit_tiny_patch16_224", "model.stem=conv",
              "model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]


# ------------------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("kernel", [1, 3])
def test_proxy_conv_starts_as_the_class_token(kernel):
    g = torch.Generator().manual_seed(0)
    q, h = torch.randn(2, 4, 16, generator=g), torch.randn(2, 4, 5, 16, generator=g)
    conv = ProxyConv(5, kernel)
    assert torch.equal(conv(q, h), q)
    with torch.no_grad():
        conv.conv.weight.normal_(generator=g)
        conv.conv.bias.fill_(0.3)
    w, b = conv.conv.weight[0], 0.3  # (K+1, kernel): Conv1d over the stacked tokens, along D
    x = torch.cat([q[:, :, None], h], 2)
    pad = F.pad(x, (kernel // 2, kernel // 2))
    ref = sum(w[k, t] * pad[..., k, t:t + 16] for k in range(6) for t in range(kernel)) + b
    assert torch.allclose(conv(q, h), ref, atol=1e-5)


def _loop_ppc(P, Fe, pos, tau, reduce):
    """Eq. 19 written out: per image, per column with positives, −mean_{i∈R+} log softmax_i."""
    per_image = []
    for b in range(P.shape[0]):
        terms = []
        for c in range(P.shape[1]):
            idx = [i for i in range(Fe.shape[1]) if pos[b, c, i]]
            if not idx:
                continue
            s = torch.stack([F.cosine_similarity(P[b, c], Fe[b, i], dim=0) for i in range(Fe.shape[1])]) / tau
            logp = s - torch.logsumexp(s, 0)
            terms.append(-torch.stack([logp[i] for i in idx]).mean())
        if terms:
            per_image.append(sum(terms) if reduce == "sum" else sum(terms) / len(terms))
    return sum(per_image) / len(per_image) if per_image else torch.tensor(0.0)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_contrastive_loss_equals_a_direct_per_class_loop(reduce):
    g = torch.Generator().manual_seed(1)
    P, Fe = torch.randn(3, 4, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    pos = torch.rand(3, 4, 10, generator=g) < 0.3
    pos[1] = False  # an image without positives does not count
    pos[0, 2] = False  # a column without positives does not count
    got = proxy_patch_contrastive(P, Fe, pos, tau=0.1, reduce=reduce)
    assert torch.allclose(got, _loop_ppc(P, Fe, pos, 0.1, reduce), atol=1e-5)
    assert proxy_patch_contrastive(P, Fe, torch.zeros_like(pos)) == 0


def test_positives_are_where_the_cam_and_the_plan_agree():
    cam_arg = torch.tensor([[0, 1, 1, 2, 2, 1]])
    plan_arg = torch.tensor([[0, 1, 2, 2, 2, 1]])
    asg = Assignment(None, None, None, plan_arg, cam_arg)
    cols = torch.tensor([[False, True, True]])  # background column out of the loss
    pos = positives(asg, cols)
    assert pos[0, 0].tolist() == [False] * 6
    assert pos[0, 1].tolist() == [False, True, False, False, False, True]
    assert pos[0, 2].tolist() == [False, False, False, True, True, False]


def test_cam_marginal_and_top_k_features_from_the_plan():
    """Columns carry the CAM's mass (Eq. 4 reading), absent classes none; H_c = the top-K rows of the
    plan's column c (checked with a proxy conv that keeps only the first selected feature)."""
    g = torch.Generator().manual_seed(2)
    B, M, C, D = 2, 30, 3, 8
    feats, protos = torch.randn(B, M, D, generator=g), torch.randn(B, C + 1, D, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    cam = classifier_cam(torch.randn(B, C, M, generator=g), labels)
    cols = torch.cat([torch.ones(B, 1, dtype=torch.bool), labels > 0], 1)
    asg = assign(feats, protos, cam, cols, cam.argmax(1), top_k=4, iters=2000)
    mass = (cam * cols[..., None]).sum(-1)
    assert torch.allclose(asg.plan.sum(1), mass / mass.sum(-1, keepdim=True), atol=1e-5)
    assert torch.allclose(asg.plan.sum(2), torch.full((B, M), 1 / M), atol=1e-5)
    assert asg.plan.transpose(1, 2)[~cols].abs().max() == 0
    settings = OTPLConfig(top_k=4, sinkhorn_iters=2000)
    conv = ProxyConv(4)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 1, 0] = 1.0  # P_c = the top plan row of column c
    out = make_proxies(conv, settings, feats, protos, cam, cols, cam.argmax(1))
    for b in range(B):
        for j in range(C + 1):
            if cols[b, j]:
                top = int(asg.plan[b, :, j].argmax())
                assert torch.allclose(out["otpl_proxies"][b, j], feats[b, top], atol=1e-6)


def test_fewer_patches_than_k_leave_the_extra_slots_unused():
    feats, protos = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    cam = torch.tensor([[[0.2, 0.5, 0.1], [1.0, 0.0, 0.4]]])
    cols = torch.tensor([[True, True]])
    asg = assign(feats, protos, cam, cols, cam.argmax(1), top_k=5)
    assert asg.idx.shape == (1, 2, 5) and asg.ok[0].tolist() == [[True] * 3 + [False] * 2] * 2
    assert sorted(asg.idx[0, 0, :3].tolist()) == [0, 1, 2]
    none = assign(feats, protos, torch.zeros_like(cam), cols, cam.argmax(1), top_k=2)
    assert not none.ok.any()  # columns without CAM mass select no patch


def test_background_token_layout_of_a_cti_style_base():
    """A base with C + 1 prefix tokens (background first, CTI's layout) and a (C + 1)-channel CAM: the
    background prototype is its token, the classes are tokens 1..C."""
    from tokenseg.methods.otpl.model import OTPLModel

    C, M, D = 3, 16, 8

    def fake_base(prefix):
        m = nn.Module()
        m.num_prefix, m.patch_size = prefix, 8
        return m

    model = OTPLModel(fake_base(C + 1), "fake", None, C, OTPLConfig(background="auto"))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, C + 1 + M, D, generator=g)
    out = {"tokens": tokens, "grid": (4, 4), "patch_map": torch.randn(2, C + 1, 4, 4, generator=g)}
    prox = model.proxy_outputs(out, torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert torch.equal(prox["otpl_proxies"], tokens[:, :C + 1])  # identity init: P = Q, background first
    assert torch.equal(prox["otpl_features"], tokens[:, C + 1:])
    assert prox["otpl_cols"].tolist() == [[False, True, False, True], [False, False, True, False]]  # L_ppc columns
    with pytest.raises(TokensegError, match="background token"):
        OTPLModel(fake_base(C), "fake", None, C, OTPLConfig(background="token")).proxy_outputs(
            {"tokens": tokens[:, 1:], "grid": (4, 4), "patch_map": out["patch_map"][:, 1:]}, torch.ones(2, C))


def test_pooled_prototypes_are_masked_averages_under_the_cam_argmax():
    """otpl.prototypes=pooled (Eq. 13 on a class-token base): with the identity conv, each proxy is the mean
    patch feature where the labelled CAM's argmax (background 1 − max) is that column; a class with no such
    patch keeps its class token; the background column is the pooled background (``auto``)."""
    from tokenseg.methods.otpl.model import OTPLModel

    C, M, D = 3, 16, 8
    base = nn.Module()
    base.num_prefix, base.patch_size = C, 8
    model = OTPLModel(base, "fake", None, C, OTPLConfig(prototypes="pooled"))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, C + M, D, generator=g)
    cam = torch.randn(2, C, 4, 4, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    prox = model.proxy_outputs({"tokens": tokens, "grid": (4, 4), "patch_map": cam}, labels)["otpl_proxies"]
    feats = tokens[:, C:]
    for b in range(2):
        m = cam[b].flatten(1).relu()
        m = m / (m.amax(1, keepdim=True) + 1e-5) * labels[b][:, None]
        scores = torch.cat([(1 - m.amax(0, keepdim=True)).clamp_min(0), m])
        scores[1:][labels[b] == 0] = float("-inf")
        arg = scores.argmax(0)
        for j in range(C + 1):
            sel = arg == j
            want = feats[b][sel].mean(0) if sel.any() else tokens[b, j - 1]
            torch.testing.assert_close(prox[b, j], want, atol=1e-5, rtol=0)
    assert not torch.equal(prox[:, 1:], tokens[:, :C])  # not the class tokens (the default)


def test_pooled_prototypes_detached_keep_the_proxy_losses_out_of_the_patch_features():
    """The from-scratch demo's combination (pooled prototypes, detach_prototypes, detach_selected,
    ppc_features=detach): L_ppc and L_p.cls train the proxy conv but send no gradient into the patch tokens."""
    from tokenseg.methods.otpl.model import OTPLModel

    C, M, D = 3, 16, 8
    base = nn.Module()
    base.num_prefix, base.patch_size = C, 8
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    for detach, reaches in ((True, False), (False, True)):
        o = OTPLConfig(prototypes="pooled", detach_prototypes=detach, detach_selected=detach, ppc_features="detach")
        model = OTPLModel(base, "fake", None, C, o)
        g = torch.Generator().manual_seed(6)
        tokens = torch.randn(2, C + M, D, generator=g).requires_grad_(True)
        out = {"tokens": tokens, "grid": (4, 4), "patch_map": torch.randn(2, C, 4, 4, generator=g)}
        out.update(model.proxy_outputs(out, labels))
        terms = otpl_terms(out, labels, o)
        gt, gw = torch.autograd.grad(terms["otpl_pcls"] + terms["otpl_ppc"], [tokens, model.proxy.conv.weight])
        assert (gt[:, C:].abs().sum() > 0) == reaches, detach
        assert gw.abs().sum() > 0


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on every op that reads a tensor's value back to the host."""

    BAD = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero", "aten::unique",
           "aten::_unique2", "aten::masked_select", "aten::equal")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.BAD:
            raise AssertionError(f"host sync: {func._schema.name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("background", ["pooled", "none"])
def test_the_otpl_step_has_no_host_device_round_trip(tmp_path, background):
    cfg = load_config("tiny", TINY + [f"otpl.background={background}", f"output_dir={tmp_path}"])
    model = get_method("otpl").build(cfg, 3)
    x = torch.randn(4, 3, 48, 48)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]])
    base_out = model.base(x)
    with _NoHostSync():
        out = {**base_out, **model.proxy_outputs(base_out, labels)}
        terms = otpl_terms(out, labels, cfg.otpl)
        sum(v for k, v in terms.items() if not k.startswith("_")).backward()
    assert model.proxy.conv.weight.grad is not None
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        torch.tensor([1.0]).item()  # the guard itself works


def test_label_free_columns_keep_the_labels_out_of_the_proxies(tmp_path):
    """otpl.columns=all: the proxies (hence L_p.cls) do not depend on the image's labels; with
    otpl.columns=present (the spec's reading) they do, through which OT columns exist."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    a, b = torch.tensor([[1.0, 0, 0], [0, 1, 1]]), torch.tensor([[0.0, 1, 0], [1, 0, 1]])
    for columns, same in (("all", True), ("present", False)):
        cfg = load_config("tiny", TINY + [f"otpl.columns={columns}", f"output_dir={tmp_path}"])
        model = get_method("otpl").build(cfg, 3).eval()
        with torch.no_grad():
            nn.init.normal_(model.proxy.conv.weight)  # not the identity: H matters
            out = model.base(x)
            pa, pb = (model.proxy_outputs(out, y)["otpl_proxies"] for y in (a, b))
        assert torch.equal(pa, pb) == same, columns


def test_fusion_formulas():
    a = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]])
    p = torch.tensor([[[[1.0, 0.25], [1.0, 1.0]]]])
    an = a / (4 + 1e-5)
    assert torch.allclose(fuse(a, p, "geometric"), (an * p).sqrt())
    assert torch.allclose(fuse(a, p, "arithmetic"), (an + p) / 2)
    assert torch.allclose(fuse(a, p, "product", normalise=False), a * p)
    assert torch.allclose(fuse(a, p, "max"), torch.maximum(an, p))


# ------------------------------------------------------------------------------------------ the composition
def test_maps_fuse_the_proxy_cam_with_the_base_map_before_the_affinity(tmp_path):
    """Untrained model (proxy = class token): ``proxy`` = ReLU(cos(patch, class token)) max-normalised,
    ``otpl`` = sqrt(max-normalised fused · proxy), ``otpl_affinity`` = affinity @ otpl, ``fused`` = the
    base's own map; all from one recipe call."""
    cfg = load_config("tiny", TINY + [f"output_dir={tmp_path}"])
    model = get_method("otpl").build(cfg, 3).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    classes = torch.tensor([0, 1, 2])
    kinds = ["fused", "proxy", "otpl", "otpl_affinity"]
    with torch.no_grad():
        got = get_method("otpl").recipe.combine(model, x, labels, classes, cfg, kinds)
        base = get_method("mctformer-plus").recipe.combine(model.base, x, labels, classes,
                                                           load_config("tiny", [f"output_dir={tmp_path}"]), ["fused"])
        tokens = model.base(x)["tokens"]
        aff = model.base.forward_maps(x, last_k=cfg.maps.layers, affinity=True).affinity
    cos = F.cosine_similarity(tokens[:, 3:, None], tokens[:, None, :3], dim=-1).relu().transpose(1, 2)
    proxy = (cos / (cos.amax(-1, keepdim=True) + 1e-5)).view(2, 3, 6, 6)
    assert torch.allclose(got["fused"], base["fused"], atol=1e-6, rtol=1e-4)  # explicit vs fused attention
    assert torch.allclose(got["proxy"], proxy, atol=1e-5)
    fused_n = base["fused"] / (base["fused"].flatten(2).amax(-1)[..., None, None] + 1e-5)
    assert torch.allclose(got["otpl"], (fused_n * proxy).sqrt(), atol=1e-5)
    ref = (got["otpl"].flatten(2) @ aff.transpose(1, 2)).view(2, 3, 6, 6)
    assert torch.allclose(got["otpl_affinity"], ref, atol=1e-5)


def test_a_training_setting_given_at_map_time_is_named_not_silently_ignored(tmp_path):
    """The map step rebuilds the proxies from the checkpoint's otpl settings: a different training key at
    map time (otpl.prototypes) gets one warning naming it; the map-time keys (otpl.fusion) do not."""
    import warnings

    cfg = load_config("tiny", TINY + [f"output_dir={tmp_path}"])
    model = get_method("otpl").build(cfg, 3).eval()
    x, labels, classes = torch.randn(1, 3, 48, 48), torch.tensor([[1.0, 0, 1]]), torch.tensor([0, 1, 2])
    combine = get_method("otpl").recipe.combine
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        combine(model, x, labels, classes, cfg, ["otpl"])  # the checkpoint's own settings
        combine(model, x, labels, classes, load_config("tiny", TINY + ["otpl.fusion=max"]), ["otpl"])
        assert not [w for w in caught if "otpl." in str(w.message)]
        combine(model, x, labels, classes, load_config("tiny", TINY + ["otpl.prototypes=pooled"]), ["otpl"])
    said = [str(w.message) for w in caught if "otpl.prototypes" in str(w.message)]
    assert len(said) == 1 and "'pooled' (checkpoint: 'tokens')" in said[0] and "otpl.fusion" in said[0]


def test_first_step_proxies_are_the_class_tokens_and_pcls_equals_the_class_token_loss(tmp_path):
    cfg = load_config("tiny", TINY + [f"output_dir={tmp_path}"])
    method = get_method("otpl")
    model = method.build(cfg, 3)
    torch.manual_seed(0)
    batch = {"image": torch.randn(4, 3, 48, 48), "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 1, 1],
                                                                         [0, 0, 1]])}
    out = method.forward(model, batch, None, cfg)
    assert torch.equal(out["otpl_proxies"][:, 1:], out["tokens"][:, :3])
    terms = method.loss(out, batch, None, cfg)
    assert {"cls", "patch", "cct", "otpl_pcls", "otpl_ppc"} <= set(terms)
    assert torch.allclose(terms["otpl_pcls"], terms["cls"])
    assert terms["otpl_ppc"] > 0


# ------------------------------------------------------------------------------------------ CLIP-ES variant
def _fake_clip_seeds(cfg, folder, background=False, split=None):
    """Seeds shaped like CLIP-ES's: blurred ground-truth masks of the labelled classes, max 1."""
    from scipy.ndimage import uniform_filter

    ds = build_dataset(cfg.data, split or cfg.data.train_split)
    for i in range(len(ds)):
        m = ds.load_mask(i)
        classes = np.asarray(ds.labels[i], np.int64)
        maps = np.stack([uniform_filter((m == c + 1).astype(np.float32), 7) for c in classes]) if len(classes) \
            else np.zeros((0,) + m.shape, np.float32)
        maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-6)
        bg = np.clip(1 - maps.max(0), 0, 1) if background and len(classes) else None
        save_seed(seed_path(folder, ds.ids[i]), SeedMaps(classes, maps, {}, bg), "float32")
    return ds


def test_seed_crop_view_applies_the_crop_and_flip_to_the_seeds():
    """A seed map equal to the image's red channel stays equal to it (downsampled) after the view."""
    yy, xx = np.mgrid[0:64, 0:80]
    red = (127 + 120 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    img = Image.fromarray(np.stack([red, np.full_like(red, 50), np.full_like(red, 200)], -1))
    seed = red.astype(np.float32) / 255
    extras = {"clip_maps": seed[None], "clip_classes": np.array([2]), "clip_bg": 1 - seed,
              "clip_num_classes": np.asarray(4)}
    view = SeedCropView(32, (0.3, 1.0), 4, mean=(0, 0, 0), std=(1, 1, 1))
    flips = set()
    for s in range(8):
        torch.manual_seed(s)
        x, out = view(img, extras)
        cam = out["clip_cam"]
        assert x.shape == (3, 32, 32) and cam.shape == (5, 8, 8)
        assert cam[[1, 2, 4]].abs().max() == 0  # classes without a seed stay 0
        assert torch.allclose(cam[0] + cam[3], torch.ones(8, 8), atol=1e-5)
        ref = F.interpolate(x[None, :1], size=(8, 8), mode="bilinear", antialias=True, align_corners=False)[0, 0]
        assert (cam[3] - ref).abs().max() < 0.04
        flips.add(bool((cam[3] - ref.flip(-1)).abs().max() < (cam[3] - ref).abs().max()))
    assert flips == {False}  # never matched better mirrored: image and seeds flipped together


def test_clip_variant_prototypes_are_masked_averages_of_the_encoder_features(tmp_path):
    cfg = load_config("tiny", CLIP_MODEL + [f"output_dir={tmp_path}"])
    model = get_method("otpl-clip-es").build(cfg, 3)
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 36, 32, generator=g)
    cam = torch.rand(2, 4, 36, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    prox = model.proxy_outputs(feats, cam, labels, update_memory=True)
    mask = torch.cat([torch.ones(2, 1), labels], 1).bool()
    arg = cam.masked_fill(~mask[..., None], -1).argmax(1)
    for b in range(2):
        for j in range(4):
            sel = arg[b] == j
            if mask[b, j] and sel.any():
                assert torch.allclose(prox["otpl_proxies"][b, j], feats[b, sel].mean(0), atol=1e-5)
            else:
                assert not prox["otpl_cols"][b, j]
    valid = [[bool(mask[b, j] and (arg[b] == j).any()) for j in range(4)] for b in range(2)]
    filled = [valid[0][j] or valid[1][j] for j in range(4)]
    assert model.memory_filled.tolist() == filled
    for j in range(4):  # first update: the batch mean of the images' prototypes (no EMA yet)
        if filled[j]:
            ref = torch.stack([feats[b, arg[b] == j].mean(0) for b in range(2) if valid[b][j]]).mean(0)
            assert torch.allclose(model.memory[j], ref, atol=1e-5)


# ------------------------------------------------------------------------------------------ training and CLI
def _losses(cfg):
    seen = []
    train(cfg, progress=False, on_step=lambda step, v: seen.append(v))
    return seen


@pytest.mark.parametrize("variant", ["otpl", "otpl-clip-es"])
def test_a_few_training_steps_lower_the_loss(tiny_overrides, tmp_path, variant):
    over = TINY if variant == "otpl" else CLIP_MODEL + [f"otpl.clip_seeds={tmp_path / 'clip'}"]
    cfg = load_config("tiny", tiny_overrides + over + ["train.epochs=4", "train.warmup_epochs=0",
                                                       "train.lr=2e-3"])
    if variant != "otpl":
        _fake_clip_seeds(cfg, tmp_path / "clip")
    seen = _losses(cfg)
    first, last = np.mean([v["total"] for v in seen[:6]]), np.mean([v["total"] for v in seen[-6:]])
    assert last < first, (first, last)
    ppc = [v["otpl_ppc"] for v in seen]
    assert np.mean(ppc[-6:]) < np.mean(ppc[:6])
    if variant != "otpl":
        # On MCTformer+ the proxies start as the class tokens, whose mean_D (the un-normalised residual
        # stream, as the authors) moves slowly from scratch: there L_p.cls tracks the base's L_cls, which
        # four tiny epochs do not move either; the encoder variant's prototypes learn at once.
        pcls = [v["otpl_pcls"] for v in seen]
        assert np.mean(pcls[-6:]) < np.mean(pcls[:6])
    assert all(np.isfinite(v["total"]) for v in seen)


@pytest.mark.parametrize("variant", ["otpl", "otpl-clip-es"])
def test_killed_and_resumed_run_gives_the_same_weights(tiny_overrides, tmp_path, variant):
    over = TINY if variant == "otpl" else CLIP_MODEL + [f"otpl.clip_seeds={tmp_path / 'clip'}"]
    common = tiny_overrides + over + ["train.epochs=2", "train.checkpoint_every=2", "model.drop_path=0.1"]
    a = load_config("tiny", common + [f"output_dir={tmp_path / 'a'}"])
    b = load_config("tiny", common + [f"output_dir={tmp_path / 'b'}"])
    if variant != "otpl":
        _fake_clip_seeds(a, tmp_path / "clip")
    train(a, progress=False)

    def kill(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, progress=False, on_step=kill)
    train(b, resume=True, progress=False)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 12
    assert any(k.startswith("proxy.") for k in sa["model"])
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_otpl_cli_train_maps_evaluate_pseudo(tiny_overrides, tmp_path, capsys):
    over = tiny_overrides + TINY + ["train.epochs=1", "otpl.top_k=3"]
    assert main(["train", "tiny", *over, "--quiet"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["model"]["method"] == "otpl" and state["config"]["otpl"]["top_k"] == 3
    assert state["model"]["proxy.conv.weight"].shape == (1, 4, 1)
    common = ["tiny", *tiny_overrides, *TINY, "--quiet"]
    assert main(["maps", *common, "--split", "val"]) == 0
    seed = load_seed(next((tmp_path / "run" / "seeds" / "val" / "otpl_affinity").glob("*.npz")))
    assert seed.maps.shape[1:] == (48, 48) and float(seed.maps.max()) == pytest.approx(1.0, abs=1e-3)
    capsys.readouterr()
    assert main(["evaluate", *common, "--json", str(tmp_path / "e.json")]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res) == {"fused", "proxy", "otpl", "otpl_affinity"}
    assert all(0 < r["miou"] <= 100 for r in res.values())
    floor = background_only_miou(build_dataset(load_config("tiny", over).data, "val"))
    assert res["otpl"]["miou"] > floor, ({k: r["miou"] for k, r in res.items()}, floor)
    assert main(["pseudo", *common, "pseudo.kind=otpl", "pseudo.split=val"]) == 0
    assert len(list((tmp_path / "run" / "pseudo").glob("*.png"))) == 16


def test_clip_variant_cli_chain(tiny_overrides, tmp_path, capsys):
    cfg = load_config("tiny", tiny_overrides)
    _fake_clip_seeds(cfg, tmp_path / "clip", background=True)
    over = ["tiny", *tiny_overrides, *CLIP_MODEL, f"otpl.clip_seeds={tmp_path / 'clip'}", "train.epochs=1", "--quiet"]
    assert main(["train", *over]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert bool(state["model"]["memory_filled"].all())
    _fake_clip_seeds(cfg, tmp_path / "clip", background=True, split="val")  # map time: the val images' seeds
    assert main(["maps", *over, "--split", "val"]) == 0
    assert main(["evaluate", *over, "--json", str(tmp_path / "e.json")]) == 0
    with_seeds = json.loads((tmp_path / "e.json").read_text())["proxy"]["miou"]
    assert 0 < with_seeds <= 100
    # without seeds at map time: the running-average prototypes, said in the log
    bare = [o for o in over if not o.startswith("otpl.clip_seeds")]
    capsys.readouterr()
    assert main(["maps", *bare, "otpl.clip_seeds=", "--split", "val", "--out", str(tmp_path / "mem")]) == 0
    assert "running average" in capsys.readouterr().out
    assert main(["evaluate", *bare, "--seeds", str(tmp_path / "mem" / "proxy"), "--split", "val",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["proxy"]["miou"] != with_seeds


def test_clip_variant_maps_use_the_training_prototypes_of_the_image_seeds(tiny_overrides):
    """At map time the proxy CAM of an image with seeds is the one its training forward makes from them
    (Eq. 13), not the memory's: the same proxies, so the same map."""
    from tokenseg.maps import compute_map_batch
    from tokenseg.methods.otpl.proxies import proxy_cam

    cfg = load_config("tiny", tiny_overrides + CLIP_MODEL + ["maps.scales=[1.0]", "maps.flip=false"])
    method = get_method("otpl-clip-es")
    torch.manual_seed(0)
    model = method.build(cfg, 3).eval()
    x = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    seeds = torch.rand(2, 4, 48, 48)
    with torch.no_grad():
        out = model({"image": x, "clip_cam": seeds, "labels": labels})
        expect = proxy_cam(out["otpl_proxies"][:, 1:], out["tokens"])
        mb = compute_map_batch(model, x, labels, cfg, ["proxy"], method.recipe, extras=seeds)
        free = compute_map_batch(model, x, labels, cfg, ["proxy"], method.recipe)
    pairs = torch.nonzero(labels > 0)
    raw = expect[pairs[:, 0], pairs[:, 1]].view(-1, 1, 6, 6)
    up = F.interpolate(raw, size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    up = up / (up.flatten(1).amax(1)[:, None, None] + 1e-5)  # the recipe's max normalisation
    torch.testing.assert_close(mb.maps["proxy"], up, atol=1e-5, rtol=0)
    assert not torch.allclose(free.maps["proxy"], up, atol=1e-3)


@pytest.mark.parametrize("over, match", [
    (["otpl.base=nope"], "otpl.base"),
    (["otpl.base=otpl"], "class-token base"),
    (["otpl.fuse_with=fused_affinity"], "otpl.fuse_with"),
    (["maps.kinds=[proxy, bogus]"], "bogus"),
    (["otpl.top_k=0"], "otpl.top_k"),
    (["otpl.fusion=median"], "otpl.fusion"),
    (["otpl.proxy_kernel=2"], "proxy_kernel"),
    (["otpl.prototypes=mean"], "otpl.prototypes"),
])
def test_bad_otpl_settings_name_the_key(over, match):
    with pytest.raises(TokensegError, match=match):
        load_config("tiny", TINY + over)


def test_clip_variant_map_time_training_setting_is_named(tiny_overrides):
    """As the class-token variant: the CLIP-ES variant's map step uses the checkpoint's otpl settings, so a
    different training key at map time (otpl.cam_bg_power) gets one warning naming it; its map-time keys
    (otpl.clip_seeds, otpl.clip_bg_power) do not."""
    import warnings

    cfg = load_config("tiny", tiny_overrides + CLIP_MODEL)
    method = get_method("otpl-clip-es")
    model = method.build(cfg, 3).eval()
    x, labels, classes = torch.randn(1, 3, 48, 48), torch.tensor([[1.0, 0, 1]]), torch.tensor([0, 2])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        method.recipe.combine(model, x, labels, classes, cfg, ["proxy"])
        other = load_config("tiny", tiny_overrides + CLIP_MODEL + ["otpl.clip_bg_power=2", "otpl.clip_seeds=x"])
        method.recipe.combine(model, x, labels, classes, other, ["proxy"])
        assert not [w for w in caught if "otpl." in str(w.message)]
        power = load_config("tiny", tiny_overrides + CLIP_MODEL + ["otpl.cam_bg_power=3"])
        method.recipe.combine(model, x, labels, classes, power, ["proxy"])
    said = [str(w.message) for w in caught if "otpl.cam_bg_power" in str(w.message)]
    assert len(said) == 1 and "otpl.cam_bg_power=3" in said[0] and "otpl.clip_seeds" in said[0]


def test_clip_variant_settings_and_missing_seeds(tiny_overrides, tmp_path, capsys):
    with pytest.raises(TokensegError, match="train.augment"):
        load_config("tiny", CLIP_MODEL + ["train.augment=deit"])
    with pytest.raises(TokensegError, match="maps.kinds"):
        load_config("tiny", CLIP_MODEL + ["maps.kinds=[otpl]"])
    assert main(["train", "tiny", *tiny_overrides, *CLIP_MODEL, "--quiet"]) == 2
    assert "otpl.clip_seeds" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "tiny", *tiny_overrides, *CLIP_MODEL, f"otpl.clip_seeds={tmp_path / 'empty'}",
                 "--quiet"]) == 2
    assert "no seed file for image" in capsys.readouterr().err


def test_otpl_on_cti_uses_its_background_token(tiny_overrides, tmp_path):
    """otpl.base=cti through the registry: CTI's C + 1 tokens (background first) give the OT its
    background column; its losses, views and maps are CTI's own."""
    from tokenseg.methods import available_methods

    if "cti" not in available_methods():
        pytest.skip("CTI is not registered")
    over = tiny_overrides + ["model.method=otpl", "otpl.base=cti", "cti.swap_layer=0", "cti.train_attn_layers=2",
                             "maps.kinds=[fused_affinity, proxy, otpl_affinity]", "train.max_steps=2",
                             "train.eval_every=0"]
    cfg = load_config("tiny", over)
    model = get_method("otpl").build(cfg, 3)
    assert model.base.num_prefix == 4 and set(get_method("otpl").views(cfg)) == {"image", "image_pos"}
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    out = model.base(x)
    prox = model.proxy_outputs(out, torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert torch.equal(prox["otpl_proxies"], out["tokens"][:, :4])  # identity init, background token first
    seen = _losses(cfg)
    assert {"cls", "bg", "otpl_pcls", "otpl_ppc"} <= set(seen[0])
    assert main(["maps", "tiny", *over, "--split", "val", "--quiet"]) == 0
    assert len(list((tmp_path / "run" / "seeds" / "val" / "otpl_affinity").glob("*.npz"))) == 16


def test_start_epoch_and_feature_detach_of_the_proxy_losses():
    """`otpl.start_epoch`: before it both proxy terms weigh 0 (still computed and logged); `otpl.ppc_features`:
    detach keeps L_ppc's gradient out of the patch features, train lets it in."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 12, 8, generator=g, requires_grad=True)
    proxies = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    pos = torch.zeros(2, 4, 12, dtype=torch.bool)
    pos[:, 1, :3] = True
    out = {"otpl_proxies": proxies, "otpl_features": feats, "otpl_positives": pos,
           "otpl_cols": torch.ones(2, 4, dtype=torch.bool)}
    labels = torch.tensor([[1.0, 0, 0], [1.0, 1, 0]])
    early = otpl_terms(out, labels, OTPLConfig(start_epoch=2), epoch=1)
    assert early["otpl_pcls"].detach().item() == 0 and early["otpl_ppc"].detach().item() == 0 and early["_ppc"].item() > 0
    on = otpl_terms(out, labels, OTPLConfig(start_epoch=2), epoch=2)
    assert on["otpl_ppc"].detach().item() == pytest.approx(0.2 * on["_ppc"].item())
    for mode, reaches in (("detach", False), ("train", True)):
        terms = otpl_terms(out, labels, OTPLConfig(ppc_features=mode))
        gf, gp = torch.autograd.grad(terms["otpl_ppc"], [feats, proxies], allow_unused=True)
        assert (gf is not None and gf.abs().sum() > 0) == reaches
        assert gp.abs().sum() > 0
