"""The authors' training recipe details (METHODS.md §16.2–16.4), each checked against timm itself."""
import pytest
import torch

from tokenseg.config import load_config
from tokenseg.data.transforms import build_train_transform
from tokenseg.engine import lr_at_epoch
from tokenseg.methods.base import default_param_groups
from tokenseg.methods.mctformer import decays_pos_embed
from tokenseg.methods.mctformer.model import build_model


def test_per_epoch_schedule_equals_timm_cosine_stepped_after_each_epoch():
    from timm.scheduler import CosineLRScheduler

    epochs, warmup, base, wlr, mlr = 12, 5, 1e-3, 1e-6, 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=mlr, warmup_t=warmup, warmup_lr_init=wlr)
    for epoch in range(epochs):  # their loop: train the epoch at the current lr, then step(epoch)
        assert lr_at_epoch(epoch, epochs, warmup, base, wlr, mlr) == pytest.approx(opt.param_groups[0]["lr"],
                                                                                   rel=1e-12)
        sched.step(epoch)
    assert lr_at_epoch(0, epochs, warmup, base, wlr, mlr) == lr_at_epoch(1, epochs, warmup, base, wlr, mlr) == wlr


def test_cti_schedule_equals_timm_cosine_stepped_with_the_next_epoch():
    """CTI's loop steps ``scheduler.step(epo + 1)`` after each epoch (METHODS.md §16.4): its preset's
    ``train.lr_schedule=epoch_ahead`` runs every epoch at the lr their optimizer holds then."""
    from timm.scheduler import CosineLRScheduler

    cfg = load_config("cti")
    assert cfg.train.lr_schedule == "epoch_ahead"
    epochs, warmup, base, wlr, mlr = 12, 5, 1e-3, 1e-6, 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=mlr, warmup_t=warmup, warmup_lr_init=wlr)
    for epoch in range(epochs):
        assert lr_at_epoch(epoch, epochs, warmup, base, wlr, mlr, ahead=True) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12)
        sched.step(epoch + 1)


def _decayed(cfg):
    model = build_model(cfg.model, 3, decay_pos_embed=decays_pos_embed(cfg))
    groups = default_param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in groups[0]["params"]}, {names[id(p)] for p in groups[1]["params"]}


@pytest.mark.parametrize("preset,decayed", [("mctformer-plus", True), ("mctformer-v2", False),
                                            ("mctformer-v1", False)])
def test_position_embedding_decay_follows_the_authors_skip_list(preset, decayed):
    cfg = load_config(preset, ["model.backbone=vit_tiny_patch16_224", "model.img_size=32",
                               "model.backbone_kwargs={img_size: 32, depth: 1}"])
    decay, no_decay = _decayed(cfg)
    assert "cls_tokens" in no_decay and "blocks.0.attn.qkv.weight" in decay and "blocks.0.norm1.weight" in no_decay
    assert ({"pos_embed_cls", "pos_embed_pat"} <= decay) == decayed
    assert ({"pos_embed_cls", "pos_embed_pat"} <= no_decay) == (not decayed)
    forced = load_config(preset, ["model.backbone=vit_tiny_patch16_224", "model.img_size=32",
                                  "model.backbone_kwargs={img_size: 32, depth: 1}", "train.decay_pos_embed=false"])
    assert {"pos_embed_cls", "pos_embed_pat"} <= _decayed(forced)[1]


def test_deit_transform_has_no_colour_jitter_unless_asked():
    names = [type(t).__name__ for t in build_train_transform("deit", 64).transforms]
    assert "ColorJitter" not in names and "RandAugment" in names and "RandomErasing" in names
    names = [type(t).__name__ for t in build_train_transform("deit", 64, color_jitter=0.4).transforms]
    assert names.index("ColorJitter") < names.index("RandAugment")


def test_epochs_must_be_positive():
    from tokenseg.core.errors import TokensegError

    with pytest.raises(TokensegError, match="train.epochs"):
        load_config("tiny", ["train.epochs=0"])


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    """`tokenseg demo` leaves a `demo/` folder behind (runs/demo, or --out demo); `load_config("demo")` run
    from beside it must still read the preset, while a YAML file of that name is read as the config."""
    from tokenseg.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_config("demo").name == "demo"
    (tmp_path / "mine.yaml").write_text("preset: demo\nname: mine\n")
    assert load_config("mine.yaml").name == "mine"
