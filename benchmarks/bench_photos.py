"""Your own photos with the small CPU recipe: peak memory and time of ``tokenseg maps`` and ``tokenseg predict``.

The workload of the user report (issue "What a new user hits"): the demo recipe (``preset: demo``: a 6-block
128-dim ViT, patch 8, trained at 96 px; random weights here) with COCO's 80 classes on real-sized photos.

``maps``          ``tokenseg maps`` on 24 photos of 640×480, 3 classes present each, every demo map kind,
                  the demo's scales 1.0/1.25/1.5 + flip and its ``maps.batch_size`` 32, as a user runs it;
                  with ``--no-cap`` also with ``maps.max_side=0`` (the largest view 960×720, 10,800 tokens:
                  minutes per photo on a CPU) to show what the cap saves.
``predict``       ``tokenseg predict`` on one 4000×3000 photo from that classification checkpoint (working
                  size = the checkpoint's ``model.img_size``, mask written at full size).

Each variant is one ``tokenseg`` process; its peak RSS (``ru_maxrss`` of the child) and wall time are
printed. The photos are smooth random images (what they show does not change the cost).

    python benchmarks/bench_photos.py
    python benchmarks/bench_photos.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

CLASSES = [f"class{i:02d}" for i in range(80)]


def smooth_photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3)).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def make_dataset(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = ["image,labels"]
    for i in range(n):
        smooth_photo(rng, 640, 480).save(root / "images" / f"photo{i:03d}.jpg", quality=90)
        present = sorted(rng.choice(80, 3, replace=False).tolist())
        lines.append(f"photo{i:03d}.jpg," + ";".join(CLASSES[c] for c in present))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def make_checkpoint(path: Path, root: Path, out: Path) -> None:
    import torch

    from tokenseg.checkpoint import save_checkpoint
    from tokenseg.config import load_config
    from tokenseg.methods import get_method

    cfg = load_config("demo", ["data.format=folder", f"data.root={root}", f"output_dir={out}"])
    torch.manual_seed(0)
    model = get_method(cfg.model.method).build(cfg, len(CLASSES))
    save_checkpoint(path, model, None, None, 0, cfg, CLASSES)


WORKER = ("import json, resource, sys, time\n"
          "from tokenseg.cli import main\n"
          "t = time.perf_counter(); rc = main(sys.argv[1:])\n"
          "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,\n"
          "                  'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")


def run(args: list[str], threads: int) -> dict:
    """One ``tokenseg`` command in a fresh process; its own peak RSS and the command's wall time."""
    env = {**os.environ, "TOKENSEG_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", WORKER, *args, "--quiet"], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"failed: tokenseg {' '.join(args)}\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] not in (0, None):
        raise SystemExit(f"tokenseg {' '.join(args)} exited {res['rc']}\n{proc.stderr[-3000:]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--no-cap", action="store_true", help="also map with maps.max_side=0 (slow: what the cap saves)")
    a = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, out = tmp / "photos", tmp / "run"
        make_dataset(root, a.images)
        ckpt = tmp / "classifier.pt"
        make_checkpoint(ckpt, root, out)
        common = ["demo", "data.format=folder", f"data.root={root}", "data.train_split=all", "data.val_split=all",
                  f"data.cache_dir={tmp / 'cache'}", f"output_dir={out}", "--checkpoint", str(ckpt), "--split", "all"]
        big = tmp / "big.jpg"
        smooth_photo(np.random.default_rng(1), 4000, 3000).save(big, quality=90)
        rows, results = [], {}
        results["predict"] = run(["predict", str(big), "--checkpoint", str(ckpt), "--out", str(tmp / "pred"),
                                  "--cls-threshold", "0.5"], a.threads)
        results["maps"] = run(["maps", *common, "--out", str(tmp / "seeds")], a.threads)
        if a.no_cap:  # minutes per photo on a CPU: explicit attention over 10,800 tokens in every layer
            results["maps, no cap"] = run(["maps", *common, "--out", str(tmp / "seeds_nocap"), "maps.max_side=0"],
                                          a.threads)
        for name, r in results.items():
            n = 1 if name == "predict" else a.images
            what = "one 4000x3000 photo" if name == "predict" else f"{n} photos 640x480, 80 classes, 3 present"
            rows.append([name, what, f"{r['seconds']:.1f} s", f"{r['seconds'] / n:.2f} s/img", f"{r['peak_mb']:.0f} MB"])
        print(table(["variant", "workload", "wall", "per image", "peak RSS"], rows))
        print(json.dumps(results))


if __name__ == "__main__":
    main()
