"""What a new user hits, safety side: ids that escape the output folder, outputs inside a dataset, file
modes vs the umask, one writer per output folder, several bad label entries in one error with
did-you-mean, data check without images/, transparency, huge images, file names that are not UTF-8."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.data import WSSSDataset, load_folder, load_rgb
from tokenseg.data.base import TRANSPARENT_FILL
from tokenseg.data.scan import scan_images
from tokenseg.data.guard import refuse_inside_dataset
from tokenseg.core.seeds import SeedMaps, save_seed, seed_path
from tokenseg.core.errors import TokensegError
from tokenseg.core.locks import output_lock
from tokenseg.core.files import safe_output_path, write_bytes_atomic, write_json_atomic
from tokenseg.core.masks import save_palette_png


def folder_dataset(base: Path, rows: list[tuple[str, str]], classes=("cat", "dog", "giraffe"),
                   images: list[str] | None = None, image_dir: str = "images") -> Path:
    """A folder dataset: ``rows`` (file, labels) in labels.csv, ``images`` (default: the rows' files)
    written as small RGB JPEGs under ``image_dir``."""
    root = base / "ds"
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in (images if images is not None else [r[0] for r in rows]):
        p = root / image_dir / f
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{a},{b}\n" for a, b in rows), encoding="utf-8")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def check_args(root: Path, tmp: Path, *extra: str) -> list[str]:
    return ["data", "check", "mctformer-plus", "data.format=folder", f"data.root={root}", "data.train_split=all",
            "data.val_split=all", "maps.split=all", "eval.split=all", f"data.cache_dir={tmp / 'cache'}", *extra]


# ------------------------------------------------------------------------------------ path traversal
@pytest.mark.parametrize("bad", ["../../../../tmp/x/a.jpg", "/tmp/x/a.jpg", "sub/../../a.jpg", "..\\..\\a.jpg"])
def test_labels_with_escaping_ids_are_refused_naming_file_and_id(tmp_path, bad):
    root = folder_dataset(tmp_path, [("a.jpg", "cat"), (bad, "dog")], images=["a.jpg"])
    with pytest.raises(TokensegError) as e:
        load_folder(root, "all")
    msg = str(e.value)
    assert f"{root / 'labels.csv'}:3" in msg and repr(bad) in msg and ("'..'" in msg or "absolute" in msg)
    (root / "labels.csv").unlink()
    (root / "labels.json").write_text(json.dumps({"labels": {"a.jpg": ["cat"], bad: ["dog"]}}))
    with pytest.raises(TokensegError, match=r"labels\.json: image .* (has a '\.\.' component|is an absolute path)"):
        load_folder(root, "all")
    (root / "labels.json").write_text(json.dumps({"labels": {"a.jpg": ["cat"]}, "splits": {"train": [bad]}}))
    with pytest.raises(TokensegError, match="split 'train'"):
        load_folder(root, "train")


def test_dataset_objects_refuse_escaping_ids(tmp_path):
    with pytest.raises(TokensegError, match=r"image id '\.\./x' has a '\.\.' component"):
        WSSSDataset("mine", ["a"], ["../x"], [tmp_path / "x.jpg"], [[0]])
    with pytest.raises(TokensegError, match="is an absolute path"):
        WSSSDataset("mine", ["a"], ["/data/ds/masks/img005"], [tmp_path / "x.jpg"], [[0]])
    WSSSDataset("mine", ["a"], ["cats/./001"], [tmp_path / "x.jpg"], [[0]])  # harmless


def test_safe_output_path_and_seed_path(tmp_path):
    out = tmp_path / "seeds"
    assert safe_output_path(out, "cats/001.npz") == out / "cats" / "001.npz"
    for bad in ("../x.npz", "/tmp/x.npz", "a/../../x.npz", "", "a/\x00.npz"):
        with pytest.raises(TokensegError, match="refusing to write outside"):
            safe_output_path(out, bad)
    with pytest.raises(TokensegError, match="refusing to write outside"):
        seed_path(out, "../../../../tmp/x/a")
    with pytest.raises(TokensegError, match="refusing to write outside"):
        seed_path(out, "/data/ds/masks/img005")
    # a symlink inside the output folder that points elsewhere (e.g. at a ground-truth mask folder)
    gt = tmp_path / "gt"
    gt.mkdir()
    out.mkdir()
    (out / "link").symlink_to(gt)
    with pytest.raises(TokensegError, match="through a symlink"):
        safe_output_path(out, "link/img005.png")
    # and a real save through seed_path stays inside
    save_seed(seed_path(out, "cats/001"), SeedMaps(np.array([0]), np.zeros((1, 2, 2), np.float32)))
    assert (out / "cats" / "001.npz").is_file()


def test_refuse_inside_dataset_one_rule(tmp_path):
    root = tmp_path / "ds"
    (root / "masks").mkdir(parents=True)
    cfg = load_config("mctformer-plus", ["data.format=folder", f"data.root={root}"])
    for inside in (root, root / "masks" / "x.png", root / "new" / "deeper"):
        with pytest.raises(TokensegError) as e:
            refuse_inside_dataset(inside, cfg, "maps --out")
        assert str(inside) in str(e.value) and str(root) in str(e.value) and "maps --out" in str(e.value)
    refuse_inside_dataset(tmp_path / "runs" / "x", cfg, "maps --out")  # outside: fine
    refuse_inside_dataset(tmp_path / "runs", [tmp_path / "elsewhere"], "x")
    # relative paths and symlinks are resolved
    (tmp_path / "alias").symlink_to(root)
    with pytest.raises(TokensegError, match="inside the dataset"):
        refuse_inside_dataset(tmp_path / "alias" / "out", cfg.data, "predict --out")
    # a dataset object: its mask folder (e.g. COCO's converted masks in the cache) counts too
    cache_masks = tmp_path / "cache" / "coco" / "masks"
    ds = WSSSDataset("d", ["a"], ["x"], [root / "x.jpg"], [[0]], mask_paths=[cache_masks / "x.png"])
    with pytest.raises(TokensegError, match="mask folder"):
        refuse_inside_dataset(cache_masks / "x.png", ds, "pseudo --out")
    # the synthetic dataset (no data.root): its folder in the cache
    syn = load_config("demo", [f"data.cache_dir={tmp_path / 'c'}"])
    from tokenseg.data.synthetic import default_root

    with pytest.raises(TokensegError, match="data.root"):
        refuse_inside_dataset(default_root(syn.data.synthetic, tmp_path / "c") / "out", syn, "x")


def test_data_check_json_inside_the_dataset_is_refused(tmp_path, capsys):
    root = folder_dataset(tmp_path, [("a.jpg", "cat")])
    before = sorted(p.name for p in root.rglob("*"))
    assert main(check_args(root, tmp_path, "--json", str(root / "report.json"))) == 2
    assert "inside the dataset" in capsys.readouterr().err
    assert sorted(p.name for p in root.rglob("*")) == before


# ------------------------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
        write_json_atomic(tmp_path / "b.json", {"a": 1})
        save_palette_png(tmp_path / "c.png", np.zeros((2, 2), np.uint8))
        save_seed(tmp_path / "d.npz", SeedMaps(np.array([0]), np.zeros((1, 2, 2), np.float32)))
        with open(tmp_path / "plain", "w") as f:  # what a normal open gives
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode
    for name in ("a.bin", "b.json", "c.png", "d.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# ------------------------------------------------------------------------------------ output lock
HOLDER = textwrap.dedent("""
    import sys, time
    from tokenseg.core.locks import output_lock
    with output_lock(sys.argv[1], "tokenseg train my.yaml"):
        print("READY", flush=True)
        sys.stdin.readline()
""")


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "READY"
    return p


def test_output_lock_one_writer_per_folder(tmp_path):
    folder = tmp_path / "run" / "not-yet"  # does not exist yet
    p = _holder(folder)
    try:
        with pytest.raises(TokensegError) as e:
            with output_lock(folder, "tokenseg maps"):
                pass
        msg = str(e.value)
        assert f"PID {p.pid}" in msg and "tokenseg train my.yaml" in msg and str(folder) in msg
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=30)
    assert not (folder / ".tokenseg.lock").exists()  # released and removed
    # killed holder (kill -9): its stale lock is taken over
    p = _holder(folder)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert json.loads((folder / ".tokenseg.lock").read_text())["pid"] == p.pid  # left behind
    with output_lock(folder, "tokenseg maps") as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["command"] == "tokenseg maps"
        with output_lock(folder, "tokenseg maps (nested)"):  # re-entrant within one process
            pass
        assert lock.exists()
    assert not lock.exists()


def test_output_lock_without_flock_uses_a_pid_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(*a):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "out"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        import socket

        (folder / ".tokenseg.lock").write_text(json.dumps({"pid": other.pid, "command": "tokenseg pseudo",
                                                           "host": socket.gethostname()}))
        with pytest.raises(TokensegError, match=f"PID {other.pid}: tokenseg pseudo"):
            with output_lock(folder, "tokenseg maps"):
                pass
    finally:
        other.communicate(b"\n", timeout=30)
    with output_lock(folder, "tokenseg maps") as lock:  # that PID is gone now: stale, taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ------------------------------------------------------------------------------------ label errors
def test_several_bad_entries_in_one_error_with_did_you_mean(tmp_path):
    rows = [("a.jpg", "cat"), ("b.jpg", "girafe"), ("c.jpg", "dgo;cat"), ("d.jpg", "girafe"), ("e.jpg", "zebra")]
    root = folder_dataset(tmp_path, rows)
    with pytest.raises(TokensegError) as e:
        load_folder(root, "all")
    msg = str(e.value)
    assert "4 bad entries" in msg
    for line, image, name in ((3, "b", "girafe"), (4, "c", "dgo"), (5, "d", "girafe"), (6, "e", "zebra")):
        assert f"labels.csv:{line}: image {image!r} has unknown class {name!r}" in msg
    assert "'girafe' (did you mean 'giraffe'?)" in msg and "'dgo' (did you mean 'dog'?)" in msg
    assert "unknown class 'girafe' x2 (did you mean 'giraffe'?)" in msg
    assert "'zebra' (did you mean" not in msg
    # row errors are collected too, and the list stops at 20 with "and N more"
    lines = ["image,labels"] + [f"x{i}.jpg,cat,extra" for i in range(25)] + ["a.jpg,cat", ",dog"]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(TokensegError) as e:
        load_folder(root, "all")
    msg = str(e.value)
    assert "26 bad entries" in msg and "... and 6 more" in msg and msg.count("expected 2 columns") == 20


def test_missing_images_did_you_mean(tmp_path):
    root = folder_dataset(tmp_path, [("Cats/001.jpg", "cat"), ("002.jpg", "dog"), ("giraffe_03.jpg", "giraffe")],
                          images=["cats/001.jpg", "dogs/002.jpg", "giraffe_003.jpg"])
    with pytest.raises(TokensegError) as e:
        load_folder(root, "all")
    msg = str(e.value)
    assert "none of the 3 images named in the labels is in" in msg and "set data.image_dir" not in msg
    assert "did you mean 'cats/001'" in msg and "did you mean 'dogs/002'" in msg
    assert "did you mean 'giraffe_003'" in msg


def test_check_without_images_folder_counts_labels_without_images(tmp_path, capsys):
    root = folder_dataset(tmp_path, [("a.jpg", "cat"), ("b.jpg", "dog"), ("c.jpg", "cat")], image_dir="photos")
    rep_path = tmp_path / "r.json"
    assert main(check_args(root, tmp_path, "--json", str(rep_path))) == 1
    text = capsys.readouterr().out
    rep = json.loads(rep_path.read_text())
    assert rep["labels_without_images"] == ["a", "b", "c"]
    assert f"labels without images: 3 (looked in {root};" in text
    assert "set data.image_dir=photos" in text and "no images/ folder" in text
    # and with the hint followed, all is well
    assert main(check_args(root, tmp_path, "data.image_dir=photos")) == 0


# ------------------------------------------------------------------------------------ transparency
def test_transparent_images_composited_on_grey_and_reported(tmp_path, capsys):
    root = folder_dataset(tmp_path, [("rgba.png", "cat"), ("opaque.png", "dog"), ("pal.png", "cat"),
                                     ("key.png", "dog"), ("plain.jpg", "cat")], images=["plain.jpg"])
    im = root / "images"
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 200
    a[:, :3, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(a, "RGBA").save(im / "rgba.png")
    a[..., 3] = 255
    Image.fromarray(a, "RGBA").save(im / "opaque.png")  # an alpha channel, nothing transparent
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    p.save(im / "pal.png", transparency=1)  # palette entry 1 transparent
    rgb = Image.fromarray(np.full((3, 3, 3), 7, np.uint8))
    rgb.save(im / "key.png", transparency=(7, 7, 7))  # tRNS colour key: every pixel transparent
    out = np.asarray(load_rgb(im / "rgba.png"))
    assert (out[:, :3] == (200, 0, 0)).all() and (out[:, 3:] == TRANSPARENT_FILL).all()
    assert TRANSPARENT_FILL == tuple(round(v * 255) for v in (0.485, 0.456, 0.406))  # ImageNet mean
    pal = np.asarray(load_rgb(im / "pal.png"))
    assert (pal[0, 0] == (10, 20, 30)).all() and (pal[0, 1] == TRANSPARENT_FILL).all()
    assert (np.asarray(load_rgb(im / "key.png")) == TRANSPARENT_FILL).all()
    assert (np.asarray(load_rgb(im / "opaque.png"))[:, 3:] == (200, 0, 0)).all()
    rep = tmp_path / "r.json"
    assert main(check_args(root, tmp_path, "--json", str(rep))) == 0
    text = capsys.readouterr().out
    r = json.loads(rep.read_text())["splits"]["all"]
    assert r["transparent_image_count"] == 3 and sorted(r["transparent_images"]) == ["key", "pal", "rgba"]
    assert "with transparency: 3" in text and "3 image(s) have transparent pixels" in text


# ------------------------------------------------------------------------------------ huge images
def test_check_warns_about_huge_images(tmp_path, capsys):
    root = folder_dataset(tmp_path, [("ok.jpg", "cat"), ("wide.png", "dog"), ("big.png", "cat")], images=["ok.jpg"])
    Image.new("L", (5000, 8)).save(root / "images" / "wide.png")  # > 4096 px on a side
    Image.new("1", (4001, 4001)).save(root / "images" / "big.png")  # 16.008 MP
    rep = tmp_path / "r.json"
    assert main(check_args(root, tmp_path, "--json", str(rep), "--fast")) == 0
    text = capsys.readouterr().out
    r = json.loads(rep.read_text())
    large = r["splits"]["all"]["large_images"]
    assert sorted(d["id"] for d in large) == ["big", "wide"]
    warn = next(w for w in r["warnings"] if "larger than 4096 px" in w)
    assert "'wide' (5000x8)" in warn and "'big' (4001x4001)" in warn and "maps.max_side" in warn
    assert "larger than 4096 px or 16 MP: 2" in text


# ------------------------------------------------------------------------------------ non-UTF-8 names
def test_file_names_that_are_not_utf8(tmp_path, capsys):
    root = folder_dataset(tmp_path, [("a.jpg", "cat")])
    raw = os.fsencode(root / "images") + b"/caf\xe9.jpg"
    try:
        with open(raw, "wb") as f:
            Image.new("RGB", (20, 20)).save(f, format="JPEG")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    rep = tmp_path / "r.json"
    assert main(check_args(root, tmp_path, "--json", str(rep))) == 0
    text = capsys.readouterr().out
    assert "caf\\xe9" in text  # shown escaped
    doc = json.loads(rep.read_text(encoding="utf-8"))  # valid UTF-8 JSON ...
    assert doc["images_without_labels"] == [os.fsdecode(b"caf\xe9")]  # ... that reads back the same name
    # the scan cache: written, and used on the next scan
    cache = tmp_path / "scan.json"
    path = os.fsdecode(raw)
    first = scan_images([path], cache_file=cache)
    assert first[0]["width"] == 20 and cache.is_file()
    import tokenseg.data.scan as scan

    orig = scan.scan_image
    scan.scan_image = lambda *a, **k: pytest.fail("the cache was not used")
    try:
        assert scan_images([path], cache_file=cache) == first
    finally:
        scan.scan_image = orig
