"""A newcomer's own photos, end to end, as printed (issue 25): the commands the README and the tools print
run as printed; errors about splits name the setting; every mIoU says which classes it averages and two
commands agree on the same masks; warnings for settings that run but are rarely meant; what a user
looks at (overlay legend, the Python API block, ``ds[i]``)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import load_config

from test_data_import import make_yolo
from test_post_common import make_toy_voc, seeds_from_masks, toy_overrides

ROOT = Path(__file__).resolve().parents[1]


def tokenseg(args: list[str], cwd: Path, extra_env: dict | None = None, timeout: int = 300):
    """``python -m tokenseg ARGS`` as a user runs it (the checkout's source first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENSEG_CACHE": str(cwd / "cache"),
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "tokenseg", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def printed(out: str, prefix: str) -> list[str]:
    """The arguments of a ``prefix tokenseg ...`` line the tool printed (everything before two spaces)."""
    line = next(ln for ln in out.splitlines() if ln.startswith(prefix))
    return shlex.split(line[len(prefix):].split("   (")[0])[1:]


# ------------------------------------------------------------------------- own data, as printed
def test_yolo_import_next_steps_run_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENSEG_CACHE", str(tmp_path / "cache"))
    src = make_yolo(tmp_path)
    (src / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # a label file without image
    assert main(["data", "import", "--from", "yolo", "yolo", "--out", "my data", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 label file(s) have no image" in out and "ghost.txt" in out
    assert "1 image(s) have no label file" in out
    assert main(printed(out, "next: ")) == 0, capsys.readouterr()  # the path has a space: quoted as printed
    # the line the issue printed: a VOC preset pointed at the folder, its stage splits follow the dataset's
    assert main(["data", "check", "mctformer-plus", "data.format=folder", "data.root=my data",
                 "data.train_split=train", "data.val_split=val", "--quiet"]) == 0
    run = printed(out, "then: ")
    assert run[:2] == ["run", "photos-scratch"]
    capsys.readouterr()
    # as printed, but one short epoch on these four images
    assert main(run + ["train.epochs=1", "train.batch_size=2", "--quiet"]) == 0
    res = capsys.readouterr()
    assert "train.epochs=1 <= train.warmup_epochs=2" in res.err  # said, not silent
    assert "3 of the 4 images" in res.out and "fused (attention x PatchCAM)" in res.out  # b has a box only
    assert "eval.miou_classes=all" in res.out


def test_stage_splits_follow_the_dataset_unless_set():
    over = ["data.format=folder", "data.root=x", "data.train_split=train2017", "data.val_split=val2017"]
    cfg = load_config("mctformer-plus", over)
    assert (cfg.maps.split, cfg.eval.split) == ("train2017", "train2017")  # VOC's seed split -> the training images
    cfg = load_config("demo", over)
    assert (cfg.maps.split, cfg.eval.split, cfg.pseudo.split) == ("val2017", "val2017", "train2017")
    cfg = load_config("mctformer-plus", over + ["eval.split=val2017"])  # set: kept
    assert (cfg.maps.split, cfg.eval.split) == ("train2017", "val2017")
    cfg = load_config("mctformer-plus", ["data.train_split=/x/train_aug.txt"])  # same format: the preset's own
    assert cfg.maps.split == "train"


def test_split_errors_name_the_setting_and_folder_layout_is_suggested(tmp_path, capsys):
    root = make_toy_voc(tmp_path / "voc", n_train=2, n_val=2)
    ov = toy_overrides(root, tmp_path)
    seeds_from_masks(root, tmp_path / "run" / "seeds" / "val" / "fused_affinity", "val")
    assert main(["evaluate", "mctformer-plus", *ov, "eval.split=nosuch", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "eval.split or the --split option" in err
    assert main(["maps", "mctformer-plus", *ov, "--split", "nosuch", "--quiet"]) == 2
    assert "maps.split or the --split option" in capsys.readouterr().err
    # a folder dataset (labels.csv) read with a preset of another format: say data.format=folder
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(mine / "images" / "a.jpg")
    (mine / "labels.csv").write_text("image,labels\na.jpg,cat\n")
    for preset in ("demo", "mctformer-plus"):
        assert main(["data", "check", preset, f"data.root={mine}"]) == 1
        assert "add data.format=folder" in capsys.readouterr().out


# ------------------------------------------------------------------------- numbers that agree
def test_pseudo_split_seed_folders_and_one_miou_rule(tmp_path, capsys):
    root = make_toy_voc(tmp_path / "voc", n_train=2, n_val=3, seed=1)
    labels = json.loads((root / "labels.json").read_text())
    labels["classes"] = ["box", "disc", "cat"]  # a class with no ground truth anywhere: the rules differ on it
    (root / "labels.json").write_text(json.dumps(labels))
    ov = toy_overrides(root, tmp_path)  # maps.split=train, but the seeds below are of val
    seeds_from_masks(root, tmp_path / "run" / "seeds" / "val" / "fused_affinity", "val")
    assert main(["pseudo", "mctformer-plus", *ov, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "val/fused_affinity" in err and "pseudo.split" in err and "--split" in err
    scores = {}
    for rule in ("all", "gt"):
        # thresholded masks (the preset's AffinityNet step is not what this checks)
        common = ["mctformer-plus", *ov, f"eval.miou_classes={rule}", "pseudo.refine=none", "--quiet"]
        assert main(["pseudo", *common, "--split", "val", "--eval", "--overwrite", "pseudo.threshold=0.3"]) == 0
        a = capsys.readouterr().out
        assert main(["evaluate", *common, "--split", "val", "--masks", str(tmp_path / "run" / "pseudo")]) == 0
        b = capsys.readouterr().out
        miou = [float(re.search(r"mIoU (\d+\.\d+)", t).group(1)) for t in (a, b)]
        assert miou[0] == miou[1]  # the same masks, the same number
        assert f"eval.miou_classes={rule}" in a and f"eval.miou_classes={rule}" in b
        scores[rule] = miou[0]
    assert "mean over the 3 of 4 classes present in the ground truth" in b
    # hand check: 'all' averages the same IoUs plus a 0 for the class never seen
    assert scores["all"] == pytest.approx(scores["gt"] * 3 / 4, abs=0.01)


# ------------------------------------------------------------------------- say what is happening
def test_offline_download_fails_fast_naming_the_file(tmp_path):
    make_toy = make_yolo(tmp_path)
    assert main(["data", "import", "--from", "yolo", str(make_toy), "--out", str(tmp_path / "mine"), "--quiet"]) == 0
    t0 = time.time()
    r = tokenseg(["train", "photos", f"data.root={tmp_path / 'mine'}", "train.batch_size=2", "--quiet"], tmp_path,
                 {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")})
    assert r.returncode == 2 and time.time() - t0 < 60
    assert "deit_small_patch16_224-cd65a155.pth" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "model.pretrained=/path/to/" in r.stderr and "Traceback" not in r.stderr


def test_a_paper_recipe_from_random_weights_is_said(tmp_path, capsys):
    root = make_toy_voc(tmp_path / "voc", n_train=2, n_val=1)
    ov = toy_overrides(root, tmp_path) + ["model.img_size=32", "train.batch_size=2", "train.max_steps=1",
                                          "train.eval_every=0", "model.backbone=vit_tiny_patch16_224"]
    assert main(["train", "mctformer-plus", *ov, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "model.pretrained is false: vit_tiny_patch16_224 starts from random weights" in err
    assert "model.pretrained=/path/to/" in err and "photos-scratch" in err
    assert "train.epochs" not in err  # 45 epochs, 5 of warm-up: nothing to say


def test_clip_es_runs_on_a_random_tower_labelled_as_such(tmp_path, capsys):
    pytest.importorskip("open_clip")
    ov = ["data.format=synthetic", "data.train_split=train", "data.val_split=val", "data.num_workers=0",
          "data.synthetic={num_classes: 2, image_size: 32, train_images: 2, val_images: 2, seed: 1}",
          f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "model.pretrained=random",
          "model.backbone=ViT-S-16", "maps.split=val"]
    assert main(["maps", "clip-es", *ov, "--quiet"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "seeds" / "val" / "maps_meta.json").read_text())
    assert meta["weights"].startswith("RANDOM weights") and "ViT-S-16" in meta["weights"]


def test_segment_train_scores_quickly_by_default_and_says_so(tmp_path, capsys):
    root = make_toy_voc(tmp_path / "voc", n_train=3, n_val=2)
    ov = toy_overrides(root, tmp_path)
    masks = root / "SegmentationClass"
    seg = ["segment.backbone=resnet10t", "segment.epochs=1", "segment.batch_size=2", "segment.crop_size=32",
           "segment.num_workers=0", "segment.eval_scales=[0.5,1.0]"]
    assert main(["segment", "train", "demo", *ov, *seg, "--masks", str(masks), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "scoring 2 images of split 'val' at scales [1.0] (segment.final_eval=quick" in out


# ------------------------------------------------------------------------- what people look at
def test_predict_overlay_names_the_colours(tmp_path):
    from tokenseg.core.masks import voc_palette
    from tokenseg.core.viz import class_legend, with_legend

    img = np.full((300, 400, 3), 90, np.uint8)
    legend = class_legend([0, 2], ["cat", "dog"])
    assert [n for n, _ in legend] == ["background", "dog"]
    out = with_legend(img, legend)
    assert out.shape[1] == 400 and out.shape[0] > 300 and (out[:300] == img).all()
    band = out[300:].reshape(-1, 3)
    assert (band == voc_palette()[2]).all(-1).any()  # dog's swatch is drawn in dog's mask colour


def test_dataset_is_indexable(tmp_path):
    from tokenseg.data import build_dataset

    root = make_toy_voc(tmp_path / "voc", n_train=2, n_val=1)
    ds = build_dataset(load_config(None, toy_overrides(root, tmp_path)).data, "train")
    image, labels, image_id = ds[1]
    assert image_id == ds.ids[1] and image.size == (48, 48) and image.mode == "RGB"
    np.testing.assert_array_equal(labels, ds.multi_hot(1))
    assert ds[-1].image_id == ds.ids[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_readme_python_block_runs_as_printed(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S).group(1)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENSEG_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"seeds fused \[.*\]: mIoU \d+\.\d+ at background threshold", r.stdout)  # readable
    assert "'fused': (1, 5, 96, 96)" in r.stdout
    assert (tmp_path / "runs" / "api" / "predictions" / "predictions.json").is_file()
