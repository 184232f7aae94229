"""torchrun + DDP on 2 CPU processes (gloo) reproduces a single process with the same global batch,
and rank-sharded maps, pseudo masks and predictions equal one process's."""
import os
import subprocess
from pathlib import Path
import sys

import numpy as np
import torch

from tokenseg.core.seeds import load_seed


def torchrun(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokenseg", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_ddp_training_and_sharded_maps_match_single_process(tmp_path):
    from tokenseg.cli import main

    common = [f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu", "train.epochs=1",
              "train.eval_every=0", "model.drop_path=0.0", "maps.kinds=[fused_affinity]"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["train", "tiny", *common, f"output_dir={single}", "--quiet"]) == 0
    torchrun(["train", "tiny", *common, f"output_dir={multi}", "--quiet"])
    a = torch.load(single / "checkpoint.pt", weights_only=False)
    b = torch.load(multi / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)

    ckpt = str(single / "checkpoint.pt")
    assert main(["maps", "tiny", *common, f"output_dir={single}", "--checkpoint", ckpt, "--split", "val",
                 "--out", str(tmp_path / "m1"), "--quiet"]) == 0
    torchrun(["maps", "tiny", *common, f"output_dir={single}", "--checkpoint", ckpt, "--split", "val",
              "--out", str(tmp_path / "m2"), "--quiet"])
    f1 = sorted(p.name for p in (tmp_path / "m1" / "fused_affinity").glob("*.npz"))
    f2 = sorted(p.name for p in (tmp_path / "m2" / "fused_affinity").glob("*.npz"))
    assert f1 == f2 and len(f1) == 16
    for name in f1:
        s1 = load_seed(tmp_path / "m1" / "fused_affinity" / name)
        s2 = load_seed(tmp_path / "m2" / "fused_affinity" / name)
        np.testing.assert_array_equal(s1.classes, s2.classes)
        np.testing.assert_allclose(s1.maps.astype(np.float32), s2.maps.astype(np.float32), atol=2e-3)

    # pseudo masks: each rank writes its share; together the same PNGs as one process, one summary
    from tokenseg.core.masks import read_mask

    seeds = str(tmp_path / "m1" / "fused_affinity")
    extra = ["pseudo.split=val", "pseudo.threshold=0.4", "pseudo.crf=false"]
    assert main(["pseudo", "tiny", *common, *extra, f"output_dir={single}", "--seeds", seeds,
                 "--out", str(tmp_path / "p1"), "--quiet"]) == 0
    torchrun(["pseudo", "tiny", *common, *extra, f"output_dir={single}", "--seeds", seeds,
              "--out", str(tmp_path / "p2"), "--quiet"])
    p1 = sorted(p.name for p in (tmp_path / "p1").glob("*.png"))
    assert p1 == sorted(p.name for p in (tmp_path / "p2").glob("*.png")) and len(p1) == 16
    for name in p1:
        np.testing.assert_array_equal(read_mask(tmp_path / "p1" / name), read_mask(tmp_path / "p2" / name))
    import json

    assert json.loads((tmp_path / "p2" / "pseudo_summary.json").read_text())["written"] == 16

    # predict: each rank its share of the images; one predictions.json in input order
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)).save(photos / f"p{k}.png")
    args = ["predict", str(photos), "--checkpoint", ckpt, "--cls-threshold", "0", "--no-overlay", "--quiet",
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "q1")]) == 0
    torchrun([*args, "--out", str(tmp_path / "q2")])
    for k in range(5):
        np.testing.assert_array_equal(read_mask(tmp_path / "q1" / f"p{k}.png"), read_mask(tmp_path / "q2" / f"p{k}.png"))
    listed = json.loads((tmp_path / "q2" / "predictions.json").read_text())["images"]
    assert [Path(r["image"]).name for r in listed] == [f"p{k}.png" for k in range(5)]
