"""OpenImages30k reader on a tiny fixture made here in wsolevaluation's exact layout.

Layout (their README, ``prepare_openimages.sh``, ``data_loaders.py``): ``dataset/OpenImages/<split>/<mid>/
<id>.jpg`` with ``<id>_m<mid>_<instance>.png`` and ``<id>_ignore.png`` next to it; ``metadata/OpenImages/
<split>/{image_ids,class_labels,localization}.txt`` with paths relative to ``dataset/OpenImages``. The
expected masks are written out by hand here: nearest 448→224 is every second pixel (OpenCV's
``floor(x · 2)``), and the ignore region is the ignore box minus the union of the instances.
"""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenseg.config import DataConfig
from tokenseg.data import build_dataset
from tokenseg.data.openimages import OpenImagesDataset, load_openimages, read_localization
from tokenseg.core.errors import TokensegError

MIDS = ["01226z", "0138tl", "014j1m"]  # classes 0, 1, 2 (their label order: sorted MIDs)
# split, class, image id, image (h, w), mask (h, w), instance boxes (y0, y1, x0, x1), ignore box
TEST_IMAGES = [
    ("test", 1, "1cd9ac0169ec7df0", (224, 224), (448, 448),
     [(21, 201, 31, 181), (151, 401, 101, 301)], (0, 448, 0, 251)),  # odd edges: the 448->224 rule matters
    ("test", 0, "3a29f0b33894d4a6", (224, 224), (224, 224), [(50, 120, 60, 200)], (40, 224, 0, 224)),
    ("test", 2, "b4d953e7105da1d8", (448, 448), (448, 448),
     [(0, 101, 0, 448), (301, 448, 201, 421)], (81, 331, 151, 448)),
]
TRAIN_IMAGES = [("train", 0, "0a9b7df4d832baf7"), ("train", 1, "0abee225b2418fe7"), ("train", 2, "0b1c2d3e4f5a6b7c")]


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def _save_jpg(path: Path, hw, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*hw, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)


def _box(hw, box, value=255) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = value
    return m


def make_openimages(base: Path) -> dict:
    """Write the fixture under ``base``; returns paths and the expected masks."""
    root = base / "dataset" / "OpenImages"
    meta = base / "metadata" / "OpenImages"
    expected = {}
    ids, labels, loc = [], [], []
    for k, (split, c, stem, img_hw, mask_hw, boxes, ign_box) in enumerate(TEST_IMAGES):
        rel = f"{split}/{MIDS[c]}/{stem}"
        _save_jpg(root / f"{rel}.jpg", img_hw, k)
        inst = []
        for j, b in enumerate(boxes):
            m = _box(mask_hw, b, value=255 if j == 0 else 1)  # any gray > 0 is foreground (> 0.5 after reading)
            name = f"{rel}_m{MIDS[c]}_{j:08x}.png"
            _save_png(root / name, m)
            inst.append(name)
        _save_png(root / f"{rel}_ignore.png", _box(mask_hw, ign_box))
        ids.append(f"{rel}.jpg")
        labels.append(f"{rel}.jpg,{c}")
        for j, name in enumerate(inst):
            loc.append(f"{rel}.jpg,{name},{rel + '_ignore.png' if j == 0 else ''}")
        # expected: union of instances, ignore box minus foreground, at image size and at 224x224
        union = np.zeros(mask_hw, bool)
        for b in boxes:
            union |= _box(mask_hw, b) > 0
        ign = (_box(mask_hw, ign_box) > 0) & ~union
        step_img = mask_hw[0] // img_hw[0]
        step_224 = mask_hw[0] // 224
        sem = np.zeros(mask_hw, np.uint8)
        sem[ign] = 255
        sem[union] = c + 1
        expected[stem] = {"class": c, "mask": sem[::step_img, ::step_img],
                          "fg224": union[::step_224, ::step_224], "ignore224": ign[::step_224, ::step_224]}
    (meta / "test").mkdir(parents=True)
    (meta / "test" / "image_ids.txt").write_text("\n".join(ids))  # their files end without a newline
    (meta / "test" / "class_labels.txt").write_text("\n".join(labels) + "\n")
    (meta / "test" / "localization.txt").write_text("\n".join(loc) + "\n")
    (meta / "train").mkdir(parents=True)
    for k, (split, c, stem) in enumerate(TRAIN_IMAGES):
        _save_jpg(root / f"{split}/{MIDS[c]}/{stem}.jpg", (40, 60), 10 + k)
    (meta / "train" / "image_ids.txt").write_text("\n".join(f"train/{MIDS[c]}/{s}.jpg" for _, c, s in TRAIN_IMAGES))
    (meta / "train" / "class_labels.txt").write_text(
        "\n".join(f"train/{MIDS[c]}/{s}.jpg,{c}" for _, c, s in TRAIN_IMAGES))
    (meta / "train" / "localization.txt").write_text("")  # as in their repository
    return {"root": root, "meta": meta, "expected": expected}


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def oi(tmp_path):
    return make_openimages(tmp_path)


def test_reader_masks_match_the_hand_made_expectation(oi):
    before = _snapshot(oi["root"].parent.parent)
    ds = load_openimages(oi["root"], "test", oi["meta"])
    assert isinstance(ds, OpenImagesDataset)
    assert ds.ids == [t[2] for t in TEST_IMAGES]
    assert ds.labels == [[t[1]] for t in TEST_IMAGES]
    assert ds.class_names == MIDS  # class folders, consistent over train + test
    assert ds.image_paths[0] == oi["root"] / "test" / MIDS[1] / "1cd9ac0169ec7df0.jpg"
    assert ds.has_masks
    for i, image_id in enumerate(ds.ids):
        exp = oi["expected"][image_id]
        m = ds.load_mask(i)
        assert m.dtype == np.uint8 and m.shape == ds.load_image(i).size[::-1]
        np.testing.assert_array_equal(m, exp["mask"])
        fg, ign = ds.wsol_masks(i, 224)
        assert fg.shape == ign.shape == (224, 224)
        np.testing.assert_array_equal(fg, exp["fg224"])
        np.testing.assert_array_equal(ign, exp["ignore224"])
        assert not (fg & ign).any()
    sub = ds.subset([ds.ids[2]])
    assert isinstance(sub, OpenImagesDataset)
    np.testing.assert_array_equal(sub.load_mask(0), oi["expected"][ds.ids[2]]["mask"])
    assert _snapshot(oi["root"].parent.parent) == before  # nothing written into the dataset or metadata


def test_metadata_found_like_their_repository_and_build_dataset(oi):
    # <repo>/dataset/OpenImages + <repo>/metadata/OpenImages: no metadata_root needed
    cfg = DataConfig(format="openimages", root=str(oi["root"]))
    ds = build_dataset(cfg, "test")
    assert ds.ids == [t[2] for t in TEST_IMAGES] and ds.num_classes == 3
    train = build_dataset(cfg, "train")
    assert train.labels == [[0], [1], [2]] and train.class_names == MIDS
    assert train.mask_paths is None and not train.has_masks  # train has no localization
    with pytest.raises(TokensegError, match="no ground-truth mask"):
        train.load_mask(0)
    with pytest.raises(TokensegError, match=r"split must be one of .*'train_aug'"):
        build_dataset(cfg, "train_aug")
    with pytest.raises(TokensegError, match="metadata for split 'val' not found"):
        build_dataset(cfg, "val")


def test_class_names_file_list_and_mid_csv(oi, tmp_path):
    csv = tmp_path / "class-descriptions-boxable.csv"
    csv.write_text("/m/01226z,Football\n/m/0138tl,Toy\n/m/014j1m,Apple\n/m/099999,Other\n")
    ds = load_openimages(oi["root"], "test", oi["meta"], class_names_file=csv)
    assert ds.class_names == ["Football", "Toy", "Apple"]
    lst = tmp_path / "names.txt"
    lst.write_text("ball\ntoy\napple\npear\n")  # more names than labels used: the list sets C
    assert load_openimages(oi["root"], "test", oi["meta"], class_names_file=lst).num_classes == 4
    lst.write_text("ball\ntoy\n")
    labels = oi["meta"] / "test" / "class_labels.txt"
    with pytest.raises(TokensegError, match=rf"{re.escape(str(labels))}:3: class index 2 is outside 0..1"):
        load_openimages(oi["root"], "test", oi["meta"], class_names_file=lst)


def test_bad_class_label_line_names_file_and_line(oi):
    labels = oi["meta"] / "test" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",cat"
    labels.write_text("\n".join(lines))
    with pytest.raises(TokensegError, match=rf"{re.escape(str(labels))}:2: class 'cat' is not an integer"):
        load_openimages(oi["root"], "test", oi["meta"])
    lines[1] = lines[1].rsplit(",", 1)[0]  # no label field at all
    labels.write_text("\n".join(lines))
    with pytest.raises(TokensegError, match=rf"{re.escape(str(labels))}:2: expected '<image path>,<class index>'"):
        load_openimages(oi["root"], "test", oi["meta"])


def test_missing_image_and_mask_are_named_and_skippable(oi):
    img = oi["root"] / "test" / MIDS[0] / "3a29f0b33894d4a6.jpg"
    img.unlink()
    with pytest.raises(TokensegError, match=rf"{re.escape(str(img))}: image file not found"):
        load_openimages(oi["root"], "test", oi["meta"])
    ds = load_openimages(oi["root"], "test", oi["meta"], skip_bad=True)
    assert ds.ids == ["1cd9ac0169ec7df0", "b4d953e7105da1d8"]
    assert ds.meta["skipped"][0]["kind"] == "missing_image"
    mask = next((oi["root"] / "test" / MIDS[2]).glob("*_m*_00000001.png"))
    mask.unlink()
    with pytest.raises(TokensegError, match=rf"{re.escape(str(mask))}: mask file not found"):
        load_openimages(oi["root"], "test", oi["meta"])


def test_broken_metadata_lines(oi, tmp_path):
    loc = oi["meta"] / "test" / "localization.txt"
    text = loc.read_text()
    loc.write_text(text + "test/x/y.jpg,only-two-fields\n")
    with pytest.raises(TokensegError,
                       match=rf"{re.escape(str(loc))}:6: expected '<image path>,<mask path>,<ignore mask path>'"):
        load_openimages(oi["root"], "test", oi["meta"])
    lines = text.splitlines()
    lines[1] = lines[1] + "other_ignore.png"  # a second, different ignore mask for the first image
    loc.write_text("\n".join(lines))
    with pytest.raises(TokensegError, match=rf"{re.escape(str(loc))}:2: .*second ignore mask"):
        load_openimages(oi["root"], "test", oi["meta"])
    ids = oi["meta"] / "test" / "image_ids.txt"
    ids.write_text(ids.read_text() + "\n" + ids.read_text().splitlines()[0])
    with pytest.raises(TokensegError, match=rf"{re.escape(str(ids))}:4: image .* listed twice \(first on line 1\)"):
        load_openimages(oi["root"], "test", oi["meta"])
    with pytest.raises(TokensegError, match="no image_ids.txt in"):
        load_openimages(oi["root"], "test", tmp_path / "nowhere")


def test_localization_without_ignore_mask(tmp_path):
    f = tmp_path / "localization.txt"
    f.write_text("a/b/c.jpg,a/b/c_m1.png,\na/b/c.jpg,a/b/c_m2.png,\r\n")
    assert read_localization(f) == {"a/b/c.jpg": (["a/b/c_m1.png", "a/b/c_m2.png"], None)}


def test_exif_rotated_image_turns_its_masks(oi):
    """tokenseg loads images EXIF-turned (load_rgb), so the masks are turned the same way."""
    ds = load_openimages(oi["root"], "test", oi["meta"])
    i = 2  # 448x448 image: rotate its file content to a non-square one with an EXIF orientation
    path = ds.image_paths[i]
    rgb = np.zeros((448, 300, 3), np.uint8)
    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be turned 90° clockwise for display
    img.save(path, format="JPEG", exif=exif.tobytes())
    shown = ds.load_image(i)
    assert shown.size == (448, 300)  # (w, h) after the turn
    m = ds.load_mask(i)
    assert m.shape == (300, 448)
    # masks are stored in the file's pixel grid (448x448 here): turned, then resized to the shown size
    stored = oi["expected"][ds.ids[i]]["mask"]
    turned = np.rot90(stored, k=-1)
    rows = np.floor(np.arange(300) * (1.0 / (300 / 448))).astype(int)
    np.testing.assert_array_equal(m, turned[rows])
    assert os.path.getsize(path) > 0
