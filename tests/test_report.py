"""``tokenseg report``: the static site from run folders (numbers checked by hand, thumbnails reused, nothing
written outside --out) and, where a Chromium is installed, the page opened headless in a real browser."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tokenseg.cli import main
from tokenseg.data import build_dataset
from tokenseg.config import load_config
from tokenseg.core.seeds import load_seed
from tokenseg.report import image_miou

CHROMIUM = next((p for p in (os.environ.get("TOKENSEG_CHROMIUM", ""), "/usr/bin/chromium",
                             "/usr/bin/chromium-browser", "/usr/bin/google-chrome") if p and Path(p).is_file()), None)


def test_image_miou_by_hand():
    gt = np.array([[0, 0, 1], [1, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 1], [1, 2, 2]], np.uint8)
    # background 1/2, class 1: 2 right of 4 in the union, class 2: 0 of 1 (the pixel under 255 does not count)
    assert image_miou(pred, gt, 3) == pytest.approx(100 * (1 / 2 + 2 / 4 + 0) / 3, abs=0.01)
    assert image_miou(pred, np.full_like(gt, 255), 3) is None


def _files(root: Path, skip: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and skip not in p.parents}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs (seeds 0 and 1) with fused + PatchCAM seeds of val; the first with pseudo masks."""
    tmp = tmp_path_factory.mktemp("report")
    cache = f"data.cache_dir={tmp / 'cache'}"
    runs = []
    for seed in (0, 1):
        out = tmp / f"seed{seed}"
        common = ["tiny", cache, f"output_dir={out}", "train.max_steps=3", f"train.seed={seed}",
                  "maps.kinds=[fused,patchcam]", "--quiet"]
        assert main(["run", *common]) == 0
        runs.append(out)
    assert main(["pseudo", "tiny", cache, f"output_dir={runs[0]}", "pseudo.split=val", "pseudo.kind=fused",
                 "--quiet"]) == 0
    (runs[1] / "seeds" / "val" / "eval_patchcam.json").unlink()  # the report evaluates it in memory
    ds = build_dataset(load_config(str(runs[1] / "config.yaml")).data, "val")
    (runs[1] / "predictions").mkdir()
    for i in range(0, len(ds), 2):  # "predictions" of every other image: its ground truth (mIoU 100)
        shutil.copyfile(ds.mask_paths[i], runs[1] / "predictions" / f"{ds.ids[i]}.png")
    return tmp, runs


def _data(out: Path) -> dict:
    text = (out / "data.js").read_text()
    assert text.startswith("window.TOKENSEG_REPORT = ")
    return json.loads(text[len("window.TOKENSEG_REPORT = "):].rstrip().rstrip(";"))


@pytest.fixture(scope="module")
def report(two_runs):
    tmp, runs = two_runs
    out = tmp / "report"
    before = _files(tmp, out)
    assert main(["report", *map(str, runs), "--out", str(out), "--quiet"]) == 0
    assert _files(tmp, out) == before  # nothing written outside --out, not even the missing eval JSON
    return tmp, runs, out


def test_report_numbers_tiles_and_reuse(report, capsys):
    tmp, runs, out = report
    data = _data(out)
    assert [r["kinds"] for r in data["runs"]] == [["fused", "patchcam"]] * 2
    assert data["classes"] == ["disc", "block", "wedge"] and len(data["images"]) == 16
    html = (out / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "<svg" in html
    for name in ("disc", "block", "wedge", "fused (attention x PatchCAM)", "maps.mode=authors"):
        assert name in html
    # one image's mIoU by hand: argmax of [t, maps] at the run's best threshold, IoU per class present
    cfg = load_config(str(runs[0] / "config.yaml"))
    ds = build_dataset(cfg.data, "val")
    res = json.loads((runs[0] / "seeds" / "val" / "eval_fused.json").read_text())
    for i in (0, 7):
        seed = load_seed(runs[0] / "seeds" / "val" / "fused" / f"{ds.ids[i]}.npz")
        gt = ds.load_mask(i)
        maps = seed.maps.astype(np.float32)
        pred = np.where(maps.max(0) > res["threshold"], np.asarray(seed.classes)[maps.argmax(0)] + 1, 0)
        ious = [((pred == c) & (gt == c)).sum() / ((pred == c) | (gt == c)).sum()
                for c in range(4) if ((pred == c) | (gt == c)).any()]
        entry = data["images"][i]
        assert entry["id"] == ds.ids[i]
        assert entry["runs"][0]["k"]["fused"] == pytest.approx(100 * np.mean(ious), abs=0.01)
        assert entry["cls"] == sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        assert "ps" in entry["runs"][0] and "ps" not in entry["runs"][1]  # pseudo masks of the first run only
        assert entry["runs"][1].get("pr") == (100.0 if i % 2 == 0 else None)  # predictions where they exist
        tiles = out / data["tiles"] / f"{i:06d}"
        for c in entry["runs"][1]["ck"]["patchcam"]:
            assert (tiles / f"r1-patchcam-c{c}.jpg").is_file()
        assert (tiles / "r0-ps.png").is_file() and (tiles / "gt.png").is_file()
    # a rebuild reuses every thumbnail
    stamps = {p: p.stat().st_mtime_ns for p in (out / data["tiles"]).rglob("*.png")}
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    assert "16 reused" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_report_refuses_a_foreign_folder_and_a_missing_run(two_runs, tmp_path, capsys):
    _, runs = two_runs
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["report", str(runs[0]), "--out", str(tmp_path), "--quiet"]) == 2
    assert "holds no tokenseg report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["report", str(runs[0]), "--split", "train", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no seeds for split 'train'" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium; "
                                             "or set TOKENSEG_CHROMIUM)")
def test_report_in_a_real_browser(report):
    """Open the report headless: tables, charts and the first page of images render with no console
    error; sort by mIoU, filter by a class. ``TOKENSEG_REPORT_SCREENSHOT=path`` keeps the screenshot."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[dev])")
    tmp, runs, out = report
    data = _data(out)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        assert page.locator("#seeds-0 tbody tr").count() == 2 and page.locator("#seeds-1 tbody tr").count() == 2
        assert page.locator("#class-diff tbody tr").count() == 4
        for chart in ("#curve-chart", "#class-chart"):
            assert page.locator(chart).is_visible()
        assert "wedge" in page.locator("#class-chart").text_content()
        rows = page.locator(".img-row")
        assert rows.count() == min(16, data["page"])
        first = rows.nth(0)
        first.scroll_into_view_if_needed()
        page.wait_for_function("() => Array.from(document.querySelectorAll('.img-row')[0].querySelectorAll('img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=10000)
        assert first.locator("img").count() >= 2 + 2 * 2  # photo, gt, each run: a heat map and the argmax

        def mious():
            vals = page.eval_on_selector_all(".img-row", "rs => rs.map(r => r.dataset.miou)")
            return [float(v) for v in vals if v != ""]

        page.select_option("#sort", "best")
        got = mious()
        assert got == sorted(got, reverse=True) and len(got) > 1
        page.select_option("#sort", "worst")
        got = mious()
        assert got == sorted(got)
        assert got[0] == min(e["runs"][0]["k"][data["runs"][0]["best"]] for e in data["images"])
        page.select_option("#class-filter", "2")  # wedge
        classes = page.eval_on_selector_all(".img-row", "rs => rs.map(r => r.dataset.classes)")
        want = sum(2 in e["cls"] for e in data["images"])
        assert len(classes) == min(want, data["page"]) and all("2" in c.split() for c in classes)
        assert f"({want} images)" in page.locator("#page-info").inner_text()
        page.select_option("#class-filter", "")
        page.select_option("#sort", "drop")  # the largest drop between the two runs first
        page.evaluate("() => window.scrollTo(0, document.getElementById('controls').offsetTop - 8)")
        shot = tmp / "report.png"
        page.screenshot(path=str(shot))
        browser.close()
    assert not errors, errors
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("TOKENSEG_REPORT_SCREENSHOT")
    if keep:  # the README's picture: python -m pytest tests/test_report.py -k browser with this set
        from PIL import Image

        with Image.open(shot) as im:
            im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS).save(keep, optimize=True)
