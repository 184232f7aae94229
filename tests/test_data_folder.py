"""Your own images (data.format=folder): CSV/JSON labels, splits, class names, masks; and every image
kind a user throws at it (grayscale, RGBA, CMYK, 16-bit, EXIF-rotated, tiny, truncated, corrupt,
non-ASCII names)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import build_dataset, check_dataset, load_folder
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import save_palette_png

CLASSES = ["cat", "dog", "traffic light"]
ROWS = [  # file, labels cell, split
    ("cats/chat_été.jpg", "cat", "train"),
    ("dogs/犬.png", "dog;cat", "train"),
    ("gray.jpg", "traffic light", "train"),
    ("rotated.jpg", "dog", "train"),
    ("cmyk.jpg", "dog", "val"),
    ("deep.png", "cat|traffic light", "val"),
    ("tiny.png", "cat", "val"),
    ("empty.jpg", "", "val"),
]


def _exif_rotated(path: Path) -> None:
    img = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3)))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(path, exif=exif.tobytes(), quality=95)


def make_folder(base: Path) -> Path:
    root = base / "my data ünï"
    im = root / "images"
    for d in ("cats", "dogs"):
        (im / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(im / "cats" / "chat_été.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(im / "dogs" / "犬.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(im / "gray.jpg")
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(im / "cmyk.jpg")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(im / "deep.png")
    _exif_rotated(im / "rotated.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(im / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(im / "empty.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(im / "unlabelled.jpg")
    (im / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text("image,labels,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in ROWS),
                                     encoding="utf-8")
    (root / "classes.txt").write_text("# class order\nbackground\n" + "\n".join(CLASSES) + "\n")
    (root / "masks" / "cats").mkdir(parents=True)
    m = np.zeros((30, 40), np.uint8)
    m[5:20, 5:20] = 1
    m[5, 5:20] = 255
    save_palette_png(root / "masks" / "cats" / "chat_été.png", m)  # palette PNG
    g = np.zeros((30, 40), np.uint8)
    g[10:20, 10:30] = 3
    Image.fromarray(g).save(root / "masks" / "gray.png")  # plain-index PNG
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def folder(tmp_path):
    root = make_folder(tmp_path / "data")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something was written into the dataset folder"


def cfg_for(root: Path, tmp_path: Path, *extra: str):
    return load_config("mctformer-plus", ["data.format=folder", f"data.root={root}", "data.train_split=train",
                                          "data.val_split=val", f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_csv_labels_splits_classes_masks(folder, tmp_path):
    train = build_dataset(cfg_for(folder, tmp_path).data, "train")
    assert train.class_names == CLASSES  # 'background' line and comment dropped
    assert train.ids == ["cats/chat_été", "dogs/犬", "gray", "rotated"]
    assert train.labels == [[0], [0, 1], [2], [1]]
    assert train.label_source == "file:labels.csv"
    assert train.image_paths[1].name == "犬.png"
    assert [p is not None for p in train.mask_paths] == [True, False, True, False]
    assert set(np.unique(train.load_mask(0))) == {0, 1, 255} and set(np.unique(train.load_mask(2))) == {0, 3}
    assert train.meta["unlabelled_images"] == ["unlabelled"]
    val = load_folder(folder, "val")
    assert val.labels[-1] == [] and val.ids[-1] == "empty"  # no foreground class is allowed
    assert len(load_folder(folder, "all")) == len(ROWS)
    with pytest.raises(TokensegError, match="no image in split 'test'; splits: train, val, all"):
        load_folder(folder, "test")


def test_every_image_kind_loads_as_rgb(folder):
    ds = load_folder(folder, "all")
    sizes = {}
    for i in range(len(ds)):
        img = ds.load_image(i)
        assert img.mode == "RGB"
        sizes[ds.ids[i]] = img.size
    assert sizes["rotated"] == (20, 40)  # EXIF orientation applied
    assert sizes["tiny"] == (8, 8) and sizes["deep"] == (40, 30) and sizes["cmyk"] == (40, 30)
    deep = np.asarray(ds.load_image(ds.index_of("deep")))
    assert deep.max() > 200 and deep[0, 0, 0] == 0  # 16-bit range mapped to 8 bits, not clipped
    rot = np.asarray(ds.load_image(ds.index_of("rotated")))[:, :, 0].astype(int)
    assert rot[-1].mean() > rot[0].mean() + 100  # the bright (right) edge is now at the bottom


def test_check_reports_modes_sizes_and_leftovers(folder, tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = main(["data", "check", "mctformer-plus", "data.format=folder", f"data.root={folder}",
               "data.train_split=train", "data.val_split=val", f"data.cache_dir={tmp_path / 'c'}",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    rep = json.loads(out.read_text())
    val, train = rep["splits"]["val"], rep["splits"]["train"]
    assert val["modes"]["CMYK"] == 1 and val["modes"]["RGB"] == 2 and set(val["modes"]) & {"I;16", "I"}
    assert train["exif_rotated"] == 1 and train["modes"]["RGBA"] == 1 and train["modes"]["L"] == 1
    assert val["small_image_count"] == 1 and val["small_images"][0]["id"] == "tiny"
    assert val["no_foreground"] == 1 and val["no_foreground_ids"] == ["empty"]
    assert rep["images_without_labels"] == ["unlabelled"]
    assert any("smaller than one 16-pixel patch" in w for w in rep["warnings"])
    assert "images without labels: 1 (e.g. unlabelled)" in text


def test_truncated_and_corrupt_images(tmp_path, capsys):
    root = make_folder(tmp_path / "d")
    im = root / "images"
    good = (im / "empty.jpg").read_bytes()
    (im / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (im / "junk.jpg").write_bytes(b"\x00not a picture" * 10)
    with open(root / "labels.csv", "a", encoding="utf-8") as f:
        f.write("trunc.jpg,cat,train\njunk.jpg,dog,train\n")
    ds = load_folder(root, "train")  # without skip_bad nothing is decoded up front ...
    with pytest.raises(TokensegError, match=r"trunc\.jpg: cannot read image"):
        ds.load_image(ds.index_of("trunc"))  # ... and reading names the file
    with pytest.raises(TokensegError, match=r"junk\.jpg: cannot read image"):
        ds.load_image(ds.index_of("junk"))
    skipped = build_dataset(cfg_for(root, tmp_path, "data.skip_bad=true").data, "train")
    assert "trunc" not in skipped.ids and "junk" not in skipped.ids and len(skipped) == 4
    assert {s["id"] for s in skipped.meta["skipped"]} == {"trunc", "junk"}
    assert "skipping 2 image(s)" in capsys.readouterr().err
    args = ["data", "check", "mctformer-plus", "data.format=folder", f"data.root={root}", "data.train_split=train",
            "data.val_split=val", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "trunc.jpg: cannot read image" in text and "junk.jpg: cannot read image" in text
    assert "6 images listed, 4 usable" in text
    assert main(args + ["--skip-bad"]) == 0
    assert main(args + ["--fast"]) == 1  # a header read still finds the junk file


def test_label_file_errors_name_file_and_line(tmp_path):
    root = make_folder(tmp_path / "d")
    lab = root / "labels.csv"
    lab.write_text("image,labels,split\ngray.jpg,cat,train\ntiny.png,catt,train\n")
    with pytest.raises(TokensegError, match=r"labels\.csv:3: image 'tiny' has unknown class 'catt'"):
        load_folder(root, "train")
    lab.write_text("image,labels,split\ngray.jpg,cat,train\ngray.jpg,dog,val\n")
    with pytest.raises(TokensegError, match=r"labels\.csv:3: image 'gray' is listed twice \(first on line 2\)"):
        load_folder(root, "train")
    lab.write_text("image,labels,split\ngray.jpg,cat,train,extra\n")
    with pytest.raises(TokensegError, match=r"labels\.csv:2: expected 3 columns"):
        load_folder(root, "train")
    lab.write_text("image,labels,split\nnope.jpg,cat,train\n")
    with pytest.raises(TokensegError, match=r"nope\.jpg: image file not found"):
        load_folder(root, "train")
    lab.unlink()
    js = root / "labels.json"
    js.write_text('{"labels": {"gray.jpg": ["cat"], "gray": ["dog"]}}')
    with pytest.raises(TokensegError, match="listed twice"):
        load_folder(root, "all")


def test_multi_hot_json_split_lists_and_masks_as_labels(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "labels.csv").write_text("filename,cat,dog,traffic light\ngray.jpg,0,1,1\nempty.jpg,0,0,0\n")
    (root / "classes.txt").unlink()
    with pytest.raises(TokensegError, match="class order must be declared"):
        load_folder(root, "all", mask_dir="nomasks", label_source="masks")
    (root / "masks").rename(root / "gt")
    ds = load_folder(root, "all")  # class order from the multi-hot header, no masks folder any more
    assert ds.class_names == CLASSES and ds.labels == [[1, 2], []] and ds.label_source == "file:labels.csv"
    (root / "splits").mkdir()
    (root / "splits" / "mine.txt").write_text("empty.jpg\n")
    assert load_folder(root, "mine").ids == ["empty"]
    with pytest.raises(TokensegError, match=r"splits/train\.txt: split list not found.*data\.train_split=all"):
        load_folder(root, "train")
    (root / "labels.csv").unlink()
    (root / "classes.txt").write_text("\n".join(CLASSES))
    ds = load_folder(root, "all", mask_dir="gt")  # no labels file: read off the masks
    assert ds.ids == ["cats/chat_été", "gray"] and ds.labels == [[0], [2]]
    assert ds.label_source == "masks:gt"
    (root / "labels.json").write_text(json.dumps({"classes": ["a", "b"], "labels": {"gray": ["b"]},
                                                  "splits": {"train": ["gray"]}}))
    (root / "classes.txt").unlink()
    ds = load_folder(root, "train", mask_dir="none")
    assert ds.class_names == ["a", "b"] and ds.labels == [[1]]


def test_mask_value_above_class_count_is_reported(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = np.full((30, 40), 7, np.uint8)
    save_palette_png(root / "masks" / "gray.png", bad)
    rep = check_dataset(cfg_for(root, tmp_path), ["train"])
    assert not rep["ok"]
    assert any("gray.png: mask values [7] exceed the class count 3" in e for e in rep["errors"])


def test_python_m_tokenseg_data_check_and_labels(folder, tmp_path):
    import subprocess
    import sys

    common = ["mctformer-plus", "data.format=folder", f"data.root={folder}", "data.train_split=train",
              "data.val_split=val", f"data.cache_dir={tmp_path / 'c'}"]
    r = subprocess.run([sys.executable, "-m", "tokenseg", "data", "check", *common, "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "split train: 4 images; labels from file:labels.csv" in r.stdout and "RESULT: OK" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["ok"]
    out = tmp_path / "labels.json"
    r = subprocess.run([sys.executable, "-m", "tokenseg", "data", "labels", *common, "--split", "all", "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["labels"]["dogs/犬"] == ["cat", "dog"] and doc["classes"] == CLASSES
    r = subprocess.run([sys.executable, "-m", "tokenseg", "data", "check", *common[:-1], "data.root=/nonexistent"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "/nonexistent is not a folder" in r.stdout
