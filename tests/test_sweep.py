"""``tokenseg sweep``: the grid, one folder per point, resume (finished points skipped, an interrupted one
continued to the same weights), the table, the plot, refusal of a folder made with other settings."""
import json

import pytest
import torch

from tokenseg import pipeline
from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.io import TokensegError
from tokenseg.sweep import grid, parse_axes, point_name, run_point, split_values


def test_values_axes_and_fixed_overrides():
    assert split_values("1,3, 5") == ["1", "3", "5"]
    assert split_values("[1.0,0.5],[1.0]") == ["[1.0,0.5]", "[1.0]"]
    assert split_values("{a: 1, b: 2}") == ["{a: 1, b: 2}"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]
    axes, fixed = parse_axes(["otpl.top_k=1,3,5", "maps.scales=[1.0,0.5]", "otpl.fusion=geometric,max",
                              "data.synthetic={num_classes: 3, seed: 1}", "train.epochs=2"])
    assert axes == {"otpl.top_k": ["1", "3", "5"], "otpl.fusion": ["geometric", "max"]}
    assert fixed == ["maps.scales=[1.0,0.5]", "data.synthetic={num_classes: 3, seed: 1}", "train.epochs=2"]
    points = grid(axes)
    assert len(points) == 6 and points[0] == {"otpl.top_k": "1", "otpl.fusion": "geometric"}
    assert points[1] == {"otpl.top_k": "1", "otpl.fusion": "max"}  # the last axis varies fastest
    assert point_name({"otpl.top_k": "5", "maps.scales": "[1.0, 0.5]"}) == "otpl.top_k=5,maps.scales=_1.0,_0.5_"
    for bad, match in ((["a.b=1", "a.b=2,3"], "twice"), (["output_dir=x,y"], "output_dir"), (["a.b=1,,2"], "empty"),
                       (["a.b=1,1"], "repeats"), (["nokey"], "must look like")):
        with pytest.raises(TokensegError, match=match):
            parse_axes(bad)


def test_sweep_runs_two_values_resumes_and_refuses_other_settings(tiny_overrides, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    cache = tiny_overrides[0]
    args = ["sweep", "tiny", "model.cct_weight=0,1", "train.epochs=2", cache, "--out", str(out), "--quiet"]
    real_train = pipeline.train_step

    def killed(cfg, resume=True, progress=True):  # dies in the 2nd point's training, after its epoch-1 checkpoint
        from tokenseg.engine import train

        def kill(step, _):
            if step == 8 and cfg.model.cct_weight == 1:
                raise KeyboardInterrupt

        return train(cfg, resume=resume, progress=False, on_step=kill)

    monkeypatch.setattr(pipeline, "train_step", killed)
    assert main(args) == 130
    first = out / "model.cct_weight=0"
    second = out / "model.cct_weight=1"
    assert (first / "sweep_point.json").is_file() and not (second / "sweep_point.json").exists()
    assert torch.load(second / "checkpoint.pt", weights_only=False)["step"] == 6
    mtime = (first / "checkpoint.pt").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "train_step", real_train)
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model.cct_weight" in printed and "fused_affinity" in printed
    assert (first / "checkpoint.pt").stat().st_mtime_ns == mtime  # the finished point was not redone
    table = json.loads((out / "sweep.json").read_text())
    assert [r["point"] for r in table["rows"]] == [{"model.cct_weight": "0"}, {"model.cct_weight": "1"}]
    assert all(0 < r["best"]["miou"] <= 100 for r in table["rows"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the resumed point ends with the weights of an uninterrupted run of the same config
    ref_cfg = load_config("tiny", ["model.cct_weight=1", "train.epochs=2", cache, f"output_dir={tmp_path / 'ref'}"])
    ref = run_point(ref_cfg, progress=False)
    sa = torch.load(second / "checkpoint.pt", weights_only=False)["model"]
    sb = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert ref["seeds"] == table["rows"][1]["seeds"]

    # nothing left to do: no training at all; --stage masks adds the masks only
    def no_training(*a, **k):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(pipeline, "train_step", no_training)
    assert main(args) == 0
    assert main([*args, "--stage", "masks"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert all(0 < r["masks"]["miou"] <= 100 and r["masks"]["kind"] == r["best"]["kind"] for r in rows)
    assert len(list((first / "pseudo").glob("*.png"))) == 16

    # another fixed setting into the same folder is refused, naming what differs
    capsys.readouterr()
    assert main([*args[:3], "train.epochs=1", *args[4:]]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "another --out" in err
