"""CTI: a training step (batch 4 at 224², DeiT-S, 20 classes, random weights) ours vs the authors' style,
and CTI's seeds vs MCTformer+'s on the same image.

Training variants (one step = every forward of the step, the losses, backward, AdamW update; the
memory starts full, so all four terms are on, as in a VOC step after the first few):

``authors``  a re-implementation of their ``model_CTI.update()`` on the same weights: four full forward
             passes (view 1, view 2, the intra and the cross infusion pass) of their ``MCTformerV2_CTI``,
             each with explicit attention in every layer, the L×B×H×N×N stack, its head mean and the
             affinity of every pass; the memory as per-class Python lists appended in a loop over
             ``nonzero(labels)``; fp32.
``ours``     ``tokenseg``'s CTI step (what ``tokenseg train cti`` runs on a CPU): one model call, view 1
             and 2 through the first four blocks as one batch, view 1 alone with explicit attention only
             in the layers the BG-CAM loss reads, view 2 + both infusion passes continued from the shared
             block-4 tokens as one batch with fused attention; the memory a tensor update; fp32.
``ours-bf16`` the same under bf16 autocast (``train.amp=bf16``; not exact to theirs, shown for scale).
``floor``    not a CTI step: the least work any exact step that reuses the shared blocks must do — the
             same ViT forward + backward over the same block passes as ``ours`` (both views through
             all blocks, two more passes of view 1 from block ``swap + 1``), fused attention everywhere,
             no losses, maps or memory, and the same optimizer step. ``authors`` / ``floor`` bounds the
             speed-up of an exact fp32 step: the linear layers of 40 of their 48 block passes remain.

Ours and the floor use the optimizer ``tokenseg train`` builds (torch's fused AdamW,
``train.fused_optimizer``); the authors' the default one their timm ``create_optimizer`` returns.

Map variants (``maps.scales=[1.0]`` + flip, ``fused_affinity``, 500×375 image, 2 labels):
``maps-mctformer-plus`` (K = 12, mean) and ``maps-cti`` (K = 12, sum, background channel).

Each variant runs in its own process; the table gives medians and peak memory: RSS on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA (the issue's GPU target: ≥ 1.5× less than their step).

    python benchmarks/bench_cti.py            # 3 rounds × 3 timed steps
    python benchmarks/bench_cti.py --quick    # 1 round × 2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (bench_parser, busy_warning, machine, median, parse_bench_args, pick_device, run_worker, table,
                     timed_runs)  # noqa: E402

TRAIN = ("authors", "ours", "ours-bf16", "floor")
MAPS = ("maps-mctformer-plus", "maps-cti")
C = 20


# ---------------------------------------------------------------------------------------- their step
def their_forward(model, x, swap_ctk=None, swap_idx=None, n_layers=6) -> dict:
    """Their ``MCTformerV2_CTI.forward`` (training mode) written out on our module's weights."""
    B = x.shape[0]
    P, D = model.num_prefix, model.embed_dim
    patches, (h, w) = model.embed_patches(x)
    fg = model.cls_token.expand(B, -1, -1)
    tok = model.tokenizer(fg.reshape(B, -1)).view(B, P, D)
    tok = tok + torch.cat([model.bg_token.expand(B, 1, D), fg.expand(B, P - 1, D)], 1)  # their two in-place adds
    t = torch.cat([tok + model.pos_embed_cls, patches], 1)
    attn_weights, ctk = [], []
    for i, blk in enumerate(model.blocks):
        if swap_ctk is not None and i == swap_idx + 1:  # their in-place infusion
            if swap_ctk.shape[1] == P:
                t[:, :P] = (t[:, :P] + swap_ctk) / 2
            else:
                t[:, 1:P] = (t[:, 1:P] + swap_ctk) / 2
        a = blk.attn
        y = blk.norm1(t)
        N = y.shape[1]
        q, k, v = a.qkv(y).reshape(B, N, 3, a.num_heads, D // a.num_heads).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
        attn_weights.append(probs)
        t = t + blk.drop_path1(a.proj((probs @ v).transpose(1, 2).reshape(B, N, D)))
        t = t + blk.drop_path2(blk.mlp(blk.norm2(t)))
        ctk.append(t[:, :P])
    fmap = model.head(t[:, P:].transpose(1, 2).reshape(B, D, h, w))
    stack = torch.stack(attn_weights).mean(2)  # L × B × N × N
    cams = F.relu(fmap)
    mtatt = stack[-n_layers:].sum(0)[:, :P, P:].reshape(B, P, h, w)
    out = {"cls": t[:, 1:P].mean(-1), "pcls": fmap[:, 1:].mean((2, 3)), "cams": cams, "mtatt": mtatt,
           "fcams": cams * mtatt, "ctk": ctk}
    if swap_idx is not None:
        mtatt_as = stack[swap_idx + 1:].sum(0)[:, :P, P:].reshape(B, P, h, w)
        out["fcams_as"] = cams * mtatt_as
        patch_attn = stack[swap_idx + 1:, :, P:, P:].sum(0)
    else:
        patch_attn = stack[:, :, P:, P:].sum(0)
    out["attn"] = patch_attn
    out["rcams"] = torch.matmul(patch_attn.unsqueeze(1), out["fcams"].reshape(B, P, -1, 1)).reshape(B, P, h, w)
    return out


def their_max_norm(m):
    B, K = m.shape[:2]
    m = F.relu(m)
    hi = m.reshape(B, K, -1).max(-1)[0].view(B, K, 1, 1)
    lo = m.reshape(B, K, -1).min(-1)[0].view(B, K, 1, 1)
    return F.relu(m - lo - 1e-5) / (hi - lo + 1e-5)


def their_update(model, img, img_pos, label, memory, W=(0.1, 1.0, 1.0), swap_idx=3, mem=30):
    """Their ``update()`` (VOC branch): returns the total loss; ``memory`` (lists) is updated."""
    B = img.shape[0]
    h, w = img.shape[2] // 16, img.shape[3] // 16
    o = their_forward(model, img, None, swap_idx)
    o2 = their_forward(model, img_pos, None, swap_idx)
    mlsm = F.multilabel_soft_margin_loss
    loss = mlsm(o["cls"], label) + mlsm(o["pcls"], label) + mlsm(o2["cls"], label) + mlsm(o2["pcls"], label)
    fg = ((o["mtatt"] * o["cams"])[:, 1:] * label.view(B, C, 1, 1)).max(1)[0].view(B, 1, h, w)
    bg = o["fcams"][:, 0].view(B, 1, h, w)
    A = o["attn"].unsqueeze(1).double()
    r_fg = their_max_norm(torch.matmul(A, fg.double().view(B, 1, -1, 1)).reshape(B, 1, h, w))
    r_bg = their_max_norm(torch.matmul(A, bg.double().view(B, 1, -1, 1)).reshape(B, 1, h, w))
    loss = loss + W[0] * ((1 - r_fg) - r_bg).abs().mean()
    intra = their_forward(model, img, o2["ctk"][swap_idx], swap_idx)
    loss = loss + W[1] * (their_max_norm(o["cams"]) - their_max_norm(intra["cams"])).abs().mean()
    ctk = o["ctk"][swap_idx]
    D = ctk.shape[-1]
    for b, c in torch.nonzero(label).tolist():
        memory[c].append(F.layer_norm(ctk[b, 1 + c].detach().unsqueeze(0), [D]).squeeze(0))
    valid = 0
    for c in range(C):
        if len(memory[c]) >= mem:
            memory[c] = memory[c][-mem:]
            valid += 1
    g = torch.zeros(C, D, device=ctk.device)
    for c in range(C):
        if memory[c]:
            g[c] += torch.stack(memory[c]).mean(0)
    y = label.view(B, C, 1)
    swap = ctk[:, 1:] * (1 - y) + g * y
    cross = their_forward(model, img, swap.detach(), swap_idx)
    lc = W[2] * (their_max_norm(o["cams"])[:, 1:] - their_max_norm(cross["fcams_as"])[:, 1:]).abs().mean()
    if valid == C:
        loss = loss + lc
    return loss


# ---------------------------------------------------------------------------------------- workers
def make_train_step(variant: str, device: torch.device, batch: int, size: int):
    """One CTI training step of ``variant`` (``authors`` | ``ours`` | ``ours-bf16`` | ``floor``) on a fixed
    random batch with a full memory; returns a callable that runs it and returns the loss."""
    from tokenseg.config import load_config
    from tokenseg.methods import StepContext, get_method
    from tokenseg.core import optim
    from tokenseg.methods.base import default_param_groups

    cfg = load_config("cti", ["model.drop_path=0.1"])
    method = get_method("cti")
    torch.manual_seed(0)
    model = method.build(cfg, C).to(device).train()
    opt = optim.adamw(default_param_groups(model, cfg), fused=variant != "authors" and cfg.train.fused_optimizer,
                      lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    x2 = torch.randn(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, C, generator=g) < 0.15).float()
    y[:, 0] = 1
    x, x2, y = x.to(device), x2.to(device), y.to(device)
    memory = [[torch.randn(model.embed_dim, device=device) for _ in range(30)] for _ in range(C)]
    model.memory_bank.copy_(torch.stack([torch.stack(m) for m in memory]))
    model.memory_count.fill_(30)
    batch_ = {"image": x, "image_pos": x2, "labels": y}
    ctx = StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1)

    def step():
        if variant == "authors":
            total = their_update(model, x, x2, y, memory)
        elif variant == "floor":
            total = floor_forward(model, x, x2, cfg.cti.swap_layer)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "ours-bf16"):
                out = method.forward(model, batch_, ctx, cfg)
            terms = method.loss(out, batch_, ctx, cfg)
            total = sum(v for k, v in terms.items() if not k.startswith("_"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return step


def train_worker(args, device) -> dict:
    return timed(make_train_step(args.worker, device, args.batch, args.size), args, device)


def floor_forward(model, x, x2, swap: int) -> torch.Tensor:
    """The block passes of our step with fused attention and nothing else: (view 1, view 2) through every
    block, then view 1's block-``swap`` tokens twice more through the rest (the two infusion passes)."""
    tokens, _ = model.embed(torch.cat([x, x2]))
    head = tokens
    for blk in model.blocks[:swap + 1]:
        head = blk(head)
    rest = torch.cat([head, head[:x.shape[0]].repeat(2, 1, 1)])
    for blk in model.blocks[swap + 1:]:
        rest = blk(rest)
    return rest.square().mean()


def maps_worker(args, device) -> dict:
    from tokenseg.config import load_config
    from tokenseg.maps import compute_map_batch, normalise
    from tokenseg.methods import get_method

    name = args.worker.removeprefix("maps-")
    cfg = load_config(name, ["maps.scales=[1.0]", "maps.flip=true", "maps.kinds=[fused_affinity]"])
    torch.manual_seed(0)
    model = get_method(name).build(cfg, C).to(device).eval()
    g = torch.Generator().manual_seed(0)
    img = normalise(torch.randint(0, 256, (1, 3, 375, 500), generator=g, dtype=torch.uint8).to(device))
    lab = torch.zeros(1, C, device=device)
    lab[0, [3, 14]] = 1
    return timed(lambda: float(compute_map_batch(model, img, lab, cfg).maps["fused_affinity"].sum()), args, device)


def timed(fn, args, device) -> dict:
    res, value = timed_runs(fn, device, args.warmup, args.repeats)
    return {**res, "variant": args.worker, "value": value}


def worker(args) -> None:
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    with torch.no_grad() if args.worker in MAPS else torch.enable_grad():
        res = (maps_worker if args.worker in MAPS else train_worker)(args, device)
    print(json.dumps(res))


def check_same_step() -> None:
    """The re-implementation of their step and ours give the same loss and gradients (a small model,
    drop-path 0): the benchmark compares the same work."""
    from tokenseg.config import load_config
    from tokenseg.methods import StepContext, get_method

    cfg = load_config("cti", ["model.drop_path=0", "model.img_size=64", "model.backbone=vit_small_patch16_224",
                              "model.backbone_kwargs={embed_dim: 64, depth: 6, num_heads: 2, img_size: 64}"])
    method = get_method("cti")
    torch.manual_seed(0)
    model = method.build(cfg, C).train()
    x, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, C)
    y[0, [1, 5]] = y[1, 7] = 1
    memory = [[torch.randn(64) for _ in range(30)] for _ in range(C)]
    theirs = their_update(model, x, x2, y, [list(m) for m in memory])
    theirs.backward()
    g_theirs = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.memory_bank.copy_(torch.stack([torch.stack(m) for m in memory]))
    model.memory_count.fill_(30)
    batch = {"image": x, "image_pos": x2, "labels": y}
    ctx = StepContext(0, 0, 1, 1)
    terms = method.loss(method.forward(model, batch, ctx, cfg), batch, ctx, cfg)
    ours = sum(v for k, v in terms.items() if not k.startswith("_"))
    ours.backward()
    diff = max(float((p.grad - g_theirs[n]).abs().max()) for n, p in model.named_parameters() if n in g_theirs)
    print(f"check: loss theirs {float(theirs.detach()):.6f} ours {float(ours.detach()):.6f}, max gradient "
          f"difference {diff:.1e} over {len(g_theirs)} parameters")


def main() -> None:
    ap = bench_parser(__doc__, TRAIN + MAPS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variants", default="authors,ours,floor," + ",".join(MAPS), help=f"of {', '.join(TRAIN + MAPS)}")
    ap.add_argument("--check", action="store_true", help="only check that both steps compute the same thing")
    args = parse_bench_args(ap)
    if args.worker:
        return worker(args)
    if args.check:
        return check_same_step()
    device = pick_device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    print(f"bench_cti: CTI step (DeiT-S, batch {args.batch} at {args.size}², {C} classes, fp32) and seeds "
          f"(500×375, scale 1 + flip), device {device}, {args.threads} threads")
    print(f"machine: {machine()}")
    check_same_step()
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    common = ["--device", device.type, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    results = {v: [] for v in variants}
    cuda = device.type == "cuda"
    mem_name, peak_key, base_key = ("CUDA", "cuda_peak_mb", "cuda_base_mb") if cuda else ("RSS", "rss_peak_mb",
                                                                                        "rss_base_mb")
    for r in range(args.rounds):
        for v in variants:
            res = run_worker(__file__, ["--worker", v, *common])
            results[v].append(res)
            print(f"  round {r + 1} {v:<20} {' '.join(f'{t:.2f}s' for t in res['times'])}  (CPU "
                  f"{' '.join(f'{t:.2f}s' for t in res['cpu'])}; value {res['value']:.4f}, peak {mem_name} "
                  f"{res[peak_key]:.0f} MiB)", flush=True)
    rows, summary = [], {}
    for group, ref in ((TRAIN, "authors"), (MAPS, "maps-mctformer-plus")):
        ref_t = median([t for res in results.get(ref, []) for t in res["times"]])
        ref_m = median([res[peak_key] for res in results.get(ref, [])])
        ref_c = median([t for res in results.get(ref, []) for t in res["cpu"]])
        for v in (v for v in group if v in results):
            t = median([t for res in results[v] for t in res["times"]])
            c = median([t for res in results[v] for t in res["cpu"]])
            best = min(t for res in results[v] for t in res["times"])
            peak = median([res[peak_key] for res in results[v]])
            grow = median([res[peak_key] - res[base_key] for res in results[v]])
            summary[v] = {"s": t, "best_s": best, "cpu_s": c, "peak_mb": peak, "peak_over_model_mb": grow}
            rows.append([v, f"{t:.2f}", f"{best:.2f}", f"{ref_t / t:.2f}×" if ref_t == ref_t else "-", f"{c:.2f}",
                         f"{ref_c / c:.2f}×" if ref_c == ref_c else "-", f"{peak:.0f}", f"{grow:.0f}",
                         f"{peak / ref_m:.2f}×" if ref_m == ref_m else "-"])
    print()
    print(table(["variant", "median s", "best s", "speed vs ref", "CPU s", "CPU vs ref", f"peak {mem_name} MiB",
                 "+ over model", "memory vs ref"], rows))
    print("(CPU s: process time per step, all threads; with --threads 1 it is the work done, whatever the load)")
    print("(ref: authors for the training step, maps-mctformer-plus for the seeds)")
    if "floor" in summary and "authors" in summary:
        print(f"(floor: the block passes of our step alone, fused attention, no losses: authors / floor = "
              f"{summary['authors']['s'] / summary['floor']['s']:.2f}× bounds an exact fp32 step's speed-up here)")
    print(json.dumps({"device": device.type, **summary}))


if __name__ == "__main__":
    main()
