"""POT's prototype stages against its network, and against a per-image, per-class loop (the released
code's approach), for one training batch of 16 images at 512² (VOC: 20 classes, 1.6 present per image).

Variants (forward + backward each, fp32; interleaved over rounds in one process; medians):

``network``  :class:`tokenseg.methods.pot.model.POTNet` (ResNet-50, strides 2,2,2,1, frozen BN as the code):
             forward + backward of the classification loss and the features' sum, 16×3×512×512.
``stages``   tokenseg's paper pipeline (:func:`~tokenseg.methods.pot.model.paper_stage`: k-means K = 3 on the
             confident pixels, similarity-aware OT with the code's Sinkhorn, plan-weighted prototype
             activation) on the network's output shapes (16, 768, 32, 32), all pairs batched, + backward.
``code``     tokenseg's code pipeline (:func:`~tokenseg.methods.pot.model.code_stage` + :func:`code_fusion`:
             argmax seeds, K = 2 over background + present classes, mean cosine maps) + backward.
``loop``     the same paper stages written the released code's way (``get_seed_aff_x4``): a Python loop
             over images and over all C classes (masking the features of each, skipping absent ones),
             k-means as ``kmeans_pytorch`` runs it (re-written: (N, k, D) broadcast cosine distances,
             per-cluster nonzero/index_select/mean, a host-side stop test every iteration), one code
             Sinkhorn per image on the stack of its classes' problems, then each class's update and
             activation; + backward.
``step``     one whole training step of the method (network + stages + losses + backward + SGD), from
             which the VOC training time is projected (train_aug 10,582 images, batch 16, 6 epochs).

    python benchmarks/bench_pot.py                  # 3 rounds, 2 timed runs each
    python benchmarks/bench_pot.py --quick          # 1 round
    python benchmarks/bench_pot.py --threads 1      # stable per-core figures on a shared machine
    python benchmarks/bench_pot.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_warning, code_sinkhorn, library_kmeans, machine, median, pick_device, sync, table  # noqa: E402

B, C, SIDE, D = 16, 20, 512, 768
GRID = SIDE // 16
VOC_STEPS = (10582 // B) * 6
PAPER_HOURS = 11.3  # Tab. A1, one RTX 3090


def batch_data(device, seed: int = 0, b: int = B, grid: int = GRID):
    """Features with cluster structure (4 L2-normalised blocks as POT's side outputs), a CAM-like
    baseline (a disc per present class, each made of 3 parts with their own feature centre);
    ``b`` images on a ``grid``² feature grid."""
    B, GRID = b, grid  # noqa: N806
    rng = np.random.default_rng(seed)
    N = GRID * GRID
    yy, xx = np.mgrid[:GRID, :GRID]
    feats = rng.normal(size=(B, N, D)).astype(np.float32)
    base = np.zeros((B, C, GRID, GRID), np.float32)
    present = np.zeros((B, C), np.float32)
    counts = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 2, 1]  # 1.6 per image, as VOC train_aug
    for i in range(B):
        for c in rng.choice(C, counts[i % len(counts)], replace=False):
            present[i, c] = 1
            m = min(6, GRID // 4)
            cy, cx, r = rng.uniform(m, GRID - m), rng.uniform(m, GRID - m), rng.uniform(5, 10) * GRID / 32
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
            base[i, c] = np.clip(1.2 - d, 0, 1)
            inside = np.flatnonzero(d.ravel() < 1)
            part = np.minimum(((xx.ravel() - cx + r) / (2 * r / 3)).astype(int).clip(0), 2)
            centres = rng.normal(size=(3, D)) * 0.3
            feats[i, inside] = centres[part[inside]] + rng.normal(size=(len(inside), D))
    f = torch.nn.functional.normalize(torch.from_numpy(feats).view(B, N, 4, D // 4), dim=-1).view(B, N, D)
    f = f.transpose(1, 2).reshape(B, D, GRID, GRID).contiguous()
    return f.to(device), torch.from_numpy(base).to(device), torch.from_numpy(present).to(device)


def options(**kw):
    from tokenseg.methods.pot import POTConfig

    import dataclasses

    return dataclasses.replace(POTConfig(clusters=3), **kw)


# ------------------------------------------------------------------------------ the released code's way
def loop_stages(feats, base, present, tau=0.7, K=3, eps=0.1):
    """Per image, per class, as get_seed_aff_x4 loops (features masked per class, absent ones skipped)."""
    rng = np.random.RandomState(0)
    n, c_f, h, w = feats.shape
    out = feats.new_zeros(n, C, h, w)
    maps = []
    for b in range(n):
        cents, means, rows = [], [], []
        for i in range(C):
            mask = ((base[b, i] > tau).float() * present[b, i])[None]
            class_features = (feats[b] * mask).view(c_f, -1).transpose(0, 1)
            valid = mask.view(-1) > 0
            vf = class_features[valid]
            if vf.size(0) < K:
                continue
            lab, _ = library_kmeans(vf.detach(), K, rng)
            cent = torch.stack([vf[lab == j].mean(0) for j in range(K)])  # with gradient, as theirs
            cents.append(cent)
            means.append(vf.mean(0))  # the class prototype q: the mean of the confident features
            rows.append((i, valid))
        if not cents:
            continue
        full = feats[b].view(c_f, -1).transpose(0, 1)
        fn = full / (full.norm(dim=1, keepdim=True) + 1e-5)
        cn = torch.stack(cents)
        cn = cn / (cn.norm(dim=-1, keepdim=True) + 1e-5)
        sim = torch.einsum("md,pkd->pmk", fn, cn)
        q = torch.stack(means)
        cpq = F.cosine_similarity(torch.stack(cents), q[:, None], dim=-1)
        nu = F.relu(cpq) / F.relu(cpq).sum(-1, keepdim=True)
        with torch.no_grad():
            T = code_sinkhorn(torch.exp(-(1 - sim.detach()) / eps), torch.full((len(cents), h * w), 1.0 / (h * w),
                                                                           device=feats.device), nu.detach())
        for p, (i, valid) in enumerate(rows):
            t = T[p] * valid[:, None]
            p2 = (t.T @ full) / t.sum(0)[:, None]
            act = F.relu(F.cosine_similarity(full[:, None], p2[None], dim=-1))
            m = ((T[p] / T[p].sum(1, keepdim=True)) * act).sum(1)
            maps.append((b, i, (m / (m.max() + 1e-5)).view(h, w)))
    for b, i, m in maps:
        out = out.index_put((torch.tensor([b]), torch.tensor([i])), m[None])
    return out


# ------------------------------------------------------------------------------ variants
def make_variants(device, with_network: bool, b: int = B, side: int = SIDE):
    """The variants (see the module docstring) for ``b`` images at ``side``²: name -> callable."""
    from tokenseg.methods.pot.model import POTNet, code_fusion, code_stage, paper_stage

    B, GRID = b, side // 16  # noqa: N806
    feats0, base, present = batch_data(device, 0, B, GRID)
    valid = torch.ones(B, GRID, GRID, device=device)
    pc = options()
    gen = torch.Generator(device=device)
    variants = {}

    from tokenseg.core.ot import kmeans_pytorch_init

    pairs = torch.nonzero(present > 0)
    X = feats0.flatten(2).transpose(1, 2).contiguous()
    omega = (base[pairs[:, 0], pairs[:, 1]].flatten(1) > pc.tau)
    # the loop's initial points (np.random.RandomState(0), one draw per pair in order), for equal results
    init = kmeans_pytorch_init(X, 3, omega, rng=np.random.RandomState(0), x_index=pairs[:, 0])

    def stages():
        f = feats0.clone().requires_grad_(True)
        st = paper_stage(f, base, present, valid, pc, gen.manual_seed(0), init=init)
        (st.cam.sum() + st.background.sum()).backward()
        return st.cam.detach()

    def code():
        f = feats0.clone().requires_grad_(True)
        cam_logits = (base * 4 - 1).clone()
        maps, vm = code_stage(f, cam_logits, present, valid, 100, gen.manual_seed(0))
        cc, fused = code_fusion(maps, base * present[:, :, None, None], vm, training=True)
        (cc - fused).abs().mean().backward()
        return cc.detach()

    def loop():
        f = feats0.clone().requires_grad_(True)
        cam = loop_stages(f, base, present)
        cam.sum().backward()
        return cam.detach()

    variants.update(stages=stages, code=code, loop=loop)
    if with_network:
        net = POTNet("resnet50", C, False, 16, True, True).to(device).train()
        x = torch.randn(B, 3, side, side, device=device)
        y = present

        def network():
            out = net(x)
            loss = F.multilabel_soft_margin_loss(out["cls_logits"], y) + out["features"].float().mean()
            net.zero_grad(set_to_none=True)
            loss.backward()
            return out["cam"].detach()

        variants["network"] = network

        from tokenseg.config import load_config
        from tokenseg.engine import build_optimizer
        from tokenseg.methods import get_method
        from tokenseg.methods.base import StepContext

        cfg = load_config("pot", ["model.pretrained=false", "pot.backbone=resnet50", "train.amp=none"])
        method = get_method("pot")
        model = method.build(cfg, C).to(device).train()
        opt, _ = build_optimizer(method, model, cfg, 100, 100)
        batch = {"image": x, "labels": y, "valid": valid}

        def step():
            out = method.forward(model, batch, StepContext(0, 0, 100, 100), cfg)
            terms = method.loss(out, batch, None, cfg)
            total = sum(v for k, v in terms.items() if not k.startswith("_"))
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return out["pot_pred"].detach()

        variants["step"] = step
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--no-network", action="store_true", help="only the prototype stages and the loop")
    ap.add_argument("--json", default="", help="write the summary here")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    print(f"bench_pot: batch {B} at {SIDE}² → F (B, {D}, {GRID}, {GRID}); {C} classes, 1.6 present per image; "
          f"K = 3, ε = 0.1; device {device}")
    print(f"machine: {machine()}")
    if (warn := busy_warning(args.threads)) and device.type == "cpu":
        print(warn)
    variants = make_variants(device, not args.no_network)
    outs = {}
    for name, fn in variants.items():  # warm-up
        outs[name] = fn()
        sync(device)
    times = {k: [] for k in variants}
    loads = []
    for r in range(args.rounds):
        for name, fn in variants.items():
            for _ in range(args.repeats):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t)
            loads.append(__import__("os").getloadavg()[0])
            print(f"  round {r + 1} {name:<8} {' '.join(f'{t:.3f}s' for t in times[name][-args.repeats:])}",
                  flush=True)
    med = {k: median(v) for k, v in times.items()}
    rows = []
    for k in variants:
        extra = []
        if "network" in med:
            extra.append(f"{100 * med[k] / med['network']:.1f} %")
        else:
            extra.append("-")
        extra.append(f"{med['loop'] / med[k]:.1f}×" if k in ("stages", "code") else "-")
        rows.append([k, f"{med[k]:.3f}", f"{min(times[k]):.3f}", *extra])
    print()
    print(table(["variant", "median s", "best s", "% of network fwd+bwd", "speed-up vs loop"], rows))
    summary = {"median_s": med, "best_s": {k: min(v) for k, v in times.items()}, "threads": args.threads,
               "device": str(device), "load_average_during": [round(x, 2) for x in loads], "machine": machine()}
    diff = float((outs["stages"] - outs["loop"]).abs().max())
    print(f"max |stages − loop| over the maps: {diff:.2e} (same initial points; the loop normalises with "
          f"+1e-5 as their OT code, tokenseg with a 1e-8 floor)")
    summary["max_abs_diff_stages_vs_loop"] = diff
    if "step" in med:
        hours = med["step"] * VOC_STEPS / 3600
        summary["projected_voc_hours"] = hours
        print(f"projected VOC training ({VOC_STEPS} steps of {B}, 6 epochs of train_aug): {hours:.1f} h at "
              f"{med['step']:.2f} s/step on this {device.type} (the paper: {PAPER_HOURS} h on one RTX 3090; "
              f"data loading and validation not counted)")
    print(f"load average during the runs: median {median(loads):.1f} (min {min(loads):.1f}, max {max(loads):.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
