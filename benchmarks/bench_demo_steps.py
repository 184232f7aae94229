"""What a demo recipe's training costs next to MCTformer+'s ``demo``, per epoch, on this machine now.

The budget rule of the demo recipes (issue 31: a recipe's training time within ~15 % of the ``demo``'s) is
hard to check from whole runs on a shared machine: two runs minutes apart see other loads. This script
times training steps of several recipes *interleaved* in one process (round robin, so a load change hits
them alike): for every recipe and every epoch of its schedule one step (the method's forward at that
epoch — CTI's terms and view 2 switch on by epoch — its losses, backward and the optimizer the engine
builds) on a random batch of the recipe's batch size at the demo's image size. It prints the seconds per
image of each epoch and the whole schedule's cost (sum over its epochs) relative to ``demo``'s.
A method with a memory that must fill before a term counts (CTI's) starts with it full.

    python benchmarks/bench_demo_steps.py                            # demo vs demo-cti, 4 rounds
    python benchmarks/bench_demo_steps.py --recipes demo,demo-cti --rounds 8 --set cti.start_epoch=7
"""
from __future__ import annotations

import argparse
import time

import torch

from tokenseg.config import load_config
from tokenseg.engine import build_optimizer
from tokenseg.methods import StepContext, get_method



def setup(recipe: str, overrides: list[str]) -> dict:
    cfg = load_config(recipe, overrides)
    method = get_method(cfg.model.method)
    torch.manual_seed(0)
    classes = cfg.data.synthetic.num_classes  # the demo's synthetic set (MMCST's prompts need its names)
    model = method.build(cfg, classes).train()
    if hasattr(model, "memory_count"):  # CTI: the cross term counts once the memory is full
        model.memory_count.fill_(model.memory_size)
    B, size = cfg.train.batch_size, cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    keys = list(method.views(cfg)) if method.views is not None else ["image"]
    batch = {k: torch.randn(B, 3, size, size, generator=g) for k in keys}
    batch["labels"] = (torch.rand(B, classes, generator=g) < 0.4).long()
    batch["index"] = torch.arange(B)
    batch["valid"] = torch.ones(B, size, size)  # POT's view extra: the crop covers the whole input
    optimizer, _ = build_optimizer(method, model, cfg, steps_per_epoch=10, total_steps=10 * cfg.train.epochs)
    return {"cfg": cfg, "method": method, "model": model, "batch": batch, "optimizer": optimizer}


def step(run: dict, epoch: int) -> float:
    """Seconds of one training step at ``epoch``."""
    cfg, method, model, batch = run["cfg"], run["method"], run["model"], run["batch"]
    ctx = StepContext(epoch=epoch, step=epoch * 10, total_steps=10 * cfg.train.epochs, steps_per_epoch=10)
    t = time.perf_counter()
    out = method.forward(model, batch, ctx, cfg)
    loss = sum(method.loss(out, batch, ctx, cfg).values())
    run["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    run["optimizer"].step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="demo,demo-cti", help="comma list of presets; the first is the yardstick")
    p.add_argument("--rounds", type=int, default=4, help="timed steps per recipe and epoch (median taken)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every recipe except the first")
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    runs = {r: setup(r, args.set if i else []) for i, r in enumerate(recipes)}
    times: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for r, run in runs.items():
            for e in range(run["cfg"].train.epochs):
                dt = step(run, e) / run["cfg"].train.batch_size
                if rnd:
                    times.setdefault((r, e), []).append(dt)
    per_image = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    ref = sum(per_image[(recipes[0], e)] for e in range(runs[recipes[0]]["cfg"].train.epochs))
    ref_epoch = ref / runs[recipes[0]]["cfg"].train.epochs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; one {recipes[0]} epoch = 1.00")
    for r, run in runs.items():
        n = run["cfg"].train.epochs
        costs = [per_image[(r, e)] / ref_epoch for e in range(n)]
        print(f"{r:12s} batch {run['cfg'].train.batch_size:3d}, {n:2d} epochs: per epoch "
              + " ".join(f"{c:.2f}" for c in costs) + f" -> total {sum(costs):.2f} = {sum(costs) * ref_epoch / ref:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
