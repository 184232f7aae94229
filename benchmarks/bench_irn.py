"""IRN random walk (``pseudo.refine=irn``, stage 3): our local operator vs the authors' dense matrix.

``ours``     :func:`tokenseg.refine.irn.propagate`: path affinities of the 69 neighbours (radius 5)
             of every cell of the stride-4 grid, row-normalised a^β, 2^8 = 256 walk steps, each 69
             shifted multiply-adds over a flat zero-padded grid (``banded``) or one sparse CSR
             product (``sparse``); float64 (exact) or float32; images batched (``--batch``).
``authors``  their ``propagate_to_edge`` re-implemented here: the affinities scattered into a dense
             (h+r)(w+2r) × (h+r)(w+2r) matrix, cropped to hw × hw, ``T = a^β / column sums``, squared
             8 times (``T^256``), ``rw = x T``; float32 as on their GPU. It is run at sizes that fit
             (``--dense-sizes``) and its time extrapolated to 500×375 by (hw)³, its matrix memory by (hw)².

Inputs: a synthetic boundary map (sigmoid of random smooth fields) on the stride-4 grid of the image
and ``--classes`` seed channels. Every variant runs in its own process, so the peak RSS column is
that variant's own ("walk memory": minus what the process held before the walk). At the dense sizes the
script also checks that both give the same walk.

    python benchmarks/bench_irn.py                 # 500×375, 2 classes, 2 threads
    python benchmarks/bench_irn.py --threads 1 --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, maxrss_mb, median, run_worker, table  # noqa: E402

RADIUS, BETA, EXP_TIMES = 5, 10.0, 8


def grid_of(width: int, height: int) -> tuple[int, int]:
    return (height - 1) // 4 + 1, (width - 1) // 4 + 1


def make_inputs(h: int, w: int, k: int, batch: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(batch, 1, max(h // 8, 2), max(w // 8, 2), generator=g), size=(h, w),
                          mode="bilinear", align_corners=False)[:, 0]
    edge = torch.sigmoid(8 * (field.abs() - 0.3)).neg().add(1)  # thin high ridges where the field crosses 0
    x = torch.rand(batch, k, h, w, generator=g)
    return edge, x


def authors_walk(x, edge):
    """Their dense approach (see the module docstring), one image: x (K, h, w), edge (h, w)."""
    import torch

    from tokenseg.refine.irn_walk import boundary_bands, flush_level, walk_offsets

    h, w = edge.shape
    r = RADIUS
    vp, hp = h + r, w + 2 * r  # their padded grid: r columns left and right, r rows below
    bands = boundary_bands(edge[None], r)[0]  # the same path affinities
    idx = torch.arange(vp * hp, device=edge.device).reshape(vp, hp)[:h, r:r + w]
    # their to_dense() of the padded sparse matrix
    dense = torch.zeros(vp * hp, vp * hp, dtype=edge.dtype, device=edge.device)
    for k, (dy, dx) in enumerate(walk_offsets(r)):
        ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
        src = idx[ys, xs].reshape(-1)
        dst = idx[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx].reshape(-1)
        dense[src, dst] = bands[k, ys, xs].reshape(-1)
    dense = dense.view(vp, hp, vp, hp)[:-r, r:-r, :-r, r:-r].reshape(h * w, h * w)
    t = dense.pow(BETA)
    t = t / t.sum(0, keepdim=True)
    del dense
    level = flush_level(t.dtype)  # subnormals -> 0, as their GPU does: a CPU would run ~20x slower on them
    for _ in range(EXP_TIMES):
        t = torch.threshold(t, level, 0.0)
        t = t @ t
    v = (x * (1 - edge)[None]).reshape(x.shape[0], -1)
    return (v @ t).reshape(x.shape)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from tokenseg.refine.irn import propagate

    h, w = grid_of(args.width, args.height)
    edge, x = make_inputs(h, w, args.classes, args.batch)
    base = maxrss_mb()  # after the imports and the inputs: the rest is the walk's own memory
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    times = []
    if args.variant == "authors":
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = torch.stack([authors_walk(x[i], edge[i]) for i in range(args.batch)])
            times.append((time.perf_counter() - t) / args.batch)
    else:
        propagate(x[:, :, :8, :8].to(dtype), edge[:, :8, :8].to(dtype), None, RADIUS, BETA, 1, args.variant)
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = propagate(x.to(dtype), edge.to(dtype), None, RADIUS, BETA, EXP_TIMES, args.variant)
            times.append((time.perf_counter() - t) / args.batch)
    res = {"s_per_img": median(times), "best": min(times), "rss_mb": maxrss_mb(), "base_mb": base, "grid": [h, w]}
    if args.check:
        ref = torch.stack([authors_walk(x[i].double(), edge[i].double()) for i in range(args.batch)]) \
            if args.variant != "authors" else propagate(x.double(), edge.double(), None, RADIUS, BETA, EXP_TIMES)
        res["max_diff"] = float((out.double() - ref).abs().max())
    return res


def train_step(args) -> None:
    """One default IRNet training step (``--train-step``), timed by part next to its FLOP bound.

    The step of ``train_irn``: frozen ResNet-50 features, boundary and displacement branches, the
    affinity loss (path max over radius-10 pairs) and the displacement loss, backward, SGD. Inputs
    are random images and random labels (0, 1, 2, 255) at ``--crop`` (default 512, IRN's). The FLOP
    count is torch's (convolutions and matrix products, forward and backward); the bound is that count
    at the machine's best measured fp32 matmul rate. Element-wise work (path max, GroupNorm,
    upsampling, the losses) counts no FLOPs, so its bound is 0 and its time is all overhead."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tokenseg.core import optim
    from tokenseg.refine.irn_net import IRNet, irn_loss, reduce_labels
    from _common import matmul_rate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = IRNet(args.backbone, displacement=True, freeze_backbone=True).train()
    net.encoder.requires_grad_(False)
    opt = optim.sgd([{"params": net.edge_parameters()}, {"params": net.displacement_parameters()}], True,
                    lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.step_batch, 3, args.crop, args.crop)
    y = torch.randint(0, 4, (args.step_batch, args.crop, args.crop))
    y[y == 3] = 255

    def parts(flops: FlopCounterMode | None) -> dict:
        times, t = {}, time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            times[name] = now - t
            t = now
            if flops is not None:
                times[name + "_flops"] = sum(flops.get_flop_counts()["Global"].values()) - sum(
                    v for k, v in times.items() if k.endswith("_flops"))
        feats = net.features(x)
        mark("backbone forward")
        h, w = feats[1].shape[-2:]
        edge = net.edge_out(torch.cat([layer(f)[..., :h, :w] for layer, f in zip(net.edge_layers, feats)], 1))
        mark("boundary branch")
        d = [layer(f) for layer, f in zip(net.dp_layers[:5], feats)]
        h8, w8 = d[2].shape[-2:]
        mid = net.dp_layers[5](torch.cat([d[2], d[3][..., :h8, :w8], d[4][..., :h8, :w8]], 1))[..., :h, :w]
        disp = net.dp_layers[6](torch.cat([d[0], d[1], mid], 1))
        mark("displacement branch")
        labels = reduce_labels(y, edge.shape[-2:])
        loss, _ = irn_loss(edge, disp, labels, 10)
        mark("losses (affinity + displacement)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimizer step")
        with torch.no_grad():  # not part of the step: how much of the losses is the affinity (path max) part
            irn_loss(edge, None, labels, 10)
        mark("(of the losses: affinity alone)")
        return times

    parts(None)  # warm-up
    with FlopCounterMode(display=False) as fc:
        counted = parts(fc)
    runs = [parts(None) for _ in range(args.repeats)]
    rate = matmul_rate(torch.float32, torch.device("cpu"))["best"]
    names = [k for k in runs[0] if not k.endswith("_flops")]
    rows, total_t, total_f = [], 0.0, 0.0
    for k in names:
        t = median([r[k] for r in runs])
        gf = counted.get(k + "_flops", 0) / 1e9
        bound = gf / rate
        if not k.startswith("("):
            total_t += t
            total_f += gf
        rows.append([k, f"{t:.3f}", f"{gf:.1f}", f"{bound:.3f}", f"{t / bound:.1f}×" if bound > 0 else "—"])
    rows.append(["step", f"{total_t:.3f}", f"{total_f:.1f}", f"{total_f / rate:.3f}",
                 f"{total_t / (total_f / rate):.2f}×"])
    print(machine())
    print(f"IRNet training step: {args.backbone} frozen, batch {args.step_batch}, crop {args.crop}, "
          f"fp32 matmul rate {rate:.0f} GFLOP/s (best of 7)")
    print(table(["part", "seconds", "GFLOP", "bound s", "time / bound"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--classes", type=int, default=2, help="walked channels (VOC: 1.5 classes per image)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-sizes", default="200x150,300x225", help="image sizes for the authors' dense walk")
    p.add_argument("--quick", action="store_true", help="1 repeat, one dense size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="banded", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train-step", action="store_true", help="time one IRNet training step by part instead")
    p.add_argument("--backbone", default="resnet50", help="--train-step: the timm ResNet")
    p.add_argument("--crop", type=int, default=512, help="--train-step: the (padded) crop side")
    p.add_argument("--step-batch", type=int, default=32, help="--train-step: images per step")
    args = p.parse_args()
    if args.train_step:
        train_step(args)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.repeats = 1
        args.dense_sizes = args.dense_sizes.split(",")[0]
    script = os.path.abspath(__file__)
    common = ["--worker", "--threads", str(args.threads), "--classes", str(args.classes), "--repeats",
              str(args.repeats)]
    print(machine())
    size = ["--width", str(args.width), "--height", str(args.height)]
    rows, dense = [], []
    for variant, dtype, batch in [("banded", "float64", 1), ("banded", "float32", 1), ("banded", "float64", 4),
                                  ("banded", "float32", 4), ("sparse", "float64", 1), ("sparse", "float32", 1)]:
        r = run_worker(script, [*common, *size, "--variant", variant, "--dtype", dtype, "--batch", str(batch)])
        rows.append([f"ours {variant} {dtype}, batch {batch}", f"{args.width}×{args.height}",
                     f"{r['s_per_img']:.3f} (best {r['best']:.3f})", f"{1 / r['s_per_img']:.2f}",
                     f"{r['rss_mb']:.0f}", f"{r['rss_mb'] - r['base_mb']:.0f}", ""])
    for spec in args.dense_sizes.split(","):
        w, h = (int(v) for v in spec.lower().split("x"))
        gh, gw = grid_of(w, h)
        dim = ["--width", str(w), "--height", str(h)]
        a = run_worker(script, [*common, *dim, "--variant", "authors", "--check", "--repeats", "1"])
        o = run_worker(script, [*common, *dim, "--variant", "banded", "--dtype", "float64", "--check"])
        dense.append((gh * gw, a))
        rows.append(["authors dense float32", f"{w}×{h}", f"{a['s_per_img']:.3f}", f"{1 / a['s_per_img']:.3f}",
                     f"{a['rss_mb']:.0f}", f"{a['rss_mb'] - a['base_mb']:.0f}", f"{a['max_diff']:.1e}"])
        rows.append(["ours banded float64", f"{w}×{h}", f"{o['s_per_img']:.3f}", f"{1 / o['s_per_img']:.2f}",
                     f"{o['rss_mb']:.0f}", f"{o['rss_mb'] - o['base_mb']:.0f}", f"{o['max_diff']:.1e}"])
    gh, gw = grid_of(args.width, args.height)
    m, (m0, a0) = gh * gw, max(dense)
    t_est = a0["s_per_img"] * (m / m0) ** 3
    mem_est = (a0["rss_mb"] - a0["base_mb"]) * (m / m0) ** 2
    rows.append([f"authors dense float32 (extrapolated from {m0} to {m} cells)", f"{args.width}×{args.height}",
                 f"~{t_est:.0f}", f"{1 / t_est:.4f}", "", f"~{mem_est:.0f}", ""])
    print(table(["variant", "image", "s / image", "images / s", "peak RSS MB", "walk memory MB",
                 "max |ours − dense|"], rows))
    print(f"one dense hw×hw float32 matrix at {args.width}×{args.height}: {m * m * 4 / 2 ** 20:.0f} MiB; "
          f"8 squarings = {8 * 2 * m ** 3 / 1e12:.1f} TFLOP. Ours: 69 weight planes = "
          f"{69 * m * 8 / 2 ** 20:.1f} MiB (float64), 256 × 69 × K × hw multiply-adds = "
          f"{256 * 69 * args.classes * m / 1e9:.2f} G.")


if __name__ == "__main__":
    main()
