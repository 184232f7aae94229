"""MS COCO 2014 reader: labels and masks from instance annotations (polygons, RLE crowd regions),
the cached conversion, the pure-numpy rasteriser (against pycocotools when it is installed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokenseg.data.coco as coco
from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import COCO_CLASSES, build_dataset, cache_root, load_coco
from tokenseg.data.coco import polygon_mask, rle_counts_from_string, rle_decode, semantic_mask
from tokenseg.core.errors import TokensegError

try:
    import pycocotools.mask as mask_utils
except Exception:  # optional extra
    mask_utils = None
needs_pycocotools = pytest.mark.skipif(mask_utils is None, reason="pycocotools not installed")
BACKENDS = ["numpy"] + (["pycocotools"] if mask_utils is not None else [])

H, W = 48, 64
# a subset of the COCO categories, with their real (gappy) ids, listed out of order
CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
              {"id": 1, "name": "person", "supercategory": "person"},
              {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
              {"id": 3, "name": "car", "supercategory": "vehicle"}]


def rle_encode_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros (test-side encoder)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def rle_string(counts: list[int]) -> str:
    """The compact COCO RLE string (test-side encoder, the inverse of the reader's decoder)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((ch & 0x10 == 0 and x == 0) or (ch & 0x10 and x == -1))
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def make_coco(base: Path) -> Path:
    root = base / "coco"
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    crowd = np.zeros((H, W), bool)
    crowd[30:46, 40:62] = True
    compressed = np.zeros((H, W), bool)
    compressed[2:10, 50:60] = True
    for k in range(4):
        name = f"COCO_train2014_{k + 1:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "train2014" / name)
        images.append({"id": k + 1, "file_name": name, "height": H, "width": W})
    # image 1: a person polygon, a dog polygon inside it (smaller: stays on top), a crowd of people (RLE)
    anns.append({"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 600.0,
                 "segmentation": [[4, 4, 34, 4, 34, 28, 4, 28]], "bbox": [4, 4, 30, 24]})
    anns.append({"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0, "area": 64.0,
                 "segmentation": [[10, 10, 18, 10, 18, 18, 10, 18]], "bbox": [10, 10, 8, 8]})
    anns.append({"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": float(crowd.sum()),
                 "segmentation": {"size": [H, W], "counts": rle_encode_counts(crowd)}, "bbox": [40, 30, 22, 16]})
    # image 2: a toothbrush triangle made of two polygons, a car as compressed RLE
    anns.append({"id": 4, "image_id": 2, "category_id": 90, "iscrowd": 0, "area": 100.0,
                 "segmentation": [[5, 40, 25, 40, 15, 25], [30.5, 30.5, 40.2, 30.5, 40.2, 44.7]],
                 "bbox": [5, 25, 35, 19]})
    anns.append({"id": 5, "image_id": 2, "category_id": 3, "iscrowd": 0, "area": 80.0,
                 "segmentation": {"size": [H, W], "counts": rle_string(rle_encode_counts(compressed))},
                 "bbox": [50, 2, 10, 8]})
    # image 3: only a crowd annotation (its class is in the image labels; its pixels are ignore)
    anns.append({"id": 6, "image_id": 3, "category_id": 3, "iscrowd": 1, "area": float(crowd.sum()),
                 "segmentation": {"size": [H, W], "counts": rle_encode_counts(crowd)}, "bbox": [40, 30, 22, 16]})
    # image 4: no annotation at all (left out, as in the papers' 82,081 ids)
    doc = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(doc))
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def coco_root(tmp_path):
    root = make_coco(tmp_path / "data")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something was written into the dataset folder"


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_masks_and_cache(coco_root, tmp_path, backend, monkeypatch):
    cache = tmp_path / "cache"
    ds = load_coco(coco_root, "train2014", cache, rasterizer=backend)
    assert ds.class_names == ["person", "car", "dog", "toothbrush"]  # sorted by category id
    assert ds.ids == [f"COCO_train2014_{k:012d}" for k in (1, 2, 3)]
    assert ds.labels == [[0, 2], [1, 3], [1]]
    assert ds.meta["empty_images_left_out"] == 1 and ds.label_source.startswith("coco-instances")
    m = ds.load_mask(0)
    assert m[6, 6] == 1 and m[14, 14] == 3 and m[40, 50] == 255 and m[0, 0] == 0
    assert set(np.unique(m)) == {0, 1, 3, 255}
    m2 = ds.load_mask(1)
    assert m2[5, 55] == 2 and m2[38, 15] == 4 and m2[40, 38] == 4
    assert set(np.unique(ds.load_mask(2))) == {0, 255}
    assert all(Path(p).is_relative_to(cache) for p in ds.mask_paths)
    # the second run reads the cached index and masks: no JSON parsing, no rasterising
    monkeypatch.setattr(coco, "_build_index", lambda *a: pytest.fail("cache was not used"))
    again = load_coco(coco_root, "train2014", cache, rasterizer=backend)
    assert again.ids == ds.ids and again.labels == ds.labels
    assert len(load_coco(coco_root, "train2014", cache, rasterizer=backend, keep_empty=True)) == 4


def test_build_dataset_and_cli_check(coco_root, tmp_path, capsys):
    args = ["data.format=coco", f"data.root={coco_root}", "data.train_split=train2014",
            "data.val_split=train2014", f"data.cache_dir={tmp_path / 'c'}"]
    cfg = load_config("mctformer-plus", args)
    ds = build_dataset(cfg.data, "train2014")
    assert Path(ds.mask_paths[0]).is_relative_to(cache_root(cfg.data) / "coco")
    rc = main(["data", "check", "mctformer-plus", *args, "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "split train2014: 3 images; labels from coco-instances:instances_train2014.json" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["splits"]["train2014"]["per_class"] == {"person": 1, "car": 2, "dog": 1, "toothbrush": 1}
    # a VOC preset pointed at COCO: its maps/eval split ('train') follows data.train_split
    assert list(rep["splits"]) == ["train2014"] and (cfg.maps.split, cfg.eval.split) == ("train2014", "train2014")
    assert len(list((tmp_path / "c" / "coco").iterdir())) == 1  # one conversion for both names


def test_missing_annotations_name_the_file(coco_root, tmp_path):
    with pytest.raises(TokensegError, match=r"instances_val2014\.json: COCO annotation file not found"):
        load_coco(coco_root, "val2014", tmp_path / "c")
    cfg = load_config("mctformer-plus", ["data.format=coco", f"data.root={coco_root}",
                                         f"data.cache_dir={tmp_path / 'c'}", "data.label_source=xml"])
    with pytest.raises(TokensegError, match="label_source"):
        build_dataset(cfg.data, "train2014")


def test_corrupt_annotation_file(tmp_path):
    root = make_coco(tmp_path / "d")
    ann = root / "annotations" / "instances_train2014.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = 7
    ann.write_text(json.dumps(doc))
    with pytest.raises(TokensegError, match=r"instances_train2014\.json: annotation 1 has unknown category id 7"):
        load_coco(root, "train2014", tmp_path / "c")
    ann.write_text(ann.read_text()[:100])
    with pytest.raises(TokensegError, match="cannot read COCO annotations"):
        load_coco(root, "train2014", tmp_path / "c")


def test_rle_decoding_roundtrip():
    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        counts = rle_encode_counts(m)
        assert np.array_equal(rle_decode({"size": [h, w], "counts": counts}), m)
        assert rle_counts_from_string(rle_string(counts)) == counts
        assert np.array_equal(rle_decode({"size": [h, w], "counts": rle_string(counts)}), m)


def test_polygon_rasteriser_basics():
    sq = polygon_mask([10, 10, 20, 10, 20, 20, 10, 20], 30, 30)
    assert sq.sum() == 100 and sq[10:20, 10:20].all()
    assert polygon_mask([-5, -5, 100, -5, 100, 100, -5, 100], 8, 9).all()  # clipped to the image
    assert not polygon_mask([1, 1, 2, 2], 5, 5).any()  # fewer than 3 vertices
    m = semantic_mask([(1, 0, [[0, 0, 10, 0, 10, 10, 0, 10]], 100.0), (2, 0, [[2, 2, 5, 2, 5, 5, 2, 5]], 9.0)], 12, 12)
    assert m[3, 3] == 2 and m[8, 8] == 1 and m[11, 11] == 0


@needs_pycocotools
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_numpy_rasteriser_matches_pycocotools():
    rng = np.random.default_rng(1)
    diff = total = 0
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(20, 160, 2))
        k = int(rng.integers(3, 25))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(2, max(h, w) / 2, k)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        poly = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1).reshape(-1).tolist()
        ours = polygon_mask(poly, h, w)
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)
        diff += int((ours != ref).sum())
        total += int(ref.sum())
        if ref.sum() >= 100:
            assert (ours & ref).sum() / (ours | ref).sum() > 0.9
    assert diff / total < 0.01  # they differ only along edges
    m = rng.random((37, 23)) < 0.4
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert np.array_equal(rle_decode({"size": rle["size"], "counts": rle["counts"].decode()}), m)
    assert rle_counts_from_string(rle["counts"]) == rle_encode_counts(m)


@needs_pycocotools
def test_both_backends_agree_on_the_fixture(coco_root, tmp_path):
    a = load_coco(coco_root, "train2014", tmp_path / "a", rasterizer="numpy")
    b = load_coco(coco_root, "train2014", tmp_path / "b", rasterizer="pycocotools")
    for i in range(len(a)):
        ma, mb = a.load_mask(i), b.load_mask(i)
        assert (ma != mb).mean() < 0.02
    assert a.meta["rasterizer"] == "numpy" and b.meta["rasterizer"] == "pycocotools"


def test_coco_class_list():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"


def test_coco_preset(coco_root, tmp_path, capsys):
    """The shipped COCO preset: the MCTformer+ recipe on the COCO reader's splits."""
    cfg = load_config("mctformer-plus-coco", [f"data.root={coco_root}"])
    plus = load_config("mctformer-plus")
    assert (cfg.data.format, cfg.data.train_split, cfg.data.val_split) == ("coco", "train2014", "val2014")
    assert cfg.maps.split == cfg.eval.split == "train2014"
    assert cfg.model == plus.model and cfg.train == plus.train
    rc = main(["data", "check", "mctformer-plus-coco", f"data.root={coco_root}", "data.val_split=train2014",
               f"data.cache_dir={tmp_path / 'c'}"])
    assert rc == 0
    assert "split train2014: 3 images" in capsys.readouterr().out
