"""Fault injection, as it was found (issue 24, and issue 25's "interrupts and restarts"): nothing lost,
nothing mixed, nothing written where it does not belong. Every kill happens at a chosen point; the cases
that need root (a small tmpfs for a full disk) skip with the reason elsewhere."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenseg import engine
from tokenseg.cli import main
from tokenseg.config import RANGES, Config, load_config, numeric_fields, range_problem
from tokenseg.core.errors import TokensegError
from tokenseg.core.files import append_jsonl, write_bytes_atomic

TINY = ["train.epochs=1", "train.keep_best=true", "maps.kinds=[fused]", "data.num_workers=0",
        "segment.max_steps=2", "segment.eval_at_end=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One trained tiny classifier (1 epoch, keep_best), its val seeds and val pseudo masks."""
    base = tmp_path_factory.mktemp("faults")
    over = [f"data.cache_dir={base / 'cache'}", f"output_dir={base / 'run'}", *TINY]
    assert main(["train", "tiny", *over, "--quiet"]) == 0
    assert main(["maps", "tiny", *over, "--split", "val", "--quiet"]) == 0
    assert main(["pseudo", "tiny", *over, "--seeds", str(base / "run/seeds/val/fused"), "--out", str(base / "masks"),
                 "pseudo.split=val", "--quiet"]) == 0
    cfg = load_config("tiny", over)
    from tokenseg.data import build_dataset

    ds = build_dataset(cfg.data, "val")
    root = Path(ds.image_paths[0]).parent.parent
    return {"base": base, "over": over, "ckpt": base / "run" / "checkpoint.pt", "masks": base / "masks",
            "seeds": base / "run" / "seeds" / "val", "root": root, "ds": ds}


def err_of(code: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    # one error line, no traceback (warnings about the settings may come before it)
    err = "\n".join(line for line in err.strip().splitlines() if not line.startswith("tokenseg: warning:"))
    assert len(err.splitlines()) == 1 and err.startswith("tokenseg: error:"), err
    for n in needles:
        assert n in err, err
    return err


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def seg_args(r, out, *extra):
    return ["segment", "train", "tiny", *r["over"], "--masks", str(r["masks"]), "--out", str(out),
            "segment.train_split=val", "--quiet", *extra]


# ----------------------------------------------------------------------------- writes where they do not belong
def test_predict_refuses_to_write_into_the_checkpoints_dataset(run, capsys):
    gt = run["root"] / "SegmentationClass"
    victim = gt / f"{run['ds'].ids[0]}.png"
    before = snapshot(victim)
    img = str(run["ds"].image_paths[0])
    err_of(main(["predict", img, "--checkpoint", str(run["ckpt"]), "--out", str(gt), "--quiet"]), capsys,
           "inside the dataset", "predict --out")
    assert snapshot(victim) == before


def test_json_reports_and_label_files_never_go_into_the_dataset(run, tmp_path, capsys):
    root, over = run["root"], run["over"]
    target = root / "x.json"
    err_of(main(["evaluate", "tiny", *over, "--split", "val", "--json", str(target), "--quiet"]), capsys,
           "evaluate --json", "inside the dataset")
    err_of(main(["pseudo", "tiny", *over, "--seeds", str(run["seeds"] / "fused"), "--out", str(tmp_path / "m"),
                 "pseudo.split=val", "--json", str(target), "--quiet"]), capsys, "pseudo --json")
    err_of(main(["segment", "evaluate", "tiny", *over, "--checkpoint", str(run["ckpt"]), "--json", str(target),
                 "--quiet"]), capsys, "segment evaluate --json")
    err_of(main(["data", "labels", "tiny", *over, "--import-npy", str(tmp_path / "cls_labels.npy"), "-o",
                 str(target)]), capsys, "data labels -o")
    assert not target.exists() and not (tmp_path / "m").exists()
    kept = root / "their_seeds"  # seeds someone keeps inside the dataset: scored, nothing written there
    shutil.copytree(run["seeds"] / "fused", kept / "fused")
    try:
        assert main(["evaluate", "tiny", *over, "--split", "val", "--seeds", str(kept / "fused"), "--quiet"]) == 0
        assert sorted(p.name for p in kept.rglob("*.json")) == []
    finally:
        shutil.rmtree(kept)


def test_segment_train_never_shares_a_checkpoint_with_a_classifier(run, tmp_path, capsys):
    before = snapshot(run["ckpt"])
    cls_dir = run["ckpt"].parent
    err_of(main(seg_args(run, cls_dir)), capsys, "checkpoint.pt", "own folder")
    assert snapshot(run["ckpt"]) == before
    seg = tmp_path / "seg"
    assert main(seg_args(run, seg)) == 0
    seg_ckpt = snapshot(seg / "checkpoint.pt")
    err_of(main(["train", "tiny", *run["over"], f"output_dir={seg}", "--quiet"]), capsys,
           "segmentation checkpoint", "its own output_dir")
    assert snapshot(seg / "checkpoint.pt") == seg_ckpt


def test_planted_symlinks_redirect_no_write(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "seeds"
    out.mkdir()
    (out / ".tokenseg.lock").symlink_to(victim)
    err_of(main(["maps", "tiny", *run["over"], "--split", "val", "--out", str(out), "--quiet"]), capsys,
           "symbolic link", ".tokenseg.lock")
    log = tmp_path / "log.jsonl"
    log.symlink_to(victim)
    with pytest.raises(TokensegError, match="symbolic link"):
        append_jsonl(log, {"epoch": 0})
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "log.jsonl").symlink_to(victim)
    assert main(seg_args(run, seg)) == 0  # the fresh run's log replaces the link, never appends to its target
    assert victim.read_text() == "precious\n"
    assert not (seg / "log.jsonl").is_symlink()


# ----------------------------------------------------------------------------- resume never mixes settings
def test_maps_record_which_weights_made_the_seeds(run, tmp_path, capsys):
    ckpt = tmp_path / "c.pt"
    shutil.copy(run["ckpt"], ckpt)
    out = tmp_path / "seeds"
    args = ["maps", "tiny", *run["over"], "--split", "val", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]
    assert main(args) == 0
    state = torch.load(ckpt, weights_only=False)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt)  # retrained into the same path: same path, other weights
    err_of(main(args), capsys, "checkpoint: 'sha256:", "--overwrite")
    assert main([*args, "--overwrite"]) == 0


def test_train_continues_only_with_the_same_settings(run, capsys):
    over = run["over"]
    ckpt, config = run["ckpt"], run["ckpt"].parent / "config.yaml"
    before, cfg_before = snapshot(ckpt), config.read_text()
    err_of(main(["train", "tiny", *over, "train.lr=0.002", "--resume", "--quiet"]), capsys,
           "train.lr: 0.001 -> 0.002", "--overwrite", "another output_dir")
    err_of(main(["run", "tiny", *over, "train.lr=0.002", "--quiet"]), capsys, "train.lr")
    assert snapshot(ckpt) == before and config.read_text() == cfg_before
    # the same command again, without --resume: continues the finished run, overwrites nothing
    assert main(["train", "tiny", *over]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "same settings" in out
    # keys that cannot change the weights may differ
    assert main(["train", "tiny", *over, "train.checkpoint_every=3", "train.device=cpu", "--quiet"]) == 0
    assert snapshot(ckpt) == before


def test_pseudo_masks_record_their_settings(run, tmp_path, capsys):
    args = ["pseudo", "tiny", *run["over"], "--seeds", str(run["seeds"] / "fused"), "--out", str(tmp_path / "m"),
            "pseudo.split=val", "--quiet"]
    assert main(args) == 0
    err_of(main([*args, "pseudo.threshold=0.6"]), capsys, "pseudo.threshold", "--overwrite")
    assert main([*args, "pseudo.workers=2"]) == 0  # a worker count cannot change a mask
    assert main([*args, "pseudo.threshold=0.6", "--overwrite"]) == 0


def test_affinitynet_checks_its_settings_and_never_unpickles(run, tmp_path, capsys, monkeypatch):
    load = torch.load

    def tensors_only(*a, **k):
        assert k.get("weights_only") is not False, "torch.load(weights_only=False)"
        return load(*a, **k)

    monkeypatch.setattr(torch, "load", tensors_only)
    work = tmp_path / "work"
    common = ["pseudo", "tiny", *run["over"], "--seeds", str(run["seeds"] / "fused"), "pseudo.split=val",
              "pseudo.refine=affinitynet", "pseudo.aff_backbone=resnet10t", "pseudo.aff_crop=32",
              "pseudo.aff_batch_size=4", "pseudo.aff_max_steps=2", "--work", str(work), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    err_of(main([*common, "--out", str(tmp_path / "b"), "pseudo.aff_lr=0.02"]), capsys, "aff_lr: 0.01 -> 0.02")
    err_of(main([*common, "--out", str(tmp_path / "c"), "pseudo.aff_alpha_high=6"]), capsys, "aff_alpha_high")
    assert main([*common, "--out", str(tmp_path / "c"), "pseudo.aff_alpha_high=6", "--overwrite"]) == 0


def test_segment_train_resumes_only_with_its_settings_and_logs_once(run, tmp_path, capsys):
    seg = tmp_path / "seg"
    assert main(seg_args(run, seg)) == 0
    before = snapshot(seg / "checkpoint.pt")
    err_of(main(seg_args(run, seg, "--resume", "segment.lr=0.01")), capsys, "segment.lr", "--overwrite")
    assert main(seg_args(run, seg)) == 0  # a re-run without --resume into the finished folder
    assert snapshot(seg / "checkpoint.pt")[0] == before[0]
    epochs = [json.loads(x)["epoch"] for x in (seg / "log.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))  # never 0, 1, 0, 1
    assert main(seg_args(run, seg, "segment.lr=0.01", "--overwrite")) == 0
    epochs = [json.loads(x)["epoch"] for x in (seg / "log.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))


# ----------------------------------------------------------------------------- crashes, kills, a full disk
def test_kill_after_the_checkpoint_before_validation_redoes_it(run, tmp_path, monkeypatch):
    cfg = load_config("tiny", [*run["over"], f"output_dir={tmp_path / 'k'}"])
    real = engine.evaluate_map

    def killed(*a, **k):
        monkeypatch.setattr(engine, "evaluate_map", real)
        raise KeyboardInterrupt  # the epoch's checkpoint is written, its val mAP not

    monkeypatch.setattr(engine, "evaluate_map", killed)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, progress=False)
    assert not (tmp_path / "k" / "checkpoint_best.pt").exists()
    engine.train(cfg, resume=True, progress=False)

    def val_lines(folder):
        return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "val_map" in r]

    assert val_lines(tmp_path / "k") == val_lines(run["ckpt"].parent) != []
    best = torch.load(tmp_path / "k" / "checkpoint_best.pt", weights_only=False)
    ref = torch.load(run["ckpt"].parent / "checkpoint_best.pt", weights_only=False)
    assert best["val_map"] == ref["val_map"]


def test_sigint_inside_the_first_epoch_leaves_a_resumable_checkpoint(run, tmp_path, capsys, monkeypatch):
    cfg = load_config("tiny", [*run["over"], f"output_dir={tmp_path / 'i'}"])

    def ctrl_c(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled at the step boundary

    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, progress=False, on_step=ctrl_c)
    assert torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=False)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    engine.train(cfg, progress=False)
    a = torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(run["ckpt"], weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)  # = the uninterrupted run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokenseg.pipeline.train_step", interrupted)
    assert main(["train", "tiny", *run["over"], "--quiet"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_sigterm_is_honoured_the_same_way(run, tmp_path):
    """A scheduler's SIGTERM (e.g. a job's time limit) inside the first epoch: a checkpoint at that step."""
    cfg = load_config("tiny", [*run["over"], f"output_dir={tmp_path / 't'}", "train.max_steps=3"])

    def term(step, _):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, progress=False, on_step=term)
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_stale_temp_files_and_builds_are_cleaned_only_ours(run, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["maps", "tiny", *run["over"], "--split", "val", "--out", str(out), "--quiet"]) == 0
    kind = out / "fused"
    ours = [kind / ".tokenseg-0123abcd.tmp", kind / f".{run['ds'].ids[0]}.npz.a1B2_c3d.tmp",
            out / ".tokenseg-89abcdef.tmp"]
    theirs = [kind / ".notes.tmp", kind / "mine.tmp", out / ".keep"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    (kind / f"{run['ds'].ids[1]}.npz").unlink()
    (kind / f"{run['ds'].ids[2]}.npz").unlink()
    assert main(["maps", "tiny", *run["over"], "--split", "val", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"continuing: {len(run['ds']) - 2} of {len(run['ds'])} images done" in printed.out
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    # a synthetic dataset whose generation was killed: its half-built folder goes on the next generation
    from tokenseg.config import SyntheticConfig
    from tokenseg.data.synthetic import ensure_synthetic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = tmp_path / "cache"
    half = cache / f".synthetic-0123456789.{int(dead.stdout)}.abcd1234"
    live = cache / f".synthetic-0123456789.{os.getpid()}.abcd1234"
    half.mkdir(parents=True)
    live.mkdir()
    ensure_synthetic(SyntheticConfig(num_classes=2, image_size=32, train_images=2, val_images=1), cache,
                     progress=False)
    assert not half.exists() and live.exists()


def test_stale_lock_takeover_is_reported(run, tmp_path, capsys):
    out = tmp_path / "seeds"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / ".tokenseg.lock").write_text(json.dumps({"pid": pid, "command": "tokenseg maps (killed)"}))
    assert main(["maps", "tiny", *run["over"], "--split", "val", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "took over the lock" in err and str(pid) in err and "killed" in err


def test_a_250_byte_image_name_works(run, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    name = "n" * 246 + ".jpg"  # 250 bytes: legal on every common file system
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        root / "images" / name)
    (root / "labels.csv").write_text(f"image,labels\n{name},disc\n")
    (root / "classes.txt").write_text("\n".join(run["ds"].class_names) + "\n")
    out = tmp_path / "s"
    assert main(["maps", "tiny", *run["over"], "data.format=folder", f"data.root={root}", "data.train_split=all",
                 "data.val_split=all", "--split", "all", "--checkpoint", str(run["ckpt"]), "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "fused" / ("n" * 246 + ".npz")).is_file()


def test_disk_full_is_one_line_naming_folder_and_file(tmp_path, monkeypatch):
    """Without root: the write fails as a full disk does (ENOSPC from the file system)."""
    import tokenseg.core.files as tio

    real = tio.os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(tio.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(TokensegError, match=r"no space left .*run while writing checkpoint checkpoint.pt"):
        write_bytes_atomic(tmp_path / "run" / "checkpoint.pt", b"x" * 10, "checkpoint")
    assert os.listdir(tmp_path / "run") == []  # no partial file, no temp file


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_disk_full_on_a_real_small_file_system(run, tmp_path, capsys):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("needs root and a mountable tmpfs for a real full disk")
    try:
        (disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # leave 64 KB: a config, no checkpoint
        err_of(main(["train", "tiny", *run["over"], f"output_dir={disk / 'run'}", "--quiet"]), capsys,
               "no space left", "checkpoint.pt", str(disk / "run"))
        assert not list((disk / "run").glob(".tokenseg-*.tmp"))
        (disk / "filler").unlink()
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 40 * 1024))  # a few seeds fit
        err_of(main(["maps", "tiny", *run["over"], "--split", "val", "--out", str(disk / "seeds"), "--quiet"]),
               capsys, "no space left", "seed maps")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------- parameters refused by name
def _all_numeric_fields() -> list[tuple[str, object, dict]]:
    from tokenseg.methods import available_methods, get_method, section_config

    fields = [x for f in dataclasses.fields(Config) if f.name != "sections"
              and dataclasses.is_dataclass(v := getattr(Config(), f.name)) for x in numeric_fields(v, f"{f.name}.")]
    sections = sorted({s for m in available_methods() for s in (get_method(m).section, *get_method(m).uses_sections)
                       if s})
    for s in sections:
        fields += numeric_fields(section_config(s)(), f"{s}.")
    return fields


FIELDS = _all_numeric_fields()
PRESET_OF = {"cti": "demo-cti", "otpl": "demo-otpl", "pot": "demo-pot", "mmcst": "demo-mmcst", "clip_es": "clip-es",
             "cam": "cam"}


@pytest.mark.parametrize("key,default,table", FIELDS, ids=[f[0] for f in FIELDS])
def test_every_numeric_key_has_a_natural_range_checked_at_load(key, default, table):
    spec = table.get(key)
    assert spec is not None, f"{key}: add its natural range to config.RANGES (or its section's RANGES)"
    values = default if isinstance(default, list) else [default]
    assert all(range_problem(v, spec) == "" for v in values), f"{key}: default {default} outside {spec}"
    preset = PRESET_OF.get(key.split(".")[0], "tiny")
    is_int = bool(values) and all(isinstance(v, int) for v in values)
    for bad in ([] if is_int else [".nan"]) + [below(spec, is_int)]:
        if bad is None:
            continue
        with pytest.raises(TokensegError, match=rf"{key.replace('.', '[.]')}"):
            load_config(preset, [f"{key}=[{bad}]" if isinstance(default, list) else f"{key}={bad}"])


def below(spec: str, is_int: bool):
    """A value just under the lower bound of ``spec`` (None when there is none)."""
    if spec == "any":
        return None
    if spec[0] == ">":
        strict = spec[1] != "="
        lo = float(spec[1:] if strict else spec[2:])
    else:
        strict = spec[0] == "("
        lo = float(spec[1:].split(",")[0])
    if strict:
        return int(lo) if is_int else lo
    return int(lo) - 1 if is_int else lo - 0.5


@pytest.mark.parametrize("overrides,needle", [
    (["train.lr=0"], "'train.lr' must be > 0, got 0"),
    (["train.weight_decay=.nan"], "'train.weight_decay' must be >= 0 (a finite number), got nan"),
    (["maps.scales=[1.0,.inf]"], "'maps.scales' must be > 0 (a finite number)"),
    (["pseudo.threshold=1.5"], "'pseudo.threshold' must be in [0, 1], got 1.5"),
    (["eval.t_min=0.9", "eval.t_max=0.1"], "t_min must be <= t_max"),
])
def test_parameters_that_cannot_be_right_are_refused_by_name(overrides, needle, capsys):
    assert main(["train", "tiny", *overrides, "output_dir=/nonexistent/never", "--quiet"]) == 2
    assert needle in capsys.readouterr().err


def test_a_header_only_labels_file_is_named(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "images" / "a.jpg")
    (root / "labels.csv").write_text("image,labels\n")
    (root / "classes.txt").write_text("cat\n")
    err_of(main(["train", "tiny", "data.format=folder", f"data.root={root}", "data.train_split=all",
                 "data.val_split=all", f"output_dir={tmp_path / 'r'}", "--quiet"]), capsys,
           "labels.csv", "header row", "no image rows")


def test_ranges_table_names_only_real_keys():
    real = {k for k, _, _ in FIELDS}
    assert set(RANGES) - real == set()
