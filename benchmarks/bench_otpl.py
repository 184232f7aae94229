"""What OTPL adds to an MCTformer+ training step: OT (Sinkhorn, 100 log-domain iterations), top-K, proxies,
L_p.cls and L_ppc, forward and backward (issue target: at most +20 % on the CPU, fp32 and bf16).

One process, the same weights for both steps, the two steps interleaved (base, otpl, base, otpl, ...)
so that load from other jobs on a shared machine hits both alike; medians, and the median of the
per-pair ratios. ``base`` = MCTformer+'s forward + losses + backward + AdamW through the method registry
(``get_method("mctformer-plus")``) on OTPL's inner model; ``otpl`` = ``get_method("otpl")`` on the whole
model. ``otpl part`` times the OTPL pieces alone (proxy_outputs + its loss terms + their backward) on a
detached copy of the base outputs. On CUDA the OTPL pieces also run under
``torch.cuda.set_sync_debug_mode("error")``: a host–device round trip inside them would raise.

    python benchmarks/bench_otpl.py                   # VOC-sized: DeiT-S, 448², batch 4, 20 classes
    python benchmarks/bench_otpl.py --config demo     # the demo: 6-block 128-d ViT, 96², batch 32, 5 classes
    python benchmarks/bench_otpl.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_warning, machine, median, pick_device, sync, table  # noqa: E402

CONFIGS = {
    # name: (preset, overrides, classes, batch)
    "voc": ("otpl", ["model.drop_path=0.1"], 20, 4),
    "demo": ("demo-otpl", [], 5, 32),
}


def _batch(n: int, classes: int, size: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, classes, generator=g) < 1.5 / classes).float()
    labels[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] = 1  # every image has a class
    return {"image": torch.randn(n, 3, size, size, generator=g).to(device), "labels": labels.to(device),
            "index": torch.arange(n, device=device)}


def run(args, dtype_name: str, device) -> dict:
    from tokenseg.config import load_config
    from tokenseg.methods import StepContext, get_method
    from tokenseg.methods.otpl import otpl_terms

    preset, over, C, batch = CONFIGS[args.config]
    batch = args.batch or batch
    cfg = load_config(preset, over)
    size = args.size or cfg.model.img_size
    base_m, otpl_m = get_method("mctformer-plus"), get_method("otpl")
    torch.manual_seed(0)
    model = otpl_m.build(cfg, C).to(device).train()
    from tokenseg.methods.otpl import base_config

    bcfg = base_config(cfg, "mctformer-plus")
    opt_base = torch.optim.AdamW(model.base.parameters(), lr=1e-6)
    opt_otpl = torch.optim.AdamW(model.parameters(), lr=1e-6)
    data = _batch(batch, C, size, device)
    ctx = StepContext(epoch=3, step=100, total_steps=1000, steps_per_epoch=100)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(method, m, c, opt):
        with autocast():
            out = method.forward(m, data, ctx, c)
        terms = method.loss(out, data, ctx, c)
        total = sum(v for k, v in terms.items() if not k.startswith("_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return out

    def part(out):
        """The OTPL pieces alone, on detached base outputs (with grad, as in training)."""
        leaf = {k: (v.detach().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v)
                for k, v in out.items() if k in ("tokens", "grid", "patch_map")}
        with autocast():
            prox = model.proxy_outputs(leaf, data["labels"])
        terms = otpl_terms({**leaf, **prox}, data["labels"], cfg.otpl)
        sum(v for k, v in terms.items() if not k.startswith("_")).backward()

    times = {"base": [], "otpl": [], "part": []}
    ratios = []
    out = None
    for i in range(args.warmup + args.repeats):
        sync(device)
        t0 = time.perf_counter()
        out = step(base_m, model.base, bcfg, opt_base)
        sync(device)
        t1 = time.perf_counter()
        step(otpl_m, model, cfg, opt_otpl)
        sync(device)
        t2 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            part(out)
            sync(device) if device.type != "cuda" else None
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        sync(device)
        t3 = time.perf_counter()
        if i >= args.warmup:
            times["base"].append(t1 - t0)
            times["otpl"].append(t2 - t1)
            times["part"].append(t3 - t2)
            ratios.append((t2 - t1) / (t1 - t0))
    return {"dtype": dtype_name, "batch": batch, "size": size, "classes": C, **times, "ratios": ratios,
            "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="voc")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0, help="default: 4 (voc) / 32 (demo)")
    ap.add_argument("--size", type=int, default=0, help="default: the preset's model.img_size")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="2 timed pairs per dtype")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 2
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"bench_otpl: {args.config} config, MCTformer+ step vs OTPL on MCTformer+ step, device {device}")
    print(f"machine: {machine()}")
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    rows, summary = [], {}
    for d in [x for x in args.dtypes.split(",") if x]:
        res = run(args, d, device)
        tb, to, tp = median(res["base"]), median(res["otpl"]), median(res["part"])
        r = median(res["ratios"])
        summary[d] = {"base_s": tb, "otpl_s": to, "part_s": tp, "pair_ratio": r, "load_after": res["load_after"]}
        rows.append([d, f"{res['batch']}×{res['size']}²", f"{tb:.3f}", f"{to:.3f}", f"{(to / tb - 1) * 100:+.1f} %",
                     f"{(r - 1) * 100:+.1f} %", f"{tp * 1000:.1f} ms ({tp / tb * 100:.1f} %)",
                     f"{res['load_after']:.1f}"])
        fmt = " ".join
        print(f"  {d}: base {fmt(f'{t:.2f}' for t in res['base'])}  otpl {fmt(f'{t:.2f}' for t in res['otpl'])}"
              f"  part {fmt(f'{t * 1000:.0f}ms' for t in res['part'])}", flush=True)
    print()
    print(table(["dtype", "batch", "base s/step", "otpl s/step", "overhead (medians)", "overhead (pairs)",
                 "OTPL part alone", "load after"], rows))
    print(json.dumps({"config": args.config, "device": device.type, **summary}))


if __name__ == "__main__":
    main()
