"""The method engine: a method is one module + one preset; the engine, map pipeline, checkpoints,
evaluation and CLI serve every method unchanged."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import build_dataset
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed
from tokenseg.methods import MapRecipe, Method, available_methods, get_method, register

from floors import background_only_miou

TINY_DATA = ["data.format=synthetic", "data.train_split=train", "data.val_split=val", "data.num_workers=0",
             "data.synthetic={num_classes: 3, image_size: 48, train_images: 48, val_images: 16, seed: 1}",
             "maps.split=val", "eval.split=val", "model.img_size=48"]


def test_registry_lists_the_methods_and_names_near_misses():
    assert {"mctformer-v1", "mctformer-v2", "mctformer-plus", "cam"} <= set(available_methods())
    with pytest.raises(TokensegError, match="did you mean 'mctformer-plus'"):
        get_method("mctformer-pluss")
    with pytest.raises(TokensegError, match="unknown method"):
        load_config("tiny", ["model.method=nope"])


def test_cam_worked_example_trains_maps_and_evaluates(tmp_path, capsys):
    """README "Adding a method": methods/cam.py + configs/cam.yaml, nothing else."""
    over = [*TINY_DATA, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
            "cam.backbone=resnet10t", "train.epochs=2", "train.batch_size=8", "train.lr=0.05", "train.eval_every=1",
            "maps.scales=[1.0, 1.5]"]
    assert main(["train", "cam", *over, "--quiet"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["model"]["method"] == "cam" and ckpt["config"]["cam"]["backbone"] == "resnet10t"
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_map" in r for r in log) and all(r["epoch"] >= 1 for r in log)
    assert main(["maps", "cam", *over, "--quiet"]) == 0
    seed = load_seed(next((tmp_path / "run" / "seeds" / "val" / "cam").glob("*.npz")))
    assert seed.maps.shape[1:] == (48, 48) and seed.background is None
    capsys.readouterr()
    assert main(["evaluate", "cam", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["cam"]
    assert 0 < res["miou"] <= 100 and res["threshold"] is not None
    floor = background_only_miou(build_dataset(load_config("cam", over).data, "val"))
    assert res["miou"] > floor, (res["miou"], floor)


# ---------------------------------------------------------------------------------- a method from outside
@dataclass
class BlobConfig:
    width: int = 8


class BlobNet(nn.Module):
    """Two conv layers; its map is a sigmoid of per-class logits, with an explicit background channel."""

    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__()
        w = cfg.blob.width
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, stride=2,
                                                                                                padding=1), nn.ReLU())
        self.cls = nn.Conv2d(w, num_classes + 1, 1)
        self.patch_size = 4

    def forward(self, x):
        m = self.cls(self.body(x))
        return {"cls_logits": m[:, 1:].mean((2, 3)), "map": m}


def _blob_combine(model, x, labels, classes, cfg, kinds):
    m = torch.sigmoid(model(x)["map"])
    return {"blob": m[:, 1:][:, classes], "blob@background": m[:, :1]}


BLOB = Method(name="test-blob", summary="a method defined by a test", build=BlobNet,
              loss=lambda out, batch, ctx, cfg: {"cls": F.multilabel_soft_margin_loss(out["cls_logits"],
                                                                                     batch["labels"])},
              class_scores=lambda model, x: model(x)["cls_logits"],
              recipe=MapRecipe(kinds=("blob",), default_kinds=("blob",), combine=_blob_combine, normalise="max",
                               background="channel", size_rounding="none"),
              section="blob", section_config=BlobConfig, optimizer="sgd-poly")


def test_a_method_registered_outside_the_package_runs_the_whole_chain(tmp_path, capsys):
    if "test-blob" not in available_methods():
        register(BLOB)
    over = [*TINY_DATA, f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
            "model.method=test-blob", "blob.width=6", "train.epochs=1", "train.batch_size=8", "train.lr=0.1",
            "train.lr_base_batch=8", "eval.background=channel", "maps.kinds=[blob]"]
    assert main(["train", "tiny", *over, "--quiet"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["config"]["blob"] == {"width": 6}
    assert "momentum_buffer" in str(state["optimizer"]["state"])  # sgd-poly, the method's choice
    assert main(["maps", "tiny", *over, "--quiet"]) == 0
    seed = load_seed(next((tmp_path / "run" / "seeds" / "val" / "blob").glob("*.npz")))
    assert seed.background is not None and seed.background.shape == seed.maps.shape[1:]
    assert float(seed.background.max()) == pytest.approx(1.0, abs=1e-3)  # max-normalised, as the recipe says
    assert main(["evaluate", "tiny", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["blob"]
    assert res["background"] == "channel" and res["threshold"] is None and 0 < res["miou"] <= 100


def test_channel_evaluation_equals_a_direct_argmax(tmp_path):
    """eval.background=channel: argmax over [background, classes], ties to background."""
    from tokenseg.config import EvalConfig
    from tokenseg.data import WSSSDataset
    from tokenseg.evaluate import evaluate_seeds
    from tokenseg.core.seeds import SeedMaps, save_seed
    from tokenseg.core.masks import save_palette_png
    from tokenseg.core.metrics import confusion_matrix, scores_from_confusion

    rng = np.random.default_rng(0)
    ids, masks, conf = [], [], np.zeros((4, 4), np.int64)
    for i in range(3):
        maps, bg = rng.random((2, 6, 7)).astype(np.float32), rng.random((6, 7)).astype(np.float32)
        bg[0, 0] = maps[:, 0, 0].max()  # a tie: background wins
        gt = rng.integers(0, 4, (6, 7)).astype(np.uint8)
        gt[1, 1] = 255
        save_seed(tmp_path / "s" / f"i{i}.npz", SeedMaps(np.array([0, 2]), maps, {}, bg), "float32")
        save_palette_png(tmp_path / "m" / f"i{i}.png", gt)
        scores = np.concatenate([bg[None], maps])
        pred = np.array([0, 1, 3])[scores.argmax(0)]
        conf += confusion_matrix(pred, gt, 4)
        ids.append(f"i{i}")
        masks.append(tmp_path / "m" / f"i{i}.png")
    ds = WSSSDataset("t", ["a", "b", "c"], ids, masks, [[0, 2]] * 3, masks)
    res = evaluate_seeds(tmp_path / "s", ds, EvalConfig(background="channel"), progress=False)
    assert res["miou"] == pytest.approx(scores_from_confusion(conf, "all")["miou"] * 100, abs=1e-9)


def test_overrides_after_options_and_threads_anywhere(tiny_overrides, tmp_path):
    from tokenseg.cli import build_parser, main as cli_main

    assert cli_main(["train", "tiny", *tiny_overrides, "--quiet", "train.epochs=1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    with pytest.raises(SystemExit):
        cli_main(["train", "tiny", "--quiet", "--bogus"])
    assert build_parser()  # the parser builds with every method's help


def test_resuming_maps_with_other_settings_is_refused(tiny_overrides, tmp_path, capsys):
    assert main(["train", "tiny", *tiny_overrides, "train.epochs=1", "--quiet"]) == 0
    assert main(["maps", "tiny", *tiny_overrides, "--split", "val", "--quiet"]) == 0
    code = main(["maps", "tiny", *tiny_overrides, "--split", "val", "maps.scales=[1.0]", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "scales" in err and "--overwrite" in err
    assert main(["maps", "tiny", *tiny_overrides, "--split", "val", "maps.scales=[1.0]", "--overwrite",
                 "--quiet"]) == 0
    meta = json.loads((tmp_path / "run" / "seeds" / "val" / "maps_meta.json").read_text())
    assert meta["settings"]["maps.scales"] == [1.0] and meta["method"] == "mctformer-plus"


def test_training_free_method_is_refused_by_train(tmp_path):
    """A method without losses has nothing to train (CLIP-ES); the message says what to run."""
    from tokenseg.engine import train

    if "test-free" not in available_methods():
        register(Method(name="test-free", summary="no training", build=BlobNet,
                        recipe=MapRecipe(kinds=("blob",), default_kinds=("blob",), combine=_blob_combine)))
    cfg = load_config("tiny", ["model.method=test-free", "maps.kinds=[blob]", f"output_dir={tmp_path}"])
    with pytest.raises(TokensegError, match="needs no training"):
        train(cfg)


def test_tensorboard_scalars_and_seed_overlays(tiny_overrides, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "tiny", *tiny_overrides, "train.epochs=1", "train.tensorboard=true", "--quiet"]) == 0
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "lr" in tags["scalars"] and "loss/total" in tags["scalars"] and "val/mAP" in tags["scalars"]
    assert len(tags["images"]) == 4
