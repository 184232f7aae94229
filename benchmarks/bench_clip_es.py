"""CLIP-ES seed throughput: a re-implementation of the authors' per-class loop vs ours.

Workload: ViT-B/16 (open_clip, random weights), VOC-sized 500×375 images (input 512×384, a 32×24
grid), 3 classes present, 25 background words, CAA over the last 8 layers — their VOC script.

Variants, each in its own process (peak RSS = ``ru_maxrss`` of that process; on CUDA
``torch.cuda.max_memory_allocated``):

``authors``  their ``generate_cams_voc12.perform`` re-implemented here on the same open_clip modules:
             batch 1; every block through ``nn.MultiheadAttention(need_weights=True)`` (explicit,
             head-averaged attention in all 12 layers, kept in a list and stacked); then per present
             class: block 12 forward again, ``loss.backward()`` (weight gradients included, as their
             unfrozen model computes them), gradients and activations to numpy, Grad-CAM, their two
             min–max passes, and CAA with its M×M×M squaring of the transition matrix, per class.
             fp32 on the CPU, fp16 weights on CUDA (their ``clip.load``);
``fp32`` / ``bf16`` / ``fp16``  :func:`tokenseg.methods.clip_es.gradcam.clip_es_maps` with ``--batch`` same-size
             images per call (``clip_es.dtype``: bf16/fp16 compute the tower's products in that
             dtype, from weights cast once; residual stream, Grad-CAM and CAA in fp32).

Printed: median and best seconds per image, images/s, speed-up over ``authors``, GFLOP counted below
against the machine's measured matmul rate, peak memory, and the max abs difference of each variant's
maps from the ``authors`` maps ("equal maps").

    python benchmarks/bench_clip_es.py             # 3 rounds × 3 timed runs per variant
    python benchmarks/bench_clip_es.py --quick     # 1 round × 2 timed runs
    python benchmarks/bench_clip_es.py --device cuda --variants authors,fp32,fp16
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (bench_parser, busy_warning, machine, matmul_rate, median, parse_bench_args, pick_device,
                     run_worker, table, timed_runs)  # noqa: E402

H_IMG, W_IMG = 375, 500
PRESENT = [0, 8, 14]  # aeroplane, chair seat, person
NUM_CLASSES, NUM_BG, EMBED = 20, 25, 512
VARIANTS = ("authors", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(batch: int, device: torch.device, size: tuple[int, int] = (H_IMG, W_IMG)) -> torch.Tensor:
    from bench_maps import make_image

    from tokenseg.models.clip_ops import clip_input

    return torch.stack([clip_input(make_image(seed, size)) for seed in range(batch)]).to(device)


def text(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    fg = F.normalize(torch.randn(NUM_CLASSES, EMBED, generator=g), dim=-1)
    bg = F.normalize(torch.randn(NUM_BG, EMBED, generator=g), dim=-1)
    return fg.to(device), bg.to(device)


# ------------------------------------------------------------------------------ the authors' loop
def _scale_cam(img: np.ndarray) -> np.ndarray:  # pytorch-grad-cam's scale_cam_image, one map
    img = img - np.min(img)
    return img / (1e-7 + np.max(img))


def _resize(a: np.ndarray, size) -> np.ndarray:  # stands in for cv2.resize (bilinear, half-pixel)
    return F.interpolate(torch.from_numpy(a)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def authors_maps(model, x: torch.Tensor, labels: list[int], fg: torch.Tensor, bg: torch.Tensor,
                 size: tuple[int, int] = (H_IMG, W_IMG)) -> np.ndarray:
    from tokenseg.methods.clip_es.gradcam import box_mask
    from tokenseg.models.clip_ops import layer_norm as ln  # their LayerNorm: computed in fp32, cast back
    from tokenseg.models.clip_ops import resize_clip_pos_embed

    visual = model.visual
    blocks = visual.transformer.resblocks
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    dtype = visual.conv1.weight.dtype
    with torch.no_grad():  # their VisionTransformer.forward: blocks 1..11 without gradient
        t = visual.conv1(x.to(dtype)).flatten(2).transpose(1, 2)
        t = torch.cat([visual.class_embedding.to(t.dtype).expand(1, 1, -1), t], 1)
        t = t + resize_clip_pos_embed(visual.positional_embedding, (h, w), True).to(t.dtype)
        t = ln(visual.ln_pre, t)
        attn_list = []
        for blk in blocks[:-1]:
            z = ln(blk.ln_1, t)
            out, aw = blk.attn(z, z, z, need_weights=True)
            attn_list.append(aw)
            t = t + out
            t = t + blk.mlp(ln(blk.ln_2, t))
    last = blocks[-1]
    txt = torch.cat([fg[labels], bg], 0)
    scale = model.logit_scale.exp()
    maps, attn_weight = [], None
    for idx in range(len(labels)):
        z = ln(last.ln_1, t)  # their forward_last_layer, hooked on ln_1
        z.retain_grad()
        out, aw_last = last.attn(z, z, z, need_weights=True)
        y = t + out
        y = y + last.mlp(ln(last.ln_2, y))
        f = ln(visual.ln_post, y)[:, 1:].mean(1) @ visual.proj
        f = f / f.norm(dim=1, keepdim=True)
        tf = txt / txt.norm(dim=1, keepdim=True)
        prob = (scale * f.float() @ tf.float().t()).softmax(-1)
        model.zero_grad()
        prob[0, idx].backward(retain_graph=True)
        act = z[0, 1:].detach().float().cpu().numpy().reshape(h, w, -1).transpose(2, 0, 1)
        grad = z.grad[0, 1:].float().cpu().numpy().reshape(h, w, -1).transpose(2, 0, 1)
        cam = np.maximum((grad.mean(axis=(1, 2))[:, None, None] * act).sum(0), 0).astype(np.float32)
        cam = _scale_cam(np.maximum(_scale_cam(cam), 0)).astype(np.float32)
        if idx == 0:
            stacked = torch.stack([a[:, 1:, 1:] for a in attn_list + [aw_last.detach()]])[-8:]
            attn_weight = stacked.mean(0)[0].float().cpu()
        mask = box_mask(torch.from_numpy(cam)[None], 0.4)[0].float().view(1, -1)
        trans = attn_weight / attn_weight.sum(0, keepdim=True)
        trans = trans / trans.sum(1, keepdim=True)
        for _ in range(2):
            trans = trans / trans.sum(0, keepdim=True)
            trans = trans / trans.sum(1, keepdim=True)
        trans = (trans + trans.t()) / 2
        trans = trans @ trans
        trans = trans * mask
        refined = (trans @ torch.from_numpy(cam).view(-1, 1)).reshape(h, w).numpy().astype(np.float32)
        maps.append(_resize(_scale_cam(refined).astype(np.float32), size))
    return np.stack(maps)


# ------------------------------------------------------------------------------ ours
def ours_maps(model, x: torch.Tensor, fg, bg, dtype: str, size: tuple[int, int] = (H_IMG, W_IMG)) -> torch.Tensor:
    from tokenseg.methods.clip_es.gradcam import ClipESOptions, clip_es_maps

    outs = clip_es_maps(model, x, [PRESENT] * x.shape[0], fg, bg, size, ClipESOptions(dtype=dtype))
    return outs[0].maps.float().cpu()


# ------------------------------------------------------------------------------ FLOPs
def count_flops(variant: str, D: int = 768, L: int = 12, C: int = len(PRESENT)) -> float:
    """Matmul FLOPs (2 per multiply-add): the patch conv; per layer qkv 6ND², QKᵀ and AV 4N²D, out
    projection 2ND², MLP 16ND²; the last block's backward per class — the authors': autograd's input
    gradients (MLP 16ND², out projection 2ND², attention 8N²D, in-projection 6ND²), all weight
    gradients (24ND²) and a second forward of block 12, then CAA with the M³ squaring; ours: MLP
    16ND², out projection 2ND², one Aᵀ·g_O product 2N²D (the patch sums need no more), CAA as two
    M² matrix–vector products."""
    h, w = -(-H_IMG // 16), -(-W_IMG // 16)
    M = h * w
    N = M + 1
    layer = 24 * N * D * D + 4 * N * N * D
    embed = 2 * M * 3 * 256 * D
    if variant == "authors":
        back = 18 * N * D * D + 8 * N * N * D + 6 * N * D * D + 24 * N * D * D
        return embed + (L - 1) * layer + C * (layer + back + 2 * M ** 3 + 2 * M * M)
    return embed + L * layer + C * (18 * N * D * D + 2 * N * N * D + 4 * M * M)


# ------------------------------------------------------------------------------ worker / driver
def make_fn(variant: str, device: torch.device, batch: int, sharpen: float = 3.0,
            size: tuple[int, int] = (H_IMG, W_IMG)):
    """The seeds of ``variant`` (``authors`` runs one image; ours ``batch``) on random ViT-B/16 weights;
    returns ``(callable, images per call)``."""
    from tokenseg.models.clip import cast_visual
    from tokenseg.models.clip import random_clip

    model = random_clip("ViT-B-16", seed=0).to(device)
    if sharpen != 1.0:
        with torch.no_grad():
            for blk in model.visual.transformer.resblocks:
                blk.attn.in_proj_weight[: 2 * blk.attn.embed_dim].mul_(sharpen)
    fg, bg = text(device)
    batch = 1 if variant == "authors" else batch
    x = make_inputs(batch, device, size)
    if variant == "authors":
        if device.type == "cuda":
            cast_visual(model.visual, torch.float16)
        for p in model.visual.parameters():  # their model is not frozen: backward fills every .grad
            p.requires_grad_(True)
        return (lambda: authors_maps(model, x, PRESENT, fg, bg, size)), batch
    model.visual_in(DTYPES[variant])  # the low-precision copy of the tower, made once
    return (lambda: ours_maps(model, x, fg, bg, variant, size)), batch


def worker(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    fn, batch = make_fn(args.worker, device, args.batch, args.sharpen)
    res, out = timed_runs(fn, device, args.warmup, args.repeats, per=batch)
    res["variant"] = args.worker
    np.save(args.out, np.asarray(out.numpy() if torch.is_tensor(out) else out, np.float32))
    print(json.dumps(res))


def main() -> None:
    ap = bench_parser(__doc__, VARIANTS)
    ap.add_argument("--batch", type=int, default=0, help="same-size images per call for ours "
                    "(default 2 on the CPU, 16 on CUDA); the authors' loop runs one; times are per image")
    ap.add_argument("--variants", default="", help=f"comma-separated subset of {VARIANTS} "
                    "(default: authors,fp32,bf16 on the CPU; authors,fp32,fp16 on CUDA)")
    ap.add_argument("--sharpen", type=float, default=3.0,
                    help="scale the q/k weights: random attention is near uniform, which makes CAA's min–max "
                         "magnify float rounding (~1e-3 between any two fp32 orderings); trained attention is peaky")
    args = parse_bench_args(ap)
    if args.worker:
        return worker(args)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    args.batch = args.batch or (16 if device.type == "cuda" else 2)
    variants = [v for v in (args.variants or ("authors,fp16,fp32" if device.type == "cuda" else "authors,fp32,bf16"))
                .split(",") if v]
    print(f"bench_clip_es: {W_IMG}×{H_IMG} images (input 512×384), ViT-B/16 random weights (q/k ×{args.sharpen:g}), "
          f"{len(PRESENT)} of "
          f"{NUM_CLASSES} classes present, {NUM_BG} background words, device {device}, ours in batches of "
          f"{args.batch}")
    print(f"machine: {machine()}")
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    rate = matmul_rate(torch.float32, device)
    print(f"measured fp32 matmul rate: {rate['best']:.0f} GFLOP/s (median {rate['median']:.0f}) [2048³, best of 7]")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="bench_clip_es_"))
    common = ["--device", device.type, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--batch", str(args.batch), "--sharpen", str(args.sharpen)]
    for r in range(args.rounds):
        for v in variants:
            res = run_worker(__file__, ["--worker", v, "--out", str(tmp / f"{v}.npy"), *common])
            results[v].append(res)
            print(f"  round {r + 1} {v:<8} {' '.join(f'{t:.2f}s' for t in res['times'])}", flush=True)
    maps = {v: np.load(tmp / f"{v}.npy") for v in variants}
    ref = median([t for res in results.get("authors", []) for t in res["times"]])
    ref_cpu = median([t for res in results.get("authors", []) for t in res["cpu"]])
    rows, summary = [], {}
    for v in variants:
        t = median([t for res in results[v] for t in res["times"]])
        tc = median([t for res in results[v] for t in res["cpu"]])
        best = min(t for res in results[v] for t in res["times"])
        fl = count_flops(v)
        peak = median([res.get("cuda_peak_mb", res["rss_peak_mb"]) for res in results[v]])
        base = median([res.get("cuda_base_mb", res["rss_base_mb"]) for res in results[v]])
        diff = float(np.abs(maps[v] - maps["authors"]).max()) if "authors" in maps else float("nan")
        summary[v] = {"time_s": t, "best_s": best, "cpu_s": tc, "images_per_s": 1 / t, "gflop": fl / 1e9,
                      "peak_mb": peak, "over_model_mb": peak - base, "max_diff_vs_authors": diff}
        rows.append([v, f"{t:.3f}", f"{best:.3f}", f"{1 / t:.2f}", f"{ref / t:.2f}×" if ref == ref else "-",
                     f"{tc:.3f}", f"{ref_cpu / tc:.2f}×" if ref_cpu == ref_cpu else "-",
                     f"{fl / 1e9:.0f}", f"{fl / t / 1e9:.0f}", f"{fl / t / 1e9 / rate['best']:.2f}",
                     f"{peak:.0f}", f"{peak - base:.0f}", f"{diff:.1e}"])
    mem = "CUDA MiB" if device.type == "cuda" else "RSS MiB"
    print()
    print(table(["variant", "s/img", "best", "img/s", "vs authors", "CPU s/img", "vs authors (CPU)", "GFLOP",
                 "GFLOP/s", "of matmul rate",
                 f"peak {mem}", "+ over model", "max |Δ| vs authors"], rows))
    print("s/img = median over all timed runs (per image; ours run --batch images per call); CPU s/img = the "
          "process's CPU time (with --threads 1 it does not count time lost to other jobs: the steadier figure "
          "on a shared machine); peak memory of "
          "the process (CUDA: allocated), '+ over model' = above the state before the first call (model, inputs "
          "built), for the whole batch; max |Δ| = largest difference of the first image's 3 maps from the "
          "authors' loop")
    print(json.dumps({"device": device.type, "batch": args.batch, "matmul_gflops": rate, **summary}))


if __name__ == "__main__":
    main()
