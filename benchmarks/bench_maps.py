"""Seed generation throughput: the authors' approach vs ours (fp32, bf16).

Workload (issue #4): one 500×375 image, scales 1.0 / 0.75 / 1.25 with horizontal flips (6 forward
passes), DeiT-S (random weights), 20 classes of which 3 are present, MCTformer+ recipe (K = 12 layers,
mean, sqrt fusion, patch affinity over all layers), map kind ``fused_affinity``.

Variants, each in its own process (peak RSS = ``ru_maxrss`` of that process; on CUDA
``torch.cuda.max_memory_allocated``):

``authors``       a re-implementation of the authors' approach written here: PIL bicubic per scale,
                  batch 1 per view, explicit attention in all 12 layers appended to a list and stacked
                  (12×1×6×N×N), head mean, all 20 classes refined and upsampled, per-class Python loop
                  min–max on the CPU (numpy);
``authors-mode``  ``tokenseg.methods.mctformer.authors``: what ``tokenseg maps mctformer-plus`` runs by default
                  (``maps.mode=auto``): the same maps, view + mirror in one batch, reduced on the fly;
``fp32`` / ``bf16``  ``tokenseg.maps.compute_maps`` (``maps.mode=tokenseg``, the opt-in batched path with its
                  deviations), fp32 and bf16 autocast.

Printed: median and best time per image (images/s), matmul GFLOP/s achieved (FLOPs counted below)
against the machine's measured matmul rate (best of 7 2048³ products), the arithmetic bound (FLOPs /
that rate) and how far each variant is from it, peak memory, and the max abs difference of the bf16
maps from the fp32 maps.

Our variants take ``--batch`` same-size images per call, as ``tokenseg maps`` batches them (default 1
on the CPU, where batching gains nothing, and 16 on CUDA, where one image leaves the GPU idle); times
are per image, peak memory is that of the whole batch.

    python benchmarks/bench_maps.py            # 3 rounds × 3 timed runs per variant
    python benchmarks/bench_maps.py --quick    # 1 round × 2 timed runs (a couple of minutes on 2 cores)
    python benchmarks/bench_maps.py --device cuda
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (authors_blocks, bench_parser, busy_warning, machine, matmul_rate, median, parse_bench_args,
                     pick_device, run_worker, table, timed_runs)  # noqa: E402

H_IMG, W_IMG = 375, 500
SCALES = [1.0, 0.75, 1.25]
PRESENT = [0, 8, 14]  # aeroplane, chair, person
NUM_CLASSES = 20
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
VARIANTS = ("authors", "authors-mode", "fp32", "bf16")


def make_image(seed: int = 0, size: tuple[int, int] = (H_IMG, W_IMG)) -> Image.Image:
    """A smooth random RGB image of ``size`` (h, w): bicubic upsampling of an 8× smaller noise image."""
    h, w = size
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def build(device: torch.device, sharpen: float):
    from tokenseg.config import ModelConfig
    from tokenseg.methods.mctformer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(method="mctformer-plus", backbone="deit_small_patch16_224", img_size=448,
                                    drop_path=0.0), NUM_CLASSES).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight[: 2 * model.embed_dim].mul_(sharpen)
    return model.to(device)


def maps_cfg(dtype: str = "fp32"):
    from tokenseg.config import MapsConfig

    return MapsConfig(scales=list(SCALES), flip=True, layers=12, layer_reduce="mean", fusion="sqrt",
                      kinds=["fused_affinity"], dtype=dtype, batch_size=1)


# ------------------------------------------------------------------------------ the authors' approach
@torch.no_grad()
def authors_forward_stacked(model, x: torch.Tensor, K: int):
    """Batch 1; every layer returns its attention, which is appended to a list and stacked."""
    feat = model.patch_embed.proj(x)  # the conv floors h, w to multiples of 16
    gh, gw = feat.shape[-2:]
    tokens = feat.flatten(2).transpose(1, 2)
    pos = model.pos_embed_pat
    if (gh, gw) != tuple(pos.shape[-2:]):
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
    tokens = tokens + pos.flatten(2).transpose(1, 2)
    C = model.num_classes
    x = torch.cat([model.cls_tokens + model.pos_embed_cls, tokens], dim=1)
    x, attn_weights, _ = authors_blocks(model, x, C)
    x = model.output_norm(x)  # no final LayerNorm, as their code (METHODS.md §16)
    B, _, D = x.shape
    attn_weights = torch.stack(attn_weights)  # 12 × B × H × N × N
    attn_weights = torch.mean(attn_weights, dim=2)  # 12 × B × N × N
    mtatt = attn_weights[-K:].mean(0)[:, :C, C:].reshape(B, C, gh, gw)
    patch_attn = attn_weights[:, :, C:, C:].sum(0)
    fmap = model.head(x[:, C:].transpose(1, 2).reshape(B, D, gh, gw))
    return mtatt, F.relu(fmap), patch_attn


@torch.no_grad()
def authors_maps(model, img: Image.Image, labels: np.ndarray, device: torch.device) -> np.ndarray:
    W, H = img.size
    C = model.num_classes
    label = torch.from_numpy(labels).to(device)
    total = torch.zeros(1, C, H, W, device=device)
    for s in SCALES:
        im = img.resize((int(round(W * s)), int(round(H * s))), Image.BICUBIC)
        arr = (np.asarray(im, np.float32) / 255.0 - MEAN) / STD
        xs = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)
        for flipped in (False, True):
            x = xs.flip(-1) if flipped else xs
            mtatt, fmap, patch_attn = authors_forward_stacked(model, x, 12)
            cams = torch.sqrt(mtatt * fmap)
            B, _, gh, gw = cams.shape
            cams = torch.matmul(patch_attn.unsqueeze(1), cams.view(B, C, -1, 1)).reshape(B, C, gh, gw)
            cams = F.interpolate(cams, size=(H, W), mode="bilinear", align_corners=False)
            cams = cams * label.view(1, C, 1, 1)
            total += cams.flip(-1) if flipped else cams
    total = total[0].cpu().numpy()
    out = []
    for c in range(C):  # per-class Python loop on the CPU
        if labels[c] > 0:
            cam = total[c]
            out.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-8))
    return np.stack(out)


# ------------------------------------------------------------------------------ ours
def ours_maps(model, img_u8: torch.Tensor, labels: torch.Tensor, cfg) -> torch.Tensor:
    """Seeds of a batch of same-size images (what ``tokenseg maps`` batches); returns the first's."""
    from tokenseg.maps import compute_maps, normalise

    out = compute_maps(model, normalise(img_u8), labels, cfg)["fused_affinity"].cpu()
    return out[0, PRESENT]


def authors_mode_maps(model, img, labels, device):
    from tokenseg.methods.mctformer.authors import compute_maps_authors

    cfg = maps_cfg()
    return compute_maps_authors(model, img, labels, cfg, method="mctformer-plus", device=device)["fused_affinity"]


# ------------------------------------------------------------------------------ FLOPs
def grid_sizes(variant: str) -> list[tuple[int, int]]:
    from tokenseg.maps import scaled_size

    out = []
    for s in SCALES:
        if variant in ("fp32", "bf16"):
            h, w = scaled_size(H_IMG, W_IMG, s, 16, "round")
        else:
            h, w = int(round(H_IMG * s)), int(round(W_IMG * s))
        out.append((h // 16, w // 16))
    return out


def count_flops(variant: str, D: int = 384, depth: int = 12, C: int = NUM_CLASSES) -> float:
    """Multiply-add FLOPs (×2) of the matmuls/convs each variant performs: patch embedding, per layer
    qkv + QKᵀ + AV + proj + MLP, the 3×3 PatchCAM conv, the affinity refinement (all 20 classes for the
    authors, the 3 present ones for ours), for 3 scales × 2 flips."""
    total = 0.0
    for gh, gw in grid_sizes(variant):
        M = gh * gw
        N = C + M
        layer = 2 * N * D * 3 * D + 2 * N * N * D * 2 + 2 * N * D * D + 2 * N * D * 4 * D * 2
        aff_classes = C if variant == "authors" else len(PRESENT)
        view = depth * layer + 2 * M * D * 3 * 256 + 2 * M * D * C * 9 + 2 * aff_classes * M * M
        total += 2 * view
    return total


# ------------------------------------------------------------------------------ worker / driver
def worker(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    model = build(device, args.sharpen)
    img = make_image()
    labels = np.zeros(NUM_CLASSES, np.float32)
    labels[PRESENT] = 1
    # our variants take --batch same-size images per call (the first is the benchmark image)
    batch = args.batch if args.worker in ("fp32", "bf16") else 1
    imgs = [img] + [make_image(seed) for seed in range(1, batch)]
    img_u8 = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).to(device)
    lab_t = torch.from_numpy(labels)[None].repeat(batch, 1).to(device)
    fns = {
        "authors": lambda: authors_maps(model, img, labels, device),
        "authors-mode": lambda: authors_mode_maps(model, img, labels, device),
        "fp32": lambda: ours_maps(model, img_u8, lab_t, maps_cfg("fp32")),
        "bf16": lambda: ours_maps(model, img_u8, lab_t, maps_cfg("bf16")),
    }
    fn = fns[args.worker]
    res, out = timed_runs(fn, device, args.warmup, args.repeats, per=batch)  # per image
    res["variant"] = args.worker
    np.save(args.out, np.asarray(out.numpy() if torch.is_tensor(out) else out, np.float32))
    print(json.dumps(res))


def main() -> None:
    ap = bench_parser(__doc__, VARIANTS)
    ap.add_argument("--batch", type=int, default=0,
                    help="same-size images per call for our variants (default 1 on the CPU, 16 on CUDA; "
                         "the authors' code runs one image at a time); times are per image")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--sharpen", type=float, default=1.0,
                    help="scale q/k weights (random attention is near uniform; trained attention is peaky)")
    args = parse_bench_args(ap)
    if args.worker:
        return worker(args)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    args.batch = args.batch or (16 if device.type == "cuda" else 1)
    variants = [v for v in args.variants.split(",") if v]
    print(f"bench_maps: {W_IMG}×{H_IMG} image, scales {SCALES} + flip, DeiT-S random weights, {NUM_CLASSES} classes "
          f"({len(PRESENT)} present), MCTformer+ recipe, device {device}, ours in batches of {args.batch}")
    print(f"machine: {machine()}")
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    rate32 = matmul_rate(torch.float32, device)
    rate16 = matmul_rate(torch.bfloat16, device)
    print(f"measured matmul rate: fp32 {rate32['best']:.0f} GFLOP/s (median {rate32['median']:.0f}), "
          f"bf16 {rate16['best']:.0f} GFLOP/s (median {rate16['median']:.0f}) [2048³, best of 7: the bound "
          f"uses the best, since other jobs can only slow a run down]")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="bench_maps_"))
    common = ["--device", str(device.type), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--sharpen", str(args.sharpen), "--batch", str(args.batch)]
    for r in range(args.rounds):
        for v in variants:  # interleaved so a load change on a shared machine hits every variant
            res = run_worker(__file__, ["--worker", v, "--out", str(tmp / f"{v}.npy"), *common])
            results[v].append(res)
            print(f"  round {r + 1} {v:<12} {' '.join(f'{t:.2f}s' for t in res['times'])}", flush=True)
    maps = {v: np.load(tmp / f"{v}.npy") for v in variants}
    rows = []
    ref_time = median([t for res in results.get("authors", []) for t in res["times"]])
    summary = {}
    for v in variants:
        t = median([t for res in results[v] for t in res["times"]])
        best = min(t for res in results[v] for t in res["times"])
        flops = count_flops(v)
        rate = (rate16 if v == "bf16" else rate32)["best"]
        bound = count_flops("fp32" if v != "authors" else v) / (rate * 1e9)
        peak = median([res.get("cuda_peak_mb", res["rss_peak_mb"]) for res in results[v]])
        base = median([res.get("cuda_base_mb", res["rss_base_mb"]) for res in results[v]])
        summary[v] = {"time_s": t, "best_s": best, "gflops": flops / 1e9, "peak_mb": peak}
        rows.append([v, f"{t:.2f}", f"{best:.2f}", f"{1 / t:.2f}",
                     f"{ref_time / t:.2f}×" if ref_time == ref_time else "-",
                     f"{flops / 1e9:.0f}", f"{flops / t / 1e9:.0f}", f"{bound:.2f}", f"{t / bound:.2f}×",
                     f"{best / bound:.2f}×", f"{peak:.0f}", f"{peak - base:.0f}"])
    mem = "CUDA MiB" if device.type == "cuda" else "RSS MiB"
    print()
    print(table(["variant", "s/img", "best", "img/s", "vs authors", "GFLOP", "GFLOP/s", "bound s", "÷ bound",
                 "best ÷ bound", f"peak {mem}", "+ over model"], rows))
    print("s/img = median over all timed runs, best = fastest run (less sensitive to other jobs on a shared "
          "machine); bound = this variant's FLOPs at our input sizes / measured matmul rate of its dtype "
          "(fp32 for authors); '÷ bound' = time / bound")
    if "fp32" in maps and "bf16" in maps:
        d = np.abs(maps["fp32"] - maps["bf16"])
        print(f"bf16 vs fp32 maps: max abs difference {d.max():.4f}, mean {d.mean():.5f} (min–max normalised maps)")
    if "authors" in maps and "authors-mode" in maps:
        print(f"authors-mode vs the authors' approach: max abs difference "
              f"{np.abs(maps['authors'] - maps['authors-mode']).max():.2e}")
    if "authors" in maps and "fp32" in maps:
        print(f"ours fp32 vs the authors' approach (different resize and rounding): max abs difference "
              f"{np.abs(maps['authors'] - maps['fp32']).max():.3f}")
    print(json.dumps({"device": device.type, "matmul_gflops": {"fp32": rate32, "bf16": rate16}, **summary}))


if __name__ == "__main__":
    main()
