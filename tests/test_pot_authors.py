"""POT's ``pot.mode=code`` against what the released code computes (``tests/fixtures/authors-pot``, made
by ``tools/gen_pot_fixture.py`` from github.com/jianwang91/POT on a seeded random ResNet-50).

- seeds: ``tokenseg maps pot-clip-es pot.mode=code --checkpoint their.pth --export-npy`` (the CLI, POT's
  map loop: their ``CAM`` forward at scales 1, 0.5, 1.5, 2 with flips, ``get_seed_aff_x4``, the CLIP-ES
  fusion, IS_CAM / IS_CAM1) against their ``make_cam.py`` dicts;
- training: one step through the method engine (the view, ``forward``, ``loss``, backward) against their
  ``Net`` forward, ``lossCLS`` / ``lossCon`` and the gradients they produce;
- every key POT does not read is refused when set, and every POT preset still loads.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import VOC_CLASSES
from tokenseg.core.seeds import SeedMaps, save_seed
from tokenseg.core.errors import TokensegError
from tokenseg.methods import get_method
from tokenseg.methods.base import StepContext
from tokenseg.methods.pot.config import flip_of, numpy_init_of

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "authors-pot"
TOL = 1e-5


def _generator():
    spec = importlib.util.spec_from_file_location("gen_pot_fixture", ROOT / "tools" / "gen_pot_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Their checkpoint (regenerated from the seed), the images as a folder dataset, the CLIP-ES seeds."""
    tmp = tmp_path_factory.mktemp("pot-authors")
    meta = json.loads((FIX / "meta.json").read_text())
    ref = dict(np.load(FIX / "pot_reference.npz"))
    shapes = json.loads((FIX / "state_shapes.json").read_text())
    state = _generator().released_state(shapes, meta["state_seed"])
    torch.save({"net": state}, tmp / "final.pth")
    data = tmp / "data"
    (data / "images").mkdir(parents=True)
    for name in meta["names"]:
        (data / "images" / f"{name}.jpg").write_bytes((FIX / "images" / f"{name}.jpg").read_bytes())
        # where the preset looks for them (`tokenseg maps clip-es` writes there), as a user's working folder
        save_seed(tmp / "runs/clip-es/seeds/train/clip" / f"{name}.npz",
                  SeedMaps(ref[f"{name}/labels"], ref[f"{name}/clip"], {}))
    labels = {n: [VOC_CLASSES[c] for c in lab] for n, lab in zip(meta["names"], meta["labels"])}
    (data / "labels.json").write_text(json.dumps({"classes": VOC_CLASSES, "labels": labels,
                                                  "splits": {"train": meta["names"]}}))
    over = ["data.format=folder", f"data.root={data}", "data.num_workers=0", "data.train_split=train",
            "data.val_split=train", "maps.split=train", "eval.split=train", "pot.mode=code", "model.pretrained=false", f"output_dir={tmp / 'run'}"]
    return tmp, meta, ref, over


def test_seeds_through_the_cli_equal_their_make_cam(setup, monkeypatch):
    tmp, meta, ref, over = setup
    monkeypatch.chdir(tmp)
    cfg = load_config("pot-clip-es", over)
    assert cfg.maps.scales == meta["scales"] and cfg.maps.flip and cfg.pot.seed == meta["map_seed"]
    assert main(["maps", "pot-clip-es", *over, "--checkpoint", str(tmp / "final.pth"), "--export-npy",
                 "--quiet"]) == 0
    for name in meta["names"]:
        ours = np.load(tmp / "run" / "seeds" / "train" / "npy" / f"{name}.npy", allow_pickle=True).item()
        np.testing.assert_array_equal(ours["keys"], ref[f"{name}/keys"])
        for k in ("IS_CAM", "IS_CAM1"):
            theirs = ref[f"{name}/{k}"]
            assert ours[k].shape == theirs.shape, (name, k)
            err = float(np.abs(ours[k] - theirs).max())
            assert err <= TOL, (name, k, err)


def test_a_training_step_through_the_method_equals_theirs(setup, monkeypatch):
    """Their VOC input (512² in their script, 128² here: ``pot.resize``), the fixture's train seed."""
    from tokenseg.checkpoint import load_model_from_checkpoint
    from tokenseg.data import build_dataset
    from tokenseg.data.transforms import TrainSet

    tmp, meta, ref, over = setup
    monkeypatch.chdir(tmp)
    cfg = load_config("pot-clip-es", [*over, f"pot.resize={meta['train_size']}", f"train.seed={meta['train_seed']}"])
    method = get_method("pot")
    model, _, _ = load_model_from_checkpoint(tmp / "final.pth")
    model.train()
    ds = build_dataset(cfg.data, "train")
    tset = TrainSet(ds, method.views(cfg), seed=cfg.train.seed, extras=method.extras(cfg, ds))
    order = [ds.ids.index(n) for n in meta["names"]]
    batch = default_collate([tset[i] for i in order])
    err = float((batch["image"] - torch.from_numpy(ref["train/image"])).abs().max())
    assert err <= TOL, err  # PIL bicubic 128², normalised as theirs
    ctx = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)
    out = method.forward(model, batch, ctx, cfg)
    terms = method.loss(out, batch, ctx, cfg)
    np.testing.assert_allclose(out["cls_logits"].detach().numpy(), ref["train/score"], atol=1e-4, rtol=1e-5)
    vm = out["pot_mask"]
    for ours, theirs in ((out["pot_pred"], "train/cam_class"), (out["pot_target"], "train/cam_add")):
        m = ours * vm
        m = m / (m.flatten(2).amax(-1)[..., None, None] + 1e-5)
        err = float((m.detach() - torch.from_numpy(ref[theirs])).abs().max())
        assert err <= TOL, (theirs, err)
    assert float(terms["cls"].detach()) == pytest.approx(0.5 * float(ref["train/lossCLS"]), abs=TOL)
    assert float(terms["con"].detach()) == pytest.approx(float(ref["train/lossCon"]), abs=TOL)
    sum(terms.values()).backward()
    params = dict(model.named_parameters())
    for theirs, ours in (("classifier.weight", "classifier.weight"), ("side1.weight", "side1.weight")):
        g, r = params[ours].grad, torch.from_numpy(ref[f"train/grad/{theirs}"])
        assert float((g - r).abs().max()) <= TOL * max(1.0, float(r.abs().max())), theirs


@pytest.mark.parametrize("key,value", [("model.backbone", "resnet101"), ("train.augment", "simple"),
                                       ("train.crop_scale", "[0.5, 1.0]"), ("train.color_jitter", "0.4"),
                                       ("maps.layers", "4"), ("maps.fusion", "product"),
                                       ("maps.layer_reduce", "sum"), ("model.backbone_kwargs", "{depth: 2}")])
def test_keys_pot_does_not_read_are_refused_by_name(key, value):
    with pytest.raises(TokensegError, match=f"'{key}' is not used by POT here"):
        load_config("pot", [f"{key}={value}"])


def test_keys_unused_under_the_chosen_optimizer_or_mode_are_refused_only_there():
    with pytest.raises(TokensegError, match="'model.backbone' .*set pot.backbone"):
        load_config("pot", ["model.backbone=resnet101"])
    with pytest.raises(TokensegError, match="'train.warmup_epochs' is not used by POT here.*SGD"):
        load_config("pot", ["train.warmup_epochs=1"])
    load_config("pot", ["train.optimizer=adamw", "train.warmup_epochs=1"])  # read by the AdamW schedule
    load_config("pot", ["train.momentum=0.5"])  # paper mode: SGD's momentum
    with pytest.raises(TokensegError, match="'train.momentum' .*pot.momentum=train"):
        load_config("pot-clip-es", ["pot.mode=code", "train.momentum=0.5"])
    load_config("pot-clip-es", ["pot.mode=code", "pot.momentum=train", "train.momentum=0.5"])


def test_every_pot_preset_loads_and_code_mode_follows_the_code():
    for preset in ("pot", "pot-coco", "demo-pot"):
        load_config(preset)
    for preset in ("pot-clip-es", "pot-clip-es-coco"):
        load_config(preset)
        cfg = load_config(preset, ["pot.mode=code"])
        assert not flip_of(cfg.pot) and numpy_init_of(cfg.pot)  # their VOC training: no flip; their k-means draws
    from tokenseg.methods.pot.config import augment_of, clusters_of

    a = load_config("pot", ["pot.mode=code", "pot.clip_seeds=x"]).pot
    b = load_config("pot-clip-es", ["pot.mode=code"]).pot
    for f in (augment_of, flip_of, clusters_of, numpy_init_of):
        assert f(a) == f(b), f.__name__  # `pot` and `pot-clip-es` run the same code path in code mode
    assert (augment_of(a), clusters_of(a)) == ("resize", 2)
    with pytest.raises(TokensegError, match="pot.kmeans_init=numpy"):
        load_config("pot", ["pot.kmeans_init=numpy"])
