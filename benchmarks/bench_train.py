"""MCTformer+ training step (batch 4, 448², DeiT-S, 20 classes): ours vs the authors' style.

One step = forward (class-token scores, GWRP PatchCAM scores, class tokens of all 12 layers for CCT),
the three losses (:func:`tokenseg.methods.mctformer.compute_losses`), backward, AdamW update (ours: the
fused AdamW ``tokenseg train`` builds; theirs: torch's default).

``authors``    explicit attention materialised in every layer (softmax(QKᵀ)·V, the attention tensors
               collected as their forward does), fp32 on the CPU / fp16 autocast + GradScaler on CUDA
               (their ``NativeScaler``);
``ours-fp32``  :meth:`ClassTokenViT.forward` with fused ``scaled_dot_product_attention`` (what
               ``tokenseg train`` runs; ``train.amp=auto`` is fp32 on the CPU);
``ours-bf16``  the same under bf16 autocast (``train.amp=bf16``; the CUDA default when supported).

Each variant runs in its own process: steps/s (median) and peak memory (``ru_maxrss``, or
``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/bench_train.py           # 2 rounds × 3 timed steps
    python benchmarks/bench_train.py --quick   # 1 round × 2 timed steps
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (authors_blocks, bench_parser, busy_warning, machine, median, parse_bench_args, pick_device,
                     run_worker, table, timed_runs)  # noqa: E402

VARIANTS = ("authors", "ours-fp32", "ours-bf16")


def authors_forward(model, x: torch.Tensor) -> dict:
    """Their training forward: the same network, attention computed explicitly in every layer."""
    from tokenseg.models.classtoken import pool_patch_scores

    tokens, grid = model.embed(x)
    C = model.num_classes
    tokens, attn_weights, layer_cls = authors_blocks(model, tokens, C)
    tokens = model.output_norm(tokens)  # no final LayerNorm, as their code (METHODS.md §16)
    fmap = model.patch_logits_map(tokens, grid)
    return {"cls_logits": tokens[:, :C].float().mean(-1), "patch_map": fmap,
            "patch_logits": pool_patch_scores(fmap, model.pooling, model.gwrp_decay),
            "layer_cls_tokens": layer_cls, "attn": attn_weights}


def make_step(variant: str, device: torch.device, batch: int, size: int):
    """One training step of ``variant`` (``authors`` | ``ours-fp32`` | ``ours-bf16``) on a fixed random
    batch; returns a callable that runs it and returns the loss as a float."""
    from tokenseg.core import optim
    from tokenseg.config import load_config
    from tokenseg.methods import get_method
    from tokenseg.methods.base import default_param_groups
    from tokenseg.methods.mctformer import compute_losses

    cfg = load_config("mctformer-plus", ["model.drop_path=0.1"])
    torch.manual_seed(0)
    model = get_method("mctformer-plus").build(cfg, 20).to(device).train()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    opt = optim.adamw(default_param_groups(model, cfg), fused=variant != "authors" and cfg.train.fused_optimizer,
                      lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = (torch.rand(batch, 20, generator=g) < 0.15).float()
    y[:, 0] = 1
    y = y.to(device)
    if variant == "authors":
        dtype = torch.float16 if device.type == "cuda" else None
    elif variant == "ours-bf16":
        dtype = torch.bfloat16
    else:
        dtype = None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    fwd = (lambda inp: authors_forward(model, inp)) if variant == "authors" else \
        (lambda inp: model(inp, return_layer_tokens=True))

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = fwd(x)
        losses = compute_losses(out, y, cfg)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["total"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            losses["total"].backward()
            opt.step()
        return float(losses["total"].detach())

    return step


def worker(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    res, loss = timed_runs(make_step(args.worker, device, args.batch, args.size), device, args.warmup, args.repeats)
    res.update(variant=args.worker, loss=loss)
    print(json.dumps(res))


def main() -> None:
    ap = bench_parser(__doc__, VARIANTS, rounds=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = parse_bench_args(ap)
    if args.worker:
        return worker(args)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    print(f"bench_train: MCTformer+ step, DeiT-S, batch {args.batch} at {args.size}², 20 classes, device {device}")
    print(f"machine: {machine()}")
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    common = ["--device", device.type, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            res = run_worker(__file__, ["--worker", v, *common])
            results[v].append(res)
            print(f"  round {r + 1} {v:<10} {' '.join(f'{t:.2f}s' for t in res['times'])}  loss {res['loss']:.4f}",
                  flush=True)
    ref_t = median([t for res in results.get("authors", []) for t in res["times"]])
    ref_m = median([res.get("cuda_peak_mb", res["rss_peak_mb"]) for res in results.get("authors", [])])
    rows, summary = [], {}
    for v in variants:
        t = median([t for res in results[v] for t in res["times"]])
        peak = median([res.get("cuda_peak_mb", res["rss_peak_mb"]) for res in results[v]])
        base = median([res.get("cuda_base_mb", res["rss_base_mb"]) for res in results[v]])
        summary[v] = {"step_s": t, "peak_mb": peak}
        rows.append([v, f"{t:.2f}", f"{1 / t:.3f}", f"{ref_t / t:.2f}×", f"{peak:.0f}", f"{peak - base:.0f}",
                     f"{peak / ref_m:.2f}×" if ref_m == ref_m else "-"])
    mem = "CUDA MiB" if device.type == "cuda" else "RSS MiB"
    print()
    print(table(["variant", "s/step", "steps/s", "vs authors", f"peak {mem}", "+ over model", "peak vs authors"],
                rows))
    print(json.dumps({"device": device.type, **summary}))


if __name__ == "__main__":
    main()
