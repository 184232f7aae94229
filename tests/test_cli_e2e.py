"""The core chain as a user runs it: train → maps → evaluate → run, and errors a user can make."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.engine import train
from tokenseg.data import build_dataset
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import load_seed

from floors import background_only_miou


def test_train_maps_evaluate_cli(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", *tiny_overrides, "--quiet"]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_map" in r for r in records)
    assert main(["maps", "tiny", *tiny_overrides, "--split", "val", "--quiet"]) == 0
    seeds = run / "seeds" / "val"
    kinds = sorted(p.name for p in seeds.iterdir() if p.is_dir())
    assert kinds == sorted(["attention", "attention_affinity", "patchcam", "fused", "fused_affinity"])
    files = sorted((seeds / "fused").glob("*.npz"))
    assert len(files) == 16
    s = load_seed(files[0])
    assert s.maps.dtype == np.float32 and s.maps.shape[1:] == (48, 48)  # as computed (the authors: float32)
    if len(s.classes):
        assert s.maps.max() == pytest.approx(1.0, abs=1e-3) and s.maps.min() >= 0
    assert not list(seeds.rglob("*.tmp"))
    capsys.readouterr()
    assert main(["evaluate", "tiny", *tiny_overrides, "--split", "val", "--json", str(tmp_path / "e.json"),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    # one compact line per kind and the classes the mIoU averages; every class's IoU only with --per-class
    # (and always in the JSON)
    assert "mIoU" in printed and not re.search(r"^\s+background\s+[\d.]+$", printed, re.M)
    assert len(printed.strip().splitlines()) == 3 + len(kinds) and "eval.miou_classes=all" in printed
    assert main(["evaluate", "tiny", *tiny_overrides, "--split", "val", "--per-class", "--quiet"]) == 0
    assert "background" in capsys.readouterr().out
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res) == set(kinds)
    for r in res.values():
        assert 0 <= r["miou"] <= 100 and len(r["iou"]) == 4 and len(r["curve"]) == 100
    # two epochs on 48 images: the best seeds beat background everywhere (measured 23.7 vs 21.9)
    floor = background_only_miou(build_dataset(load_config("tiny", tiny_overrides).data, "val"))
    assert max(r["miou"] for r in res.values()) > floor + 1, (floor, {k: r["miou"] for k, r in res.items()})


def test_maps_resume_skips_existing(tiny_overrides, tmp_path):
    cfg = load_config("tiny", tiny_overrides + ["maps.kinds=[fused]", "train.max_steps=2"])
    ckpt = train(cfg, progress=False)
    from tokenseg.pipeline import maps_step

    out = maps_step(cfg, checkpoint=ckpt, split="val", progress=False)
    f = sorted((out / "fused").glob("*.npz"))[0]
    before = f.stat().st_mtime_ns
    f2 = sorted((out / "fused").glob("*.npz"))[1]
    f2.unlink()
    maps_step(cfg, checkpoint=ckpt, split="val", progress=False)
    assert f.stat().st_mtime_ns == before and f2.is_file()


def test_killed_and_resumed_training_matches_uninterrupted(tiny_overrides, tmp_path):
    common = ["train.epochs=2", "train.checkpoint_every=2", "model.drop_path=0.1"]
    a = load_config("tiny", tiny_overrides + common + [f"output_dir={tmp_path / 'a'}"])
    b = load_config("tiny", tiny_overrides + common + [f"output_dir={tmp_path / 'b'}"])
    train(a, progress=False)

    def kill(step, _):
        if step == 5:  # dies after step 5; the last checkpoint is from step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, progress=False, on_step=kill)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 4
    train(b, resume=True, progress=False)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 12
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_unknown_config_key_is_named(capsys):
    assert main(["train", "tiny", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch" in err and "train.epochs" in err
    with pytest.raises(TokensegError, match="model.pooling"):
        load_config("tiny", ["model.pooling=avg"])
    with pytest.raises(TokensegError, match="expects int"):
        load_config("tiny", ["train.epochs=lots"])


def test_checkpoint_from_another_model_is_a_clear_error(tiny_overrides, tmp_path, capsys):
    cfg = load_config("tiny", tiny_overrides + ["train.max_steps=1"])
    ckpt = train(cfg, progress=False)
    state = torch.load(ckpt, weights_only=False)
    state["model"]["cls_tokens"] = torch.zeros(1, 7, 32)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "seeds_bad"
    assert main(["maps", "tiny", *tiny_overrides, "--checkpoint", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "cls_tokens" in err
    assert not out.exists()


def test_corrupt_image_names_the_file_and_leaves_no_partial_output(tiny_overrides, tmp_path, capsys):
    cfg = load_config("tiny", tiny_overrides + ["train.max_steps=1"])
    ckpt = train(cfg, progress=False)
    # a private copy of the dataset with one truncated image
    from tokenseg.data import build_dataset
    import shutil

    ds = build_dataset(cfg.data, "val")
    root = Path(ds.image_paths[0]).parents[1]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = copy / "JPEGImages" / f"{ds.ids[3]}.jpg"
    victim.write_bytes(victim.read_bytes()[:40])
    out = tmp_path / "seeds"
    code = main(["maps", "tiny", *tiny_overrides, f"data.root={copy}", "--checkpoint", str(ckpt),
                 "--split", "val", "--out", str(out), "--quiet"])
    assert code == 2
    assert victim.name in capsys.readouterr().err
    assert not list(out.rglob("*.tmp"))


def test_evaluate_masks_cli_scores_ground_truth_as_perfect(tiny_overrides, tmp_path, capsys):
    import shutil

    from tokenseg.data import build_dataset

    ds = build_dataset(load_config("tiny", tiny_overrides).data, "val")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, p in enumerate(ds.mask_paths):
        shutil.copy(p, masks / f"{ds.ids[i]}.png")
    out = tmp_path / "m.json"
    assert main(["evaluate", "tiny", *tiny_overrides, "--masks", str(masks), "--split", "val",
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["miou"] == pytest.approx(100.0)
    assert "mIoU 100.00" in capsys.readouterr().out


def test_overlays_are_written_with_the_seeds(tiny_overrides, tmp_path):
    from PIL import Image

    cfg = load_config("tiny", tiny_overrides + ["train.max_steps=1", "maps.kinds=[fused]", "maps.overlays=true"])
    ckpt = train(cfg, progress=False)
    from tokenseg.pipeline import maps_step

    out = maps_step(cfg, checkpoint=ckpt, split="val", progress=False)
    pngs = sorted((out / "fused_overlays").glob("*.png"))
    assert len(pngs) == 16
    with Image.open(pngs[0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_pretrained_weights_offline_error_and_local_file(tmp_path, monkeypatch):
    import timm

    from tokenseg.config import ModelConfig
    from tokenseg.methods.mctformer.model import build_model

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", backbone_kwargs=kwargs, img_size=32, pretrained=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokensegError, match="model.pretrained"):
        build_model(cfg, 3)
    # a local ImageNet-style checkpoint (wrapped in 'model', with a classifier head) works offline
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict()}, path)
    cfg.pretrained = str(path)
    m = build_model(cfg, 3)
    assert torch.equal(m.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    # the papers' init: every class token is a copy of the pretrained class token
    assert torch.equal(m.cls_tokens[0, 2], ref.cls_token[0, 0])
    cfg.pretrained = str(tmp_path / "missing.pth")
    with pytest.raises(TokensegError, match="missing.pth"):
        build_model(cfg, 3)


def test_authors_mode_cli_exports_npy_that_evaluate_reads(tiny_overrides, tmp_path):
    cfg = load_config("tiny", tiny_overrides + ["train.max_steps=1"])
    train(cfg, progress=False)
    out = tmp_path / "npy"
    args = ["tiny", *tiny_overrides, "maps.mode=authors", "maps.kinds=[fused_affinity]"]
    assert main(["maps", *args, "--split", "val", "--out", str(out), "--export-npy", "--quiet"]) == 0
    files = sorted((out / "fused_affinity").glob("*.npy"))
    assert len(files) == 16
    d = np.load(files[0], allow_pickle=True).item()  # their format: {class_index: H×W float}
    assert all(v.shape == (48, 48) for v in d.values())
    js = tmp_path / "e.json"
    assert main(["evaluate", *args, "--seeds", str(out / "fused_affinity"), "--split", "val",
                 "--json", str(js), "--quiet"]) == 0
    assert 0 <= json.loads(js.read_text())["fused_affinity"]["miou"] <= 100
    # .npy export is the authors' format only: refused on the batched path
    assert main(["maps", "tiny", *tiny_overrides, "maps.mode=tokenseg", "--split", "val", "--out",
                 str(tmp_path / "x"), "--export-npy", "--quiet"]) == 2


def test_run_cli_chains_train_maps_evaluate_and_resumes(tiny_overrides, tmp_path, capsys):
    args = ["run", "tiny", *tiny_overrides, "train.max_steps=2", "maps.kinds=[fused]", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "mIoU" in out
    seeds = tmp_path / "run" / "seeds" / "val" / "fused"
    assert len(list(seeds.glob("*.npz"))) == 16
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    assert main(args) == 0  # a second run resumes: nothing to train, seeds reused
    assert ckpt.stat().st_mtime_ns == before


def test_demo_cli_prints_the_table_and_writes_the_gallery(tmp_path, capsys):
    tiny = ["data.synthetic={num_classes: 3, image_size: 48, train_images: 48, val_images: 16, seed: 1}",
            "model.backbone_kwargs={img_size: 48, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            "model.img_size=48", "train.max_steps=3", "train.batch_size=8", f"data.cache_dir={tmp_path / 'c'}",
            "segment.epochs=1"]
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *tiny, "--quiet"]) == 0
    printed = capsys.readouterr().out
    for row in ("class-token attention", "attention + patch affinity", "PatchCAM", "fused (attention x PatchCAM)",
                "fused + patch affinity", "background everywhere", "pseudo masks", "segmentation network"):
        assert row in printed, row
    res = json.loads((out / "demo_results.json").read_text())
    assert len(res["seeds"]) == 5 and res["chain"]["seg_miou_val"] is not None
    from PIL import Image

    with Image.open(out / "gallery.png") as g:
        assert g.size[0] > 8 * 100  # input, ground truth, 5 maps, argmax
    assert "report:" in printed and (out / "report" / "index.html").is_file()  # the report, made from the run
    assert (out / "report" / "data.js").read_text().count('"id":') == 16


def test_run_makes_seeds_from_the_best_checkpoint_under_keep_best(tiny_overrides, tmp_path):
    """MMCST's selection: with train.keep_best the chain's seeds come from checkpoint_best.pt (the file
    recorded beside the seeds), without it from the last checkpoint."""
    run = tmp_path / "run"
    assert main(["run", "tiny", *tiny_overrides, "train.keep_best=true", "maps.kinds=[fused]", "--quiet"]) == 0
    assert (run / "checkpoint_best.pt").is_file()
    meta = json.loads((run / "seeds" / "val" / "maps_meta.json").read_text())
    assert meta["checkpoint"] == str(run / "checkpoint_best.pt")
    other = tmp_path / "last"
    over = [o for o in tiny_overrides if not o.startswith("output_dir")] + [f"output_dir={other}"]
    assert main(["run", "tiny", *over, "maps.kinds=[fused]", "--quiet"]) == 0
    meta = json.loads((other / "seeds" / "val" / "maps_meta.json").read_text())
    assert meta["checkpoint"] == str(other / "checkpoint.pt") and not (other / "checkpoint_best.pt").exists()
