"""``tokenseg sweep``: the grid, one folder per point, resume (finished points skipped, an interrupted one
continued to the same weights), the table, the plot, refusal of a folder made with other settings."""
import json
from pathlib import Path

import pytest
import torch

from tokenseg import pipeline
from tokenseg.cli import main
from tokenseg.config import load_config
from tokenseg.core.errors import TokensegError
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


def test_points_that_differ_in_maps_keys_share_one_training_and_seeds_give_mean_and_std(tiny_overrides, tmp_path,
                                                                                         monkeypatch, capsys):
    """train.seed=0,1 × two map scales: two trainings (one per seed), four maps; mean ± std over the seeds
    per scale, checked against numpy; the plot drawn with error bars."""
    import numpy as np

    from tokenseg.sweep import training_key

    a = load_config("tiny", ["maps.scales=[1.0]", "eval.t_step=0.05", "output_dir=a"])
    b = load_config("tiny", ["maps.scales=[1.0,0.75]", "output_dir=b"])
    assert training_key(a) == training_key(b)
    assert training_key(a) != training_key(load_config("tiny", ["train.seed=1"]))
    out = tmp_path / "sweep"
    trained = []
    real_train = pipeline.train_step

    def counting(cfg, resume=True, progress=True):
        ckpt = Path(cfg.output_dir) / "checkpoint.pt"
        before = ckpt.stat().st_mtime_ns if ckpt.is_file() else None
        res = real_train(cfg, resume=resume, progress=False)
        if ckpt.stat().st_mtime_ns != before:
            trained.append(Path(cfg.output_dir).name)
        return res

    monkeypatch.setattr(pipeline, "train_step", counting)
    args = ["sweep", "tiny", "train.seed=0,1", "maps.scales=[1.0],[1.0,0.75]", "maps.kinds=[fused,patchcam]",
            "train.max_steps=2", tiny_overrides[0], "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert trained == ["train.seed=0,maps.scales=_1.0_", "train.seed=1,maps.scales=_1.0_"]
    table = json.loads((out / "sweep.json").read_text())
    assert table["trainings"] == 2 and len(table["rows"]) == 4
    shared = out / "train.seed=0,maps.scales=_1.0,0.75_"
    assert not (shared / "checkpoint.pt").exists() and (shared / "seeds" / "val" / "fused").is_dir()
    assert load_config(str(shared / "config.yaml")).maps.scales == [1.0, 0.75]  # its own settings, for a report
    assert table["rows"][1]["trained_in"].endswith("train.seed=0,maps.scales=_1.0_")
    groups = table["variance"]
    assert [g["point"] for g in groups] == [{"maps.scales": "[1.0]"}, {"maps.scales": "[1.0,0.75]"}]
    for g in groups:
        rows = [r for r in table["rows"] if r["point"]["maps.scales"] == g["point"]["maps.scales"]]
        assert g["seeds"] == ["0", "1"]
        for kind in ("fused", "patchcam"):
            v = np.array([r["seeds"][kind]["miou"] for r in rows])
            st = g["kinds"][kind]
            assert st["mean"] == pytest.approx(v.mean()) and st["std"] == pytest.approx(v.std(ddof=1))
            assert (st["min"], st["max"], st["n"]) == (v.min(), v.max(), 2)
        assert g["best"]["mean"] == pytest.approx(np.mean([r["best"]["miou"] for r in rows]))
    st = groups[0]["kinds"]["fused"]
    assert f"{st['mean']:.2f} ± {st['std']:.2f} [{st['min']:.2f}, {st['max']:.2f}]" in printed
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_markers_integer_ticks_margin_and_overlaps(tmp_path):
    """Integer keys get their values as ticks, the y range a margin, identical lines a legend name that
    says so, and the legend sits where no line passes."""
    from tokenseg.core.plot import line_plot
    from tokenseg.sweep import _x_axis, name_overlaps, plot_sweep

    table = {"config": "demo-otpl", "axes": {"otpl.top_k": ["1", "3", "5", "7"]}, "rows": [
        {"point": {"otpl.top_k": k}, "seeds": {"attention": {"miou": 40 + int(k)}, "patchcam": {"miou": 40 + int(k)},
                                                "fused": {"miou": 45 - int(k) / 2}}, "best": {"miou": 47}}
        for k in ("1", "3", "5", "7")]}
    xpos, label, ticks = _x_axis(table, "otpl.top_k")
    assert ticks == [1.0, 3.0, 5.0, 7.0] and label == "otpl.top_k"
    assert _x_axis({"axes": {"k": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "20"]}}, "k")[2] == \
        [5.0, 10.0, 15.0, 20.0]
    assert _x_axis({"axes": {"x": ["0", "0.2", "1"]}}, "x")[2] is None
    series = {"attention": ([1, 3], [41, 43]), "patchcam": ([1, 3], [41, 43]), "fused": ([1, 3], [44.5, 43.5])}
    named, errs = name_overlaps(series, {"patchcam": [1, 1]})
    assert list(named) == ["attention", "patchcam (= attention)", "fused"] and errs == {"patchcam (= attention)": [1, 1]}
    lay = line_plot(tmp_path / "p.png", {"rising": ([1, 3, 5, 7], [41, 43, 45, 47]), "falling": ([1, 7], [44.5, 41.5])},
                    markers=True, xticks=[1, 3, 5, 7], margin=0.1)
    assert lay["xticks"] == [1, 3, 5, 7]
    assert lay["ylim"][0] == pytest.approx(41 - 0.6) and lay["ylim"][1] == pytest.approx(47 + 0.6)
    left, top, right, bottom = lay["box"]
    x0, x1 = lay["xlim"]
    y0, y1 = lay["ylim"]
    bx0, by0, bx1, by1 = lay["legend"]
    for x, y in ((7, 47), (6, 46), (1, 44.5), (1, 41)):  # points of both lines: none under the legend
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        assert not (bx0 <= px <= bx1 and by0 <= py <= by1)
    plot_sweep(table, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_from_before_a_key_existed_resumes_only_while_that_key_is_at_its_default(tmp_path):
    """An older tokenseg wrote config.yaml without a key added since (here pseudo.aff_seed): at its default
    the folder is the same config; set to anything else, it is another one."""
    import yaml

    from tokenseg.sweep import check_folder

    cfg = load_config("tiny", [f"output_dir={tmp_path}"])
    old = yaml.safe_load(cfg.to_yaml())
    del old["pseudo"]["aff_seed"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    check_folder(tmp_path, cfg)  # no error
    with pytest.raises(TokensegError, match=r"pseudo\.aff_seed"):
        check_folder(tmp_path, load_config("tiny", [f"output_dir={tmp_path}", "pseudo.aff_seed=3"]))
    old["train"]["epochs"] = 99  # a stored key that differs still does
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    with pytest.raises(TokensegError, match=r"train\.epochs"):
        check_folder(tmp_path, cfg)
