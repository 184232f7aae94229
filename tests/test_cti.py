"""CTI exact to the authors' code (tests/fixtures/authors-cti: one step of their ``update()`` and their
``infer_multi`` on a tiny random model), their checkpoint layout both ways, the memory bank as
resumable model state, and the engine chain on the tiny synthetic set."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenseg.checkpoint import load_model_from_checkpoint, save_checkpoint
from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import build_dataset
from tokenseg.data.transforms import TrainSet
from tokenseg.engine import train
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed
from tokenseg.methods import StepContext, get_method
from tokenseg.methods.cti import compute_losses, plan_for
from tokenseg.methods.cti.convert import model_from_state
from tokenseg.methods.cti.model import append_memory

from floors import background_only_miou

from authors_weights import authors_weights

FIX = Path(__file__).parent / "fixtures" / "authors-cti"
HEADS = 2  # their tiny model: embed 64, 2 heads (not inferable from the weights)
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 outputs of magnitude up to ~8: 1e-5 absolute + 1e-5 relative
TINY = ["data.synthetic={num_classes: 3, image_size: 48, train_images: 48, val_images: 16, seed: 1}",
        "model.img_size=48",
        "model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "train.batch_size=8", "train.epochs=2", "train.eval_every=0", "cti.swap_layer=0", "cti.memory_size=4",
        "cti.train_attn_layers=2", "maps.layers=2", "maps.scales=[1.0]", "maps.batch_size=16", "data.num_workers=0",
        "cti.start_epoch=0"]  # the terms from the first step (demo-cti: epoch 2, which these short runs never reach)


def tiny(tmp_path, *extra, out="run"):
    return load_config("demo-cti", [f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / out}", *TINY,
                                    *extra])


def fixture_model(*overrides):
    return load_model_from_checkpoint(authors_weights("authors-cti/checkpoint.pth"), num_heads=HEADS,
                                      overrides=["model.drop_path=0", "cti.weights=[1, 1, 1]", *overrides])


def fixture_step(model, cfg, memory_count=30):
    z = np.load(FIX / "train_step.npz")
    model.train()
    model.memory_bank.copy_(torch.from_numpy(z["memory_before"]))
    model.memory_count.fill_(memory_count)
    batch = {"image": torch.from_numpy(z["img"]), "image_pos": torch.from_numpy(z["img_pos"]),
             "labels": torch.from_numpy(z["label"]), "index": torch.arange(4)}
    ctx = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
    return get_method("cti").forward(model, batch, ctx, cfg), batch, z


def close(got, ref, name):
    got = got.detach().numpy() if torch.is_tensor(got) else got
    assert got.shape == ref.shape, name
    np.testing.assert_allclose(got, ref, err_msg=name, **TOL)


# ---------------------------------------------------------------------------------------- exact to their code
def test_training_step_reproduces_their_update():
    """Every output of each of their four forwards, the memory after the step, every loss term and the
    gradients, from one call of our model (shared first blocks, attention only where read)."""
    model, cfg, _ = fixture_model()
    assert cfg.model.method == "cti" and cfg.cti.swap_layer == 3 and cfg.cti.train_attn_layers == 6
    out, batch, z = fixture_step(model, cfg)
    names = {"cls": "cls_logits", "pcls": "patch_logits", "cls_pos": "cls_logits_pos", "pcls_pos": "patch_logits_pos"}
    for k in ("cls", "pcls", "cls_pos", "pcls_pos", "cams", "mtatt", "attn", "ctk3", "ctk3_pos", "cams_swap_intra",
              "swap_ctk_cross", "fcams_as_swap_cross"):
        close(out[names.get(k, k)], z[k], k)
    fcams = out["cams"] * out["mtatt"]  # their outs['fcams'] and outs['rcams'] of the plain pass
    close(fcams, z["fcams"], "fcams")
    B, P, h, w = fcams.shape
    close((fcams.flatten(2) @ out["attn"].transpose(1, 2)).view(B, P, h, w), z["rcams"], "rcams")
    close(model.memory_bank, z["memory_after"], "memory_after")
    assert out["memory_full"] and model.memory_count.tolist() == [30] * 5

    expected = json.loads((FIX / "meta.json").read_text())["losses"]
    terms = compute_losses(out, batch["labels"], cfg)
    assert expected["cross_added"] and set(terms) == {"cls", "bg", "intra", "cross", "total"}
    assert terms["bg"].dtype == torch.float64  # their refinement products run in float64
    for k, v in terms.items():
        assert abs(float(v.detach()) - expected[f"loss_{k}"]) <= 1e-5, k
    terms["total"].backward()
    params = dict(model.named_parameters())
    grads = [k for k in z.files if k.startswith("grad/")]
    assert len(grads) == 10
    for k in grads:
        name = k.removeprefix("grad/")
        g = params[name].grad
        if name == "pos_embed_pat":  # ours (1, D, h, w), theirs (1, M, D)
            g = g.flatten(2).transpose(1, 2)
        close(g, z[k], k)


def test_cross_loss_is_left_out_until_every_class_holds_the_memory_size():
    """Their ``valid == C`` rule: with one class's memory empty, the step's total is theirs minus the
    cross term and the other terms are unchanged."""
    model, cfg, _ = fixture_model()
    z = np.load(FIX / "train_step.npz")
    model.train()
    model.memory_bank.copy_(torch.from_numpy(z["memory_before"]))
    model.memory_count.fill_(30)
    model.memory_count[3] = 0  # class 3 is in one image of the batch: 1 < 30 after the step
    batch = {"image": torch.from_numpy(z["img"]), "image_pos": torch.from_numpy(z["img_pos"]),
             "labels": torch.from_numpy(z["label"])}
    out = get_method("cti").forward(model, batch, StepContext(0, 0, 1, 1), cfg)
    assert out["memory_full"] is False and "fcams_as_swap_cross" not in out
    assert model.memory_count.tolist() == [30, 30, 30, 1, 30]
    terms = compute_losses(out, batch["labels"], cfg)
    assert set(terms) == {"cls", "bg", "intra", "total"}
    expected = json.loads((FIX / "meta.json").read_text())["losses"]
    assert abs(float(terms["total"].detach()) - (expected["loss_total"] - expected["loss_cross"])) <= 1e-5


def folder_dataset(root: Path) -> Path:
    spec = json.loads((FIX / "labels.json").read_text())
    shutil.copytree(FIX / "images", root / "images")
    (root / "classes.txt").write_text("\n".join(spec["classes"]) + "\n")
    rows = ["image,labels"] + [f"{i},{';'.join(spec['classes'][c] for c in labs)}" for i, labs in
                               sorted(spec["labels"].items())]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def assert_their_maps(seeds: Path):
    ref = np.load(FIX / "maps_infer.npz")
    for key in ref.files:
        image_id, what = key.split("/")
        seed = load_seed(seeds / f"{image_id}.npz")
        got = seed.background if what == "background" else seed.maps[list(seed.classes).index(int(what))]
        assert got.shape == ref[key].shape, key
        np.testing.assert_allclose(got.astype(np.float32), ref[key], err_msg=key, **TOL)
    spec = json.loads((FIX / "labels.json").read_text())
    assert sum(len(v) + 1 for v in spec["labels"].values()) == len(ref.files)


def test_cli_maps_reproduce_their_inference_by_path_and_converted(tmp_path):
    """`tokenseg maps cti --checkpoint their.pth` with the preset's defaults (original size + flip, all
    layers, max-norm, background channel) equals their infer_multi; so does the converted checkpoint."""
    data = folder_dataset(tmp_path / "data")
    ours = tmp_path / "ours.pt"
    assert main(["convert", str(authors_weights("authors-cti/checkpoint.pth")), str(ours), "--num-heads", str(HEADS)]) == 0
    common = ["data.format=folder", f"data.root={data}", "data.train_split=all", "data.val_split=all",
              f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "maps.save_dtype=float32",
              f"model.backbone_kwargs={{num_heads: {HEADS}}}", "data.num_workers=0"]
    for ckpt in (authors_weights("authors-cti/checkpoint.pth"), ours):
        out = tmp_path / f"seeds_{ckpt.stem}"
        assert main(["maps", "cti", *common, "--checkpoint", str(ckpt), "--split", "all", "--out", str(out),
                     "--quiet"]) == 0
        assert json.loads((out / "maps_meta.json").read_text())["method"] == "cti"
        assert_their_maps(out / "fused_affinity")


# ---------------------------------------------------------------------------------------- their layout
def test_convert_both_ways_is_lossless(tmp_path):
    ours, back = tmp_path / "ours.pt", tmp_path / "back.pth"
    assert main(["convert", str(authors_weights("authors-cti/checkpoint.pth")), str(ours), "--num-heads", str(HEADS)]) == 0
    assert main(["convert", str(ours), str(back), "--to", "authors"]) == 0
    theirs = torch.load(authors_weights("authors-cti/checkpoint.pth"), weights_only=True)
    again = torch.load(back, weights_only=True)
    assert "model" not in again and list(again) == list(theirs)  # a bare state dict, as their save_model
    for k, v in theirs.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k

    # ours (with a memory) -> theirs -> ours: every weight identical; the memory is training state their
    # files cannot hold, so it comes back empty
    model, cfg, names = load_model_from_checkpoint(ours)
    model.memory_bank.normal_()
    model.memory_count.fill_(7)
    trained = tmp_path / "trained.pt"
    save_checkpoint(trained, model, None, None, 0, cfg, names)
    assert main(["convert", str(trained), str(back), "--to", "authors"]) == 0
    reloaded, cfg2, _ = load_model_from_checkpoint(back, num_heads=HEADS)
    a, b = model.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k in ("memory_bank", "memory_count"):
            assert not b[k].any(), k
        else:
            assert torch.equal(a[k], b[k]), k
    assert cfg2.model.method == "cti" and cfg2.model.backbone_kwargs["depth"] == 8


def test_wrong_layout_for_the_method_is_a_clear_error(tmp_path, capsys):
    mct = authors_weights("authors-mctformer/plus/checkpoint.pth")
    assert main(["convert", str(mct), str(tmp_path / "x.pt"), "--method", "cti", "--num-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "x.pt" not in err and "checkpoint.pth" in err and "bg_token" in err and "mctformer-plus" in err
    with pytest.raises(TokensegError, match="not a CTI checkpoint.*bg_token"):
        model_from_state(torch.load(mct, weights_only=True), str(mct), method="cti", num_heads=3)
    assert main(["convert", str(authors_weights("authors-cti/checkpoint.pth")), str(tmp_path / "y.pt"), "--method", "mctformer-plus",
                 "--num-heads", "2"]) == 2
    assert "is a CTI checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- memory
def reference_memory(steps, C, M):
    """Their lists: append LayerNorm-ed tokens of every present (b, c) in nonzero order, keep the last M."""
    lists = [[] for _ in range(C)]
    for entries, present in steps:
        for b, c in torch.nonzero(present).tolist():
            lists[c].append(entries[b, c])
        for c in range(C):
            if len(lists[c]) >= M:
                lists[c] = lists[c][-M:]
    return lists


def test_memory_append_matches_their_lists():
    torch.manual_seed(0)
    C, M, D, B = 3, 4, 5, 10
    bank, count = torch.zeros(C, M, D), torch.zeros(C, dtype=torch.long)
    steps = []
    for i in range(4):  # class 2 never appears at first, then > M times in one batch
        present = torch.rand(B, C) < (0.3 if i < 2 else 0.8)
        present[:, 2] &= i >= 2
        entries = torch.randn(B, C, D)
        steps.append((entries, present))
        bank, count = append_memory(bank, count, entries, present)
        lists = reference_memory(steps, C, M)
        assert count.tolist() == [len(x) for x in lists]
        for c in range(C):
            if lists[c]:
                assert torch.equal(bank[c, M - len(lists[c]):], torch.stack(lists[c])), (i, c)


# ---------------------------------------------------------------------------------------- the engine
def test_train_maps_evaluate_through_the_cli(tmp_path, capsys):
    over = [f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", *TINY,
            "maps.kinds=[fused, fused_affinity]", "--quiet"]
    assert main(["run", "demo-cti", *over]) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"cls", "bg", "intra", "cross"} <= set(log[-1])  # the memory (4 per class) fills within the run
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["cti"]["memory_size"] == 4 and state["model"]["memory_count"].tolist() == [4, 4, 4]
    seed = load_seed(next((tmp_path / "run" / "seeds" / "val" / "fused_affinity").glob("*.npz")))
    assert seed.background is not None and seed.background.shape == seed.maps.shape[1:]
    assert 0 <= seed.maps.min() and seed.maps.max() <= 1 and 0 < seed.background.max() <= 1  # max-norm
    capsys.readouterr()
    assert main(["evaluate", "demo-cti", *over[:-1], "eval.background=channel", "--json", str(tmp_path / "e.json"),
                 "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["fused_affinity"]
    assert res["background"] == "channel" and 0 < res["miou"] <= 100
    # not yet above background everywhere (20.3 vs 21.9 here): CTI's from-scratch demo recipe is
    # the open "demo recipes must learn" issue; this pins where it stands so a regression shows
    floor = background_only_miou(build_dataset(load_config("demo-cti", over[:-1]).data, "val"))
    assert res["miou"] > floor - 3, (res["miou"], floor)


def fixed_batch(cfg):
    """Two views of the first 16 training images, deterministic (resized, no augmentation)."""
    from tokenseg.data.transforms import build_eval_transform

    ds = build_dataset(cfg.data, cfg.data.train_split)
    tf = build_eval_transform(cfg.model.img_size)
    x = torch.stack([tf(ds.load_image(i)) for i in range(16)])
    return {"image": x, "image_pos": x.flip(-1), "labels": torch.stack([torch.from_numpy(ds.multi_hot(i))
                                                                        for i in range(16)])}


def held_out_loss(model, cfg, batch):
    model.train()
    model.reset_memory()
    with torch.no_grad():
        out = model(batch["image"], batch["image_pos"], batch["labels"], plan=plan_for(cfg, 0))
        return float(compute_losses(out, batch["labels"], cfg)["total"])


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=3", "train.lr=3e-3")
    torch.manual_seed(cfg.train.seed)  # the engine's initial model
    before = get_method("cti").build(cfg, 3)
    batch = fixed_batch(cfg)
    start = held_out_loss(before, cfg, batch)
    ckpt = train(cfg, progress=False)
    after, _, _ = load_model_from_checkpoint(ckpt)
    assert held_out_loss(after, cfg, batch) < start - 0.05  # measured: 2.88 -> 2.65


def test_killed_and_resumed_training_matches_uninterrupted_memory_included(tmp_path):
    extra = ["train.checkpoint_every=2", "model.drop_path=0.1"]
    a, b = tiny(tmp_path, *extra, out="a"), tiny(tmp_path, *extra, out="b")
    train(a, progress=False)

    def kill(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, progress=False, on_step=kill)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 4
    train(b, resume=True, progress=False)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 12
    assert sa["model"]["memory_count"].tolist() == [4, 4, 4] and sa["model"]["memory_bank"].abs().sum() > 0
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_every_parameter_gets_a_gradient_whichever_terms_are_on(tmp_path):
    """Why ``dynamic_graph=False``: also in COCO's first two epochs (only the MLSM terms) every trainable
    parameter is reached, so DDP needs no unused-parameter search."""
    cfg = tiny(tmp_path, "cti.weights=[0.1, 0.1, 0.1]", "cti.start_epoch=2", "cti.bg_detach_cams=true",
               "cti.cct_weight=0")  # their terms only (the demo's CCT: its own test)
    model = get_method("cti").build(cfg, 3)
    batch = fixed_batch(cfg)
    model.memory_count.fill_(4)
    for epoch, terms in ((0, {"cls"}), (1, {"cls"}), (2, {"cls", "bg", "intra", "cross"})):
        model.zero_grad(set_to_none=True)
        ctx = StepContext(epoch=epoch, step=0, total_steps=1, steps_per_epoch=1)
        out = get_method("cti").forward(model, batch, ctx, cfg)
        losses = get_method("cti").loss(out, batch, ctx, cfg)
        assert set(losses) == terms, epoch
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (epoch, missing)
    assert not get_method("cti").dynamic_graph


def test_view2_from_start_epoch_trains_view_1_alone_before_the_terms(tmp_path):
    """``cti.view2_from_start_epoch`` (demo-cti): before ``cti.start_epoch`` a step is view 1's plain pass
    and its two MLSM terms, every parameter still reached (no DDP unused-parameter search); from it on,
    the authors' step. The default (false) is their code (the fixture test above)."""
    from tokenseg.core.losses import multilabel_soft_margin

    cfg = tiny(tmp_path, "cti.view2_from_start_epoch=true", "cti.start_epoch=1", "cti.cct_weight=0")
    cti = get_method("cti")
    model = cti.build(cfg, 3)
    batch = fixed_batch(cfg)
    assert not plan_for(cfg, 0).view2 and plan_for(cfg, 1).view2
    assert plan_for(tiny(tmp_path, "cti.view2_from_start_epoch=false", "cti.start_epoch=1"), 0).view2
    model.train()
    ctx0 = StepContext(epoch=0, step=0, total_steps=2, steps_per_epoch=1)
    out = cti.forward(model, batch, ctx0, cfg)
    losses = cti.loss(out, batch, ctx0, cfg)
    assert set(losses) == {"cls"} and "cls_logits_pos" not in out and int(model.memory_count.sum()) == 0
    plain = model(batch["image"])
    y = batch["labels"].float()
    ref = multilabel_soft_margin(plain["cls_logits"], y) + multilabel_soft_margin(plain["patch_logits"], y)
    torch.testing.assert_close(losses["cls"], ref, rtol=0, atol=0)
    model.zero_grad(set_to_none=True)
    losses["cls"].backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    ctx1 = StepContext(epoch=1, step=1, total_steps=2, steps_per_epoch=1)
    out = cti.forward(model, batch, ctx1, cfg)
    assert set(cti.loss(out, batch, ctx1, cfg)) >= {"cls", "bg", "intra"} and "cls_logits_pos" in out
    # the data pipeline makes view 2 (RandAugment) only from cti.start_epoch on; view 1 is the same sample
    train_set = TrainSet(build_dataset(cfg.data, "train"), cti.views(cfg), seed=0)
    early = train_set[3]
    train_set.set_epoch(1)
    assert "image_pos" not in early and set(train_set[3]) == {"image", "image_pos", "labels", "index"}
    ref = TrainSet(build_dataset(cfg.data, "train"), cti.views(tiny(tmp_path)), seed=0)[3]
    assert torch.equal(early["image"], ref["image"]) and "image_pos" in ref
    # through the engine: epoch 0 logs the view-1 MLSM terms alone, epoch 1 (1-based 2) the three terms too
    seen = []
    train(tiny(tmp_path, "cti.start_epoch=1", out="engine"), progress=False,
          on_step=lambda step, losses: seen.append((step, set(losses) & {"cls", "bg", "intra", "cross", "_cross"})))
    assert [s for s, _ in seen] == list(range(1, 13))  # 6 steps an epoch
    assert all(t == {"cls"} for _, t in seen[:6]) and all(t >= {"cls", "bg", "intra"} for _, t in seen[6:])


def test_cct_weight_adds_mctformer_plus_cct_on_view_1s_foreground_tokens(tmp_path):
    """``cti.cct_weight`` (demo-cti): MCTformer+'s CCT on view 1's C foreground tokens after every block,
    in the view-1-only step and in the authors' full step alike (the same tokens as a plain pass, since
    view 1 runs the same blocks); off (0, their code) no term and no kept tokens."""
    from tokenseg.core.losses import contrastive_class_token_loss
    from tokenseg.models.attention import run_blocks

    cti = get_method("cti")
    cfg = tiny(tmp_path, "cti.cct_weight=0.5", "cti.view2_from_start_epoch=true", "cti.start_epoch=1")
    model = cti.build(cfg, 3).train()
    batch = fixed_batch(cfg)
    y = batch["labels"].float()
    tokens, _ = model.embed(batch["image"])  # the reference: every block's output, foreground rows 1..C
    ref_layers = [t[:, 1:] for t in run_blocks(model.blocks, tokens, model.num_prefix, keep_layer_tokens=True).layer_tokens]
    want = 0.5 * contrastive_class_token_loss(ref_layers, y)
    for epoch in (0, 1):  # view 1 alone, then their full step
        ctx = StepContext(epoch=epoch, step=epoch, total_steps=2, steps_per_epoch=1)
        out = cti.forward(model, batch, ctx, cfg)
        assert len(out["layer_cls_tokens"]) == len(model.blocks)
        torch.testing.assert_close(cti.loss(out, batch, ctx, cfg)["cct"], want, rtol=1e-5, atol=1e-6)
    off = tiny(tmp_path, "cti.view2_from_start_epoch=true", "cti.start_epoch=1", "cti.cct_weight=0")
    ctx = StepContext(epoch=0, step=0, total_steps=2, steps_per_epoch=1)
    out = cti.forward(model, batch, ctx, off)
    assert "layer_cls_tokens" not in out and "cct" not in cti.loss(out, batch, ctx, off)
    with pytest.raises(TokensegError, match="cti.cct_weight"):
        load_config("demo-cti", ["cti.cct_weight=-1"])


def test_pooling_gwrp_ranks_the_patchcam_as_mctformer_plus(tmp_path):
    """``cti.pooling`` (demo-cti: gwrp): the patch logits are the GWRP of the PatchCAM's channels 1..C
    (weights decay^rank over the patches sorted by score, written out here), in the plain pass and in the
    authors' step alike; the default (gap) is their mean (the fixture tests above)."""
    cti = get_method("cti")
    assert load_config("demo-cti").cti.pooling == "gwrp"
    cfg = tiny(tmp_path, "model.gwrp_decay=0.9")
    model = cti.build(cfg, 3).train()
    batch = fixed_batch(cfg)
    out = model(batch["image"])
    fmap = out["patch_map"][:, 1:].detach().flatten(2).double()
    ranked = fmap.sort(-1, descending=True).values
    w = torch.tensor([0.9 ** j for j in range(ranked.shape[-1])], dtype=torch.float64)
    torch.testing.assert_close(out["patch_logits"].detach().double(), (ranked * w).sum(-1) / w.sum(),
                               rtol=1e-5, atol=1e-6)
    ctx = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
    step = cti.forward(model, {**batch, "index": torch.arange(16)}, ctx, cfg)
    torch.testing.assert_close(step["patch_logits"], out["patch_logits"], rtol=1e-5, atol=1e-6)
    gap = get_method("cti").build(tiny(tmp_path, "cti.pooling=gap"), 3)
    gap.load_state_dict(model.state_dict())
    torch.testing.assert_close(gap(batch["image"])["patch_logits"], fmap.float().mean(-1), rtol=1e-5, atol=1e-6)
    assert load_config("cti").cti.pooling == "gap"  # the paper preset: their code
    with pytest.raises(TokensegError, match="cti.pooling"):
        load_config("demo-cti", ["cti.pooling=max"])
    with pytest.raises(TokensegError, match="'model.pooling' is not used by CTI.*cti.pooling"):
        load_config("cti", ["model.pooling=gap"])


def test_two_independent_views(tmp_path):
    cfg = tiny(tmp_path, "model.img_size=32")
    views = get_method("cti").views(cfg)
    assert list(views) == ["image", "image_pos"]
    names = [[type(t).__name__ for t in v.transform.transforms] for v in views.values()]
    assert names[0] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"]
    assert names[1] == names[0][:2] + ["RandAugment"] + names[0][2:]  # no jitter, no random erasing
    assert tuple(views["image"].transform.transforms[0].scale) == (0.5, 1.0)  # train.crop_scale
    sample = TrainSet(build_dataset(cfg.data, "train"), views, seed=0)[3]
    assert sample["image"].shape == sample["image_pos"].shape == (3, 32, 32)
    assert not torch.equal(sample["image"], sample["image_pos"])  # independent crops, not one crop twice


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TokensegError, match="cti.expect_classes=80.*data.format=voc"):
        load_config("cti-coco", ["data.format=voc", "data.root=VOC2012"])
    cfg = tiny(tmp_path, "cti.expect_classes=80")
    with pytest.raises(TokensegError, match="dataset of 80 classes.*has 3"):
        train(cfg, progress=False)
    with pytest.raises(TokensegError, match="cti.swap_layer=1.*2 blocks"):
        train(tiny(tmp_path, "cti.swap_layer=1", out="swap"), progress=False)
    with pytest.raises(TokensegError, match="cti.weights"):
        load_config("cti", ["cti.weights=[1, 1]"])

    # a memory bank of another class count (a checkpoint edited or from another dataset)
    ckpt = train(tiny(tmp_path, "train.max_steps=1", out="one"), progress=False)
    state = torch.load(ckpt, weights_only=False)
    state["model"]["memory_bank"] = torch.zeros(5, 4, 32)
    bad = tmp_path / "bad_memory.pt"
    torch.save(state, bad)
    over = [f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'one'}", *TINY]
    assert main(["maps", "demo-cti", *over, "--checkpoint", str(bad), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad_memory.pt" in err and "memory_bank (5, 4, 32) vs (3, 4, 32)" in err
    shutil.copy(bad, tmp_path / "one" / "checkpoint.pt")
    with pytest.raises(TokensegError, match="one/checkpoint.pt.*memory_bank"):
        train(tiny(tmp_path, "train.max_steps=1", out="one"), resume=True, progress=False)


def test_ddp_ranks_share_one_memory_and_match_one_process(tmp_path):
    """Under torchrun (2 CPU processes, gloo) every rank appends the whole global batch's entries in
    the single-process order: memory and weights equal a single process with the same global batch."""
    import os
    import subprocess
    import sys

    common = [f"data.cache_dir={tmp_path / 'cache'}", *TINY, "train.device=cpu", "train.epochs=1",
              "cti.memory_size=6", "--quiet"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", "demo-cti", *common, f"output_dir={single}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tokenseg",
           "train", "demo-cti", *common, f"output_dir={multi}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(single / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(multi / "checkpoint.pt", weights_only=False)["model"]
    assert a["memory_count"].tolist() == b["memory_count"].tolist() == [6, 6, 6]
    for k, v in a.items():
        if k.endswith("attn.qkv.bias"):  # the key bias: its gradient is 0 in exact arithmetic (softmax is
            D = v.shape[0] // 3  # shift-invariant), so AdamW turns float noise into updates of either sign
            v, b[k] = torch.cat([v[:D], v[2 * D:]]), torch.cat([b[k][:D], b[k][2 * D:]])
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_predict_from_a_cti_checkpoint_uses_its_background_channel(tmp_path):
    """`tokenseg predict` with a CTI classification checkpoint: classes from CTI's scores, the mask the
    argmax of [background token's channel, the predicted classes' maps] as `compute_map_batch` gives them."""
    from PIL import Image

    from tokenseg.maps import compute_map_batch, normalise
    from tokenseg.segment.predict import predict
    from tokenseg.core.masks import read_mask

    cfg = tiny(tmp_path)
    torch.manual_seed(0)
    model = get_method("cti").build(cfg, 3).eval()
    ckpt = tmp_path / "cti.pt"
    save_checkpoint(ckpt, model, None, None, 0, cfg, ["a", "b", "c"])
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    res = predict([tmp_path / "photo.png"], ckpt, tmp_path / "pred", cls_threshold=0.0, overlay=False,
                  progress=False, kind="fused_affinity", max_side=0)
    x = normalise(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    mb = compute_map_batch(model, x, torch.ones(1, 3), cfg, ["fused_affinity"])
    scores = torch.cat([mb.background["fused_affinity"], mb.maps["fused_affinity"]], 0)
    np.testing.assert_array_equal(read_mask(res[0]["mask"]), scores.argmax(0).numpy())
