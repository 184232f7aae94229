"""CLIP-ES as a method: `tokenseg maps/evaluate/run clip-es` with no checkpoint, on a tiny random CLIP
saved to a file (the fixture reproduction itself is tests/test_clip_es.py)."""
import json

import numpy as np
import pytest
import torch

from tokenseg.cli import main
from tokenseg.core.seeds import load_seed

open_clip = pytest.importorskip("open_clip")

TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 64, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


@pytest.fixture
def clip_file(tmp_path):
    torch.manual_seed(0)
    m = open_clip.model.CLIP(TINY_CFG["embed_dim"], TINY_CFG["vision_cfg"], TINY_CFG["text_cfg"], quick_gelu=True)
    path = tmp_path / "tiny_clip.pt"
    torch.save(m.state_dict(), path)
    return path


def test_maps_evaluate_and_run_need_no_checkpoint(clip_file, tmp_path, capsys):
    over = ["data.format=synthetic", "data.train_split=train", "data.val_split=val", "data.num_workers=0",
            "data.synthetic={num_classes: 3, image_size: 48, train_images: 8, val_images: 6, seed: 1}",
            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", f"model.pretrained={clip_file}",
            "maps.split=val", "eval.split=val", "maps.kinds=[caa, gradcam]", "clip_es.export_npy=true"]
    assert main(["maps", "clip-es", *over, "--quiet"]) == 0
    seeds = tmp_path / "run" / "seeds" / "val"
    meta = json.loads((seeds / "maps_meta.json").read_text())
    assert meta["method"] == "clip-es" and meta["checkpoint"] == "" and meta["background"] == "power"
    for f in sorted((seeds / "caa").glob("*.npz")):
        s, g = load_seed(f), load_seed(seeds / "gradcam" / f.name)
        assert s.maps.shape[1:] == (48, 48) and list(s.classes) == list(g.classes)
        if len(s.classes):
            # min-max on the token grid, then resized to the image (as theirs): within [0, 1]
            assert float(s.maps.max()) <= 1.0 + 1e-3 and float(s.maps.min()) >= 0
    assert len(list((seeds / "npy").glob("*.npy"))) == 6
    # text features are cached per (weights, prompt, classes)
    assert len(list((tmp_path / "cache" / "clip_text").glob("*.npz"))) == 2
    capsys.readouterr()
    assert main(["evaluate", "clip-es", *over, "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["caa"]
    assert res["background"] == "power" and res["alpha"] in (1.0, 2.0) and set(res["curve"]) == {"alpha=1.0",
                                                                                                "alpha=2.0"}
    assert main(["run", "clip-es", *over, "--quiet"]) == 0  # no training: straight to maps (done) and evaluate
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_says_there_is_nothing_to_train(clip_file, tmp_path, capsys):
    assert main(["train", "clip-es", f"model.pretrained={clip_file}", f"output_dir={tmp_path}", "--quiet"]) == 2
    assert "needs no training" in capsys.readouterr().err


def test_missing_weights_say_what_to_set(tmp_path, capsys):
    code = main(["maps", "clip-es", "data.format=synthetic", f"data.cache_dir={tmp_path / 'c'}",
                 "data.synthetic={num_classes: 3, image_size: 48, train_images: 8, val_images: 6, seed: 1}",
                 "model.pretrained=/nonexistent/ViT-B-16.pt", "--split", "val", "--quiet"])
    assert code == 2 and "ViT-B-16.pt" in capsys.readouterr().err


def test_clip_es_code_crf_image_wraps_like_their_uint8_cast():
    from tokenseg.refine.pseudo import CLIP_ES_MEAN_BGR, crf_image

    img = np.array([[[10, 200, 120], [255, 0, 104]]], np.uint8)  # RGB
    got = crf_image(img, "clip-es-code")
    bgr = img[..., ::-1].astype(np.float32) - np.array(CLIP_ES_MEAN_BGR, np.float32)
    # C's float -> uint8 conversion (what numpy's astype does on x86): truncate toward zero, keep 8 bits
    want = np.array([[[int(v) % 256 for v in px] for px in row] for row in bgr], np.uint8)
    assert np.array_equal(got, want) and got[0, 1, 0] == 0  # 104 - 104.008 -> -0.008 -> 0
    assert crf_image(img, "rgb") is img


def test_their_npy_seeds_are_read_by_evaluate(tmp_path):
    """CLIP-ES's {keys, attn_highres} files load as seeds (restricted unpickling)."""
    from tokenseg.methods.clip_es.files import save_clip_es_npy

    maps = np.random.default_rng(0).random((2, 5, 6)).astype(np.float16)
    save_clip_es_npy(tmp_path / "a.npy", np.array([3, 7]), maps)
    s = load_seed(tmp_path / "a.npy")
    assert list(s.classes) == [3, 7] and np.array_equal(s.maps, maps.astype(np.float32))


# ------------------------------------------------------------------ the default path, through the CLI
def test_cli_default_path_reproduces_the_authors_cams(tmp_path):
    """`tokenseg maps clip-es` as a user runs it — the preset's defaults, no maps key — on the authors'
    fixture laid out as a folder dataset, with their weights and their text features placed in the text
    cache (the fixture has no text tower): the `caa` seeds equal their `attn_highres` to 1e-5."""
    import shutil
    from pathlib import Path

    from authors_weights import authors_weights
    from tokenseg.methods.clip_es.prompts import background_words
    from tokenseg.models.clip import load_clip
    from tokenseg.models.clip_ops import text_cache_path

    fx = Path(__file__).parent / "fixtures" / "authors-clip-es"
    weights = authors_weights("authors-clip-es/visual_state_dict.pth")
    spec = json.loads((fx / "labels.json").read_text())
    text = np.load(fx / "text_features.npz")
    root = tmp_path / "data"
    shutil.copytree(fx / "images", root / "images")
    (root / "classes.txt").write_text("\n".join(spec["classes"]) + "\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(
        f"{i},{';'.join(spec['classes'][c] for c in labs)}\n" for i, labs in sorted(spec["labels"].items())))
    bg_names = [str(w) for w in text["bg_names"]]
    assert bg_names == background_words("custom")  # the preset's default words for a dataset of one's own
    model, cache, template = load_clip(weights), tmp_path / "cache", "a clean origami {}."
    for names, feats in ((spec["classes"], text["fg"]), (bg_names, text["bg"])):
        path = text_cache_path(model, names, [template], cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=feats, names=np.array(json.dumps(names)), templates=np.array(json.dumps([template])))
    over = ["data.format=folder", f"data.root={root}", "data.num_workers=0", f"data.cache_dir={cache}",
            f"output_dir={tmp_path / 'run'}", f"model.pretrained={weights}", "maps.split=all"]
    assert main(["maps", "clip-es", *over, "--quiet"]) == 0
    ref = dict(np.load(fx / "cams.npz"))
    for image_id, labs in spec["labels"].items():
        seed = load_seed(tmp_path / "run" / "seeds" / "all" / "caa" / f"{image_id}.npz")
        order = [list(ref[f"{image_id}/keys"]).index(c) for c in seed.classes]  # ours ascending, theirs as fed
        assert sorted(seed.classes.tolist()) == sorted(labs)
        np.testing.assert_allclose(seed.maps, ref[f"{image_id}/attn_highres"][order], atol=1e-5, rtol=0)
