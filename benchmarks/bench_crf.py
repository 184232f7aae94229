"""DenseCRF backends side by side: pydensecrf2 (the authors' permutohedral lattice, the default) and the
pure-torch fallback (``pseudo.crf_backend=torch``), per preset and image size, on real photos.

Cases: scikit-image's sample photos (``tests/crf_photos.py``: astronaut, coffee, chelsea, rocket),
centre-cropped and resized to 64×64 (the torch path's exact cut-off, 4096 px), 96×96 (the demo's
images) and 500×375 (VOC), with CAM-like soft seeds (3 labels); the ``irn`` preset runs IRN's label
CRF on their argmax. Per preset and size: the median seconds of one CRF call of each backend, their
ratio, and the argmax agreement of torch with pydensecrf2 over the photos (mean and worst).

The torch path's exact kernel is the true Gaussian model; pydensecrf2's lattice approximates it, so
even the exact path disagrees with pydensecrf2 on some pixels (see the README's DenseCRF section).

    python benchmarks/bench_crf.py                  # 2 threads, all presets and sizes
    python benchmarks/bench_crf.py --threads 1 --sizes 64x64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import machine, median, table  # noqa: E402
from crf_photos import PHOTOS, SIZES, case  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def measure(preset: str, size: tuple[int, int], photos, repeats: int) -> dict:
    from tokenseg.core.crf import CRF_PRESETS, dense_crf

    p = CRF_PRESETS[preset]
    t_pd, t_torch, agree = [], [], []
    for name in photos:
        image, probs = case(name, size, preset)
        s, q_pd = timed(lambda: dense_crf(image, probs, p, "pydensecrf"), repeats)
        t_pd.append(s)
        s, q_torch = timed(lambda: dense_crf(image, probs, p, "torch"), repeats)
        t_torch.append(s)
        agree.append(100.0 * float((q_pd.argmax(0) == q_torch.argmax(0)).mean()))
    return {"preset": preset, "size": f"{size[0]}x{size[1]}", "pydensecrf_s": median(t_pd), "torch_s": median(t_torch),
            "agree_mean": float(np.mean(agree)), "agree_min": float(np.min(agree)), "photos": list(photos)}


def main() -> None:
    import torch

    from tokenseg.core.crf import CRF_PRESETS, pydensecrf_available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default=",".join(CRF_PRESETS))
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WxH,...")
    ap.add_argument("--photos", default=",".join(PHOTOS))
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (the median is kept)")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    if not pydensecrf_available():
        raise SystemExit("pydensecrf2 is not installed (pip install pydensecrf2)")
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = [measure(preset, size, args.photos.split(","), args.repeats)
            for size in sizes for preset in args.presets.split(",")]
    print(machine())
    print(table(["preset", "W×H", "pydensecrf2 s", "torch s", "torch / pydensecrf2", "agreement % (mean)",
                 "agreement % (worst)"],
                [[r["preset"], r["size"], f"{r['pydensecrf_s']:.3f}", f"{r['torch_s']:.3f}",
                  f"{r['torch_s'] / r['pydensecrf_s']:.1f}×", f"{r['agree_mean']:.2f}", f"{r['agree_min']:.2f}"]
                 for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
