"""Every command that reads weights reads them tensors-only: a planted pickle never runs without
--allow-pickle; files that are not checkpoints say what they are; safetensors round-trips."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenseg.cli import main
from tokenseg.core.weights import describe_file, read_weights
from tokenseg.checkpoint import load_model_from_checkpoint
from tokenseg.core.errors import TokensegError


class _Planted:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Planted(marker), "config": {}, "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny run with val seeds (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("run")
    over = [f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'run'}", "train.epochs=1",
            "maps.kinds=[fused]"]
    assert main(["train", "tiny", *over, "--quiet"]) == 0
    assert main(["maps", "tiny", *over, "--split", "val", "--quiet"]) == 0
    return root, over


def _no_marker(code: int, marker: Path, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert not marker.exists(), "a planted pickle ran"
    assert "Python objects besides tensors" in err, err  # refused by the reader, not by something earlier
    return err


def test_maps_and_train_resume_refuse_a_planted_checkpoint(tiny_run, tmp_path, capsys):
    root, over = tiny_run
    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.pt", marker)
    err = _no_marker(main(["maps", "tiny", *over, "--checkpoint", str(evil), "--split", "val", "--out",
                           str(tmp_path / "s"), "--quiet"]), marker, capsys)
    assert "Python objects besides tensors" in err
    run = tmp_path / "planted_run"
    plant(run / "checkpoint.pt", marker)
    _no_marker(main(["train", "tiny", *over, f"output_dir={run}", "--resume", "--quiet"]), marker, capsys)
    _no_marker(main(["train", "tiny", *over, f"model.pretrained={evil}", f"output_dir={tmp_path / 'r2'}",
                     "--quiet"]), marker, capsys)


def test_segment_train_resume_and_evaluate_refuse_a_planted_checkpoint(tiny_run, tmp_path, capsys):
    root, over = tiny_run
    marker = tmp_path / "marker"
    seg = tmp_path / "seg"
    plant(seg / "checkpoint.pt", marker)
    masks = tmp_path / "masks"
    assert main(["pseudo", "tiny", *over, "--seeds", str(root / "run" / "seeds" / "val" / "fused"), "--out",
                 str(masks), "pseudo.split=val", "--quiet"]) == 0
    capsys.readouterr()
    _no_marker(main(["segment", "train", "tiny", *over, "--masks", str(masks), "--out", str(seg), "--resume",
                     "segment.train_split=val", "--quiet"]), marker, capsys)
    _no_marker(main(["segment", "evaluate", "tiny", *over, "--checkpoint", str(seg / "checkpoint.pt"),
                     "--quiet"]), marker, capsys)


def test_pseudo_refiners_refuse_planted_weights(tiny_run, tmp_path, capsys):
    root, over = tiny_run
    marker = tmp_path / "marker"
    seeds = root / "run" / "seeds" / "val" / "fused"
    work = tmp_path / "work"
    plant(work / "affinitynet.pt", marker)
    _no_marker(main(["pseudo", "tiny", *over, "--seeds", str(seeds), "--out", str(tmp_path / "p1"),
                     "pseudo.split=val", "pseudo.refine=affinitynet", "pseudo.aff_backbone=resnet10t",
                     "--work", str(work), "--quiet"]), marker, capsys)
    evil = plant(tmp_path / "evil.pt", marker)
    _no_marker(main(["pseudo", "tiny", *over, "--seeds", str(seeds), "--out", str(tmp_path / "p2"),
                     "pseudo.split=val", "pseudo.refine=attention", "--checkpoint", str(evil), "--quiet"]),
               marker, capsys)


def test_predict_and_convert_refuse_a_planted_checkpoint_unless_allowed(tmp_path, capsys):
    from PIL import Image

    marker = tmp_path / "marker"
    evil = plant(tmp_path / "evil.pt", marker)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
    _no_marker(main(["predict", str(tmp_path / "photo.png"), "--checkpoint", str(evil), "--out",
                     str(tmp_path / "pred"), "--quiet"]), marker, capsys)
    _no_marker(main(["convert", str(evil), str(tmp_path / "out.pt")]), marker, capsys)
    with pytest.raises(Exception):  # the user's explicit choice: it unpickles (and then is no model)
        main(["convert", str(evil), str(tmp_path / "out.pt"), "--allow-pickle"])
    assert marker.exists()  # ... and the planted code ran: the checks above can fail


@pytest.mark.parametrize("content,what", [
    (b"\xff\xd8\xff\xe0" + bytes(100), "a JPEG image"),
    (b"model:\n  method: cti\n", "a text (YAML?) file"),
    (bytes(range(256)) * 4, "binary data of an unknown format"),
    (b"", "an empty file")])
def test_not_a_checkpoint_says_what_the_file_is(tmp_path, content, what):
    p = tmp_path / "weights.pt"
    p.write_bytes(content)
    assert describe_file(p) == what
    with pytest.raises(TokensegError) as exc:
        read_weights(p)
    assert f"not a checkpoint: {what}" in str(exc.value) and "allow-pickle" not in str(exc.value)


def test_safetensors_export_loads_by_path_with_the_same_outputs(tiny_run, tmp_path):
    root, over = tiny_run
    ckpt = root / "run" / "checkpoint.pt"
    out = tmp_path / "w.safetensors"
    assert main(["convert", str(ckpt), str(out), "--to", "safetensors"]) == 0
    a, cfg_a, names_a = load_model_from_checkpoint(ckpt)
    b, cfg_b, names_b = load_model_from_checkpoint(out)
    assert names_a == names_b and cfg_a.to_dict() == cfg_b.to_dict()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    shutil.copy(out, tmp_path / "copy.safetensors")
    assert main(["maps", "tiny", *over, "--checkpoint", str(tmp_path / "copy.safetensors"), "--split", "val",
                 "--out", str(tmp_path / "seeds"), "--quiet"]) == 0
