"""`tokenseg data import --from yolo|coco|labelme`: the folder layout data.format=folder reads, masks
against hand-computed regions and pycocotools, labels, splits, resuming, refusing, never writing into
the source."""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tokenseg.cli import main
from tokenseg.data import load_folder, load_rgb
from tokenseg.core.masks import read_mask

W, H = 40, 30
# pycocotools' numpy-2 deprecation noise, from the reference rasterisations below
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def image(path: Path, size=(W, H), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def poly_mask(poly_px, h=H, w=W) -> np.ndarray:
    """Reference rasterisation of a pixel-coordinate polygon: pycocotools."""
    from pycocotools import mask as mu

    return mu.decode(mu.merge(mu.frPyObjects([list(map(float, poly_px))], h, w))).astype(bool)


def run(*args) -> int:
    return main(["data", "import", *map(str, args), "--quiet"])


# ------------------------------------------------------------------------------------ YOLO
TRI = [0.1, 0.1, 0.9, 0.2, 0.5, 0.9]


def make_yolo(base: Path) -> Path:
    src = base / "yolo"
    for rel in ("train/a.jpg", "train/b.png", "val/c.jpg", "val/d.jpg"):
        image(src / "images" / rel, seed=len(rel))
    lab = src / "labels"
    (lab / "train").mkdir(parents=True)
    (lab / "val").mkdir(parents=True)
    # a: a 10x10 cat rectangle (pixels 10..19 x 5..14) on a dog polygon covering the whole image
    (lab / "train" / "a.txt").write_text("0 0.25 0.1666667 0.5 0.1666667 0.5 0.5 0.25 0.5\n1 0 0 1 0 1 1 0 1\n")
    (lab / "train" / "b.txt").write_text("2 0.5 0.5 0.2 0.2\n0 " + " ".join(map(str, TRI)) + "\n")  # box + polygon
    (lab / "val" / "c.txt").write_text("1 " + " ".join(map(str, TRI)) + "\n\n")
    (src / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    return src


def test_yolo_seg_import(tmp_path, capsys):
    src = make_yolo(tmp_path)
    before = snapshot(src)
    dst = tmp_path / "mine"
    assert run("--from", "yolo", src, "--out", dst) == 0
    out = capsys.readouterr().out
    assert "4 images (4 hard-linked), 3 masks, 3 classes (cat, dog, bird)" in out
    assert "1 image(s) have boxes besides polygons" in out and "1 image(s) have no label file" in out
    assert "data.train_split=train data.val_split=val" in out
    assert snapshot(src) == before  # nothing written into the source
    assert (dst / "classes.txt").read_text().split("\n")[:3] == ["cat", "dog", "bird"]
    assert (dst / "labels.csv").read_text().splitlines() == [
        "image,labels,split", "train/a.jpg,cat;dog,train", "train/b.png,cat;bird,train", "val/c.jpg,dog,val",
        "val/d.jpg,,val"]
    a = read_mask(dst / "masks" / "train" / "a.png")
    ref = np.full((H, W), 2, np.uint8)
    ref[5:15, 10:20] = 1  # the smaller cat is painted over the dog
    np.testing.assert_array_equal(a, ref)
    tri_px = (np.asarray(TRI).reshape(-1, 2) * (W, H)).reshape(-1)
    np.testing.assert_array_equal(read_mask(dst / "masks" / "val" / "c.png"), poly_mask(tri_px) * 2)
    np.testing.assert_array_equal(read_mask(dst / "masks" / "val" / "d.png"), np.zeros((H, W)))
    assert not (dst / "masks" / "train" / "b.png").exists()  # a box is not a mask
    for rel in ("train/a.jpg", "val/c.jpg"):  # hard links: no copy of the pixels
        assert os.stat(dst / "images" / rel).st_ino == os.stat(src / "images" / rel).st_ino
    train = load_folder(dst, "train")
    assert train.class_names == ["cat", "dog", "bird"] and train.labels == [[0, 1], [0, 2]]
    assert [p is not None for p in train.mask_paths] == [True, False]
    assert load_folder(dst, "val").has_masks
    assert main(["data", "check", "mctformer-plus", "data.format=folder", f"data.root={dst}", "data.train_split=train",
                 "data.val_split=val", "maps.split=train", "eval.split=val", f"data.cache_dir={tmp_path / 'c'}"]) == 0
    # the built-in rasteriser (no pycocotools) gives the same rectangle, and the triangle up to its edges
    dst2 = tmp_path / "numpy"
    assert run("--from", "yolo", src, "--out", dst2, "--rasterizer", "numpy", "--link", "symlink") == 0
    np.testing.assert_array_equal(read_mask(dst2 / "masks" / "train" / "a.png"), ref)
    agree = (read_mask(dst2 / "masks" / "val" / "c.png") == poly_mask(tri_px) * 2).mean()
    assert agree > 0.97
    assert (dst2 / "images" / "val" / "c.jpg").resolve() == (src / "images" / "val" / "c.jpg").resolve()


def test_yolo_import_resumes_refuses_and_overwrites(tmp_path, capsys):
    src = make_yolo(tmp_path)
    dst = tmp_path / "mine"
    assert run("--from", "yolo", src, "--out", dst) == 0
    first = snapshot(dst)
    capsys.readouterr()
    # killed half-way: an image and its mask are missing; the same command completes it, keeps the rest
    (dst / "images" / "val" / "c.jpg").unlink()
    (dst / "masks" / "val" / "c.png").unlink()
    (dst / "labels.csv").unlink()
    assert run("--from", "yolo", src, "--out", dst) == 0
    assert "[resumed]" in capsys.readouterr().out
    again = snapshot(dst)
    assert again.keys() == first.keys()
    assert again["masks/train/a.png"] == first["masks/train/a.png"]  # kept, not rewritten
    assert again[".tokenseg_import.json"][0] == first[".tokenseg_import.json"][0]
    # other settings into the same folder, or a foreign non-empty folder: refused
    assert run("--from", "yolo", src, "--out", dst, "--link", "copy") == 2
    assert "with other settings" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run("--from", "yolo", src, "--out", other) == 2
    err = capsys.readouterr().err
    assert "it is not empty (1 entries, e.g. notes.txt)" in err and "--overwrite" in err
    assert run("--from", "yolo", src, "--out", other, "--overwrite", "--link", "copy") == 0
    assert (other / "notes.txt").read_text() == "mine"
    assert os.stat(other / "images" / "train" / "a.jpg").st_ino != os.stat(src / "images" / "train" / "a.jpg").st_ino
    # the output may not be inside the source, nor the source inside an output folder
    assert run("--from", "yolo", src, "--out", src / "converted") == 2
    assert "inside the dataset" in capsys.readouterr().err and not (src / "converted").exists()


def test_yolo_boxes_only_and_bad_labels(tmp_path, capsys):
    src = tmp_path / "det"
    image(src / "images" / "x.jpg")
    image(src / "images" / "y.jpg")
    (src / "labels").mkdir()
    (src / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
    (src / "labels" / "y.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    assert run("--from", "yolo", src, "--out", tmp_path / "o1") == 2
    assert "no class names: give --classes FILE" in capsys.readouterr().err
    (src / "classes.txt").write_text("person\ncar\n")
    assert run("--from", "yolo", src, "--out", tmp_path / "o1") == 0
    out = capsys.readouterr().out
    assert "image-level labels only, no masks" in out and "0 masks" in out
    assert (tmp_path / "o1" / "labels.csv").read_text().splitlines()[1:] == ["x.jpg,person;car", "y.jpg,car"]
    assert not list((tmp_path / "o1").glob("masks/*"))
    ds = load_folder(tmp_path / "o1", "all")
    assert ds.labels == [[0, 1], [1]] and ds.mask_paths == [None, None]
    # pixel coordinates instead of fractions: that image is left out and named, the rest is written
    (src / "labels" / "y.txt").write_text("1 120 40 30 20\n")
    assert run("--from", "yolo", src, "--out", tmp_path / "o2") == 1
    out = capsys.readouterr().out
    assert "y.txt:1: coordinates must be fractions of the image size" in out and "1 image(s) left out" in out
    assert (tmp_path / "o2" / "labels.csv").read_text().splitlines()[1:] == ["x.jpg,person;car"]
    (src / "labels" / "y.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    assert run("--from", "yolo", src, "--out", tmp_path / "o3") == 2
    assert "class index 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ COCO
def _rle_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.uint8)  # column-major, runs starting with zeros
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], change])).tolist()


def make_coco(base: Path) -> tuple[Path, dict]:
    src = base / "coco"
    for n in ("p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"):
        image(src / "images" / n, seed=len(n))
    blob = np.zeros((H, W), bool)
    blob[3:20, 22:35] = True
    crowd = np.zeros((H, W), bool)
    crowd[10:28, 5:30] = True
    doc = {"images": [{"id": i + 1, "file_name": f"p{i + 1}.jpg", "width": W, "height": H} for i in range(4)],
           "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 600.0,
                "segmentation": [[2, 2, 38, 2, 38, 28, 2, 28]]},
               {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "area": 60.0,
                "segmentation": [[10, 10, 22, 10, 16, 20]]},
               {"id": 3, "image_id": 2, "category_id": 7, "iscrowd": 0, "area": float(blob.sum()),
                "segmentation": {"size": [H, W], "counts": _rle_counts(blob)}},
               {"id": 4, "image_id": 2, "category_id": 3, "iscrowd": 1, "area": float(crowd.sum()),
                "segmentation": {"size": [H, W], "counts": _rle_counts(crowd)}},
               {"id": 5, "image_id": 3, "category_id": 3, "iscrowd": 0, "area": 40.0, "bbox": [1, 1, 5, 8],
                "segmentation": []}]}
    (src / "annotations.json").write_text(json.dumps(doc))
    return src, doc


def coco_reference(path: Path, image_id: int, value_of: dict[int, int]) -> np.ndarray:
    """The documented rule with pycocotools' COCO API: instances largest first, crowd -> 255 on background."""
    from pycocotools.coco import COCO

    api = COCO(str(path))
    anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
    mask = np.zeros((H, W), np.uint8)
    crowd = np.zeros((H, W), bool)
    for a in sorted(anns, key=lambda a: -a["area"]):
        m = api.annToMask(a).astype(bool)
        if a["iscrowd"]:
            crowd |= m
        else:
            mask[m] = value_of[a["category_id"]]
    mask[crowd & (mask == 0)] = 255
    return mask


def test_coco_import_against_pycocotools(tmp_path, capsys):
    src, _ = make_coco(tmp_path)
    ann = src / "annotations.json"
    dst = tmp_path / "mine"
    assert run("--from", "coco", ann, "--out", dst) == 0
    out = capsys.readouterr().out
    assert "3 images" in out and "2 masks" in out and "1 image(s) without annotations left out" in out
    assert "1 annotation(s) without a segmentation" in out
    assert (dst / "classes.txt").read_text().split() == ["cat", "dog"]  # categories by id
    for n in (1, 2):
        np.testing.assert_array_equal(read_mask(dst / "masks" / f"p{n}.png"), coco_reference(ann, n, {3: 1, 7: 2}))
    assert not (dst / "masks" / "p3.png").exists()
    ds = load_folder(dst, "all")
    assert ds.ids == ["p1", "p2", "p3"] and ds.labels == [[0, 1], [0, 1], [0]]  # crowd counts as present
    # --classes reorders; --keep-empty keeps the image without annotations
    (tmp_path / "order.txt").write_text("dog\ncat\n")
    dst2 = tmp_path / "mine2"
    assert run("--from", "coco", ann, "--out", dst2, "--classes", tmp_path / "order.txt", "--keep-empty") == 0
    np.testing.assert_array_equal(read_mask(dst2 / "masks" / "p1.png"), coco_reference(ann, 1, {3: 2, 7: 1}))
    assert load_folder(dst2, "all").labels == [[0, 1], [0, 1], [1], []]
    (tmp_path / "bad.txt").write_text("dgo\ncat\n")
    assert run("--from", "coco", ann, "--out", tmp_path / "m3", "--classes", tmp_path / "bad.txt") == 2
    assert "'dog' (did you mean 'dgo'?)" in capsys.readouterr().err


def test_coco_file_names_that_escape_are_left_out(tmp_path, capsys):
    src, doc = make_coco(tmp_path)
    doc["images"][1]["file_name"] = "../../evil.jpg"
    (src / "annotations.json").write_text(json.dumps(doc))
    assert run("--from", "coco", src / "annotations.json", "--out", tmp_path / "mine") == 1
    out = capsys.readouterr().out
    assert "file_name '../../evil.jpg' has a '..' component" in out
    assert [r.split(",")[0] for r in (tmp_path / "mine" / "labels.csv").read_text().splitlines()[1:]] == \
        ["p1.jpg", "p3.jpg"]
    assert not (tmp_path / "evil.jpg").exists()


def test_coco_annotations_on_the_stored_pixels_of_an_exif_rotated_image(tmp_path):
    src = tmp_path / "coco"
    (src / "images").mkdir(parents=True)
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored; shown 20 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(src / "images" / "r.jpg", exif=exif.tobytes())
    doc = {"images": [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 20}],
           "categories": [{"id": 1, "name": "cat"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 50.0,
                            "segmentation": [[0, 0, 10, 0, 10, 5, 0, 5]]}]}
    (src / "a.json").write_text(json.dumps(doc))
    assert run("--from", "coco", src / "a.json", "--out", tmp_path / "mine") == 0
    got = read_mask(tmp_path / "mine" / "masks" / "r.png")
    # reference: the stored-frame mask carried through PIL's own EXIF transpose, as load_rgb shows the image
    m = np.zeros((20, 40), np.uint8)
    m[0:5, 0:10] = 1
    carrier = Image.fromarray(m)
    ex = carrier.getexif()
    ex[0x0112] = 6
    buf = io.BytesIO()
    carrier.save(buf, format="TIFF", exif=ex.tobytes())
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    assert got.shape == np.asarray(load_rgb(src / "images" / "r.jpg")).shape[:2] == (40, 20)
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------------------------ LabelMe
def labelme_doc(image_path: str, shapes: list[dict], data: bytes | None = None) -> dict:
    return {"version": "5.2.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": base64.b64encode(data).decode() if data else None, "imageHeight": H, "imageWidth": W}


def shape(label, kind, points):
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def test_labelme_import(tmp_path, capsys):
    src = tmp_path / "lm"
    image(tmp_path / "photos" / "l1.jpg")
    tri = [[20, 2], [38, 6], [28, 26]]
    shapes = [shape("cat", "rectangle", [[25, 20], [5, 5]]),  # corners in any order
              shape("_background_", "rectangle", [[10, 8], [14, 12]]),  # a hole in the cat
              shape("dog", "polygon", tri),
              shape("bird", "circle", [[8, 24], [8, 28]]),
              shape("__ignore__", "polygon", [[0, 0], [4, 0], [4, 3], [0, 3]])]
    (src / "set1").mkdir(parents=True)
    (src / "set1" / "l1.json").write_text(json.dumps(labelme_doc("../../photos/l1.jpg", shapes)))
    buf = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(buf, format="PNG")
    (src / "l2.json").write_text(json.dumps(labelme_doc("gone.png", [shape("dog", "line", [[1, 1], [9, 9]]),
                                                                    shape("cat", "polygon", tri)], buf.getvalue())))
    (src / "other.json").write_text(json.dumps({"not": "labelme"}))
    patch = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], bool)  # LabelMe 5's "mask" shape
    pbuf = io.BytesIO()
    Image.fromarray(patch.astype(np.uint8) * 255).save(pbuf, format="PNG")
    image(tmp_path / "photos" / "l3.jpg", seed=3)
    m_shape = {**shape("dog", "mask", [[30, 20], [33, 23]]), "mask": base64.b64encode(pbuf.getvalue()).decode()}
    (src / "l3.json").write_text(json.dumps(labelme_doc("../photos/l3.jpg", [m_shape])))
    before = snapshot(src)
    dst = tmp_path / "mine"
    assert run("--from", "labelme", src, "--out", dst) == 0
    out = capsys.readouterr().out
    assert "3 images (1 from imageData, 2 hard-linked), 2 masks, 3 classes (bird, cat, dog)" in out
    assert "1 JSON file(s) are not LabelMe files" in out and "1 shape(s) without area" in out
    assert snapshot(src) == before
    # reference, by the documented rule (largest first; ignore -> 255 on background) with shapes by hand
    yy, xx = np.mgrid[:H, :W]
    cat = np.zeros((H, W), bool)
    cat[5:20, 5:25] = True  # pixel centres inside x 5..25, y 5..20
    hole = np.zeros((H, W), bool)
    hole[8:12, 10:14] = True
    dog = poly_mask(np.asarray(tri, float).reshape(-1))
    bird = (xx + 0.5 - 8) ** 2 + (yy + 0.5 - 24) ** 2 <= 16
    ign = np.zeros((H, W), bool)
    ign[0:3, 0:4] = True
    areas = {"cat": 300, "dog": 0.5 * abs((38 - 20) * (26 - 2) - (28 - 20) * (6 - 2)), "bird": np.pi * 16,
             "hole": 16}
    ref = np.zeros((H, W), np.uint8)
    for name, m, v in sorted([("cat", cat, 2), ("dog", dog, 3), ("bird", bird, 1), ("hole", hole, 0)],
                             key=lambda t: -areas[t[0]]):
        ref[m] = v
    ref[ign & (ref == 0)] = 255
    np.testing.assert_array_equal(read_mask(dst / "masks" / "set1" / "l1.png"), ref)
    assert not (dst / "masks" / "l2.png").exists()  # a line has no area: labels only
    assert (dst / "labels.csv").read_text().splitlines() == ["image,labels", "l2.png,cat;dog", "l3.jpg,dog",
                                                              "set1/l1.jpg,bird;cat;dog"]
    ref3 = np.zeros((H, W), np.uint8)
    ref3[20:24, 30:34] = patch * 3
    np.testing.assert_array_equal(read_mask(dst / "masks" / "l3.png"), ref3)
    assert np.asarray(Image.open(dst / "images" / "l2.png")).mean() == 90  # the embedded image
    # class order from a file; a label that is not in it is named with the closest class
    (tmp_path / "cls.txt").write_text("cat\ndog\nbrid\n")
    assert run("--from", "labelme", src, "--out", tmp_path / "m2", "--classes", tmp_path / "cls.txt") == 2
    assert "label 'bird' is not in --classes (did you mean 'brid'?)" in capsys.readouterr().err
