"""Core subcommands: demo, train, maps, evaluate, run."""
from __future__ import annotations

import argparse

from ..config import load_config


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name (mctformer-plus, mctformer-v2, mctformer-v1, demo) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args) -> "object":
    return load_config(args.config, args.overrides)


def cmd_demo(args) -> int:
    from ..pipeline import demo

    demo(args.out, overrides=args.overrides, progress=not args.quiet, chain=not args.seeds_only)
    return 0


def cmd_train(args) -> int:
    from ..pipeline import train_step

    cfg = _load(args)
    path = train_step(cfg, resume=args.resume, progress=not args.quiet)
    print(f"checkpoint: {path}")
    return 0


def cmd_maps(args) -> int:
    from ..pipeline import maps_step

    cfg = _load(args)
    out = maps_step(cfg, checkpoint=args.checkpoint, split=args.split, out_dir=args.out, progress=not args.quiet,
                    export_npy=args.export_npy)
    print(f"seeds: {out}")
    return 0


def cmd_evaluate(args) -> int:
    from ..pipeline import evaluate_step

    cfg = _load(args)
    if args.masks:
        from ..data import build_dataset
        from ..evaluate import format_result, save_result
        from ..refine.pseudo import evaluate_masks

        split = args.split or cfg.eval.split
        res = evaluate_masks(args.masks, build_dataset(cfg.data, split), progress=not args.quiet)
        print(format_result(f"masks {args.masks} [{split}]", res))
        if args.json:
            save_result(args.json, res)
        return 0
    results = evaluate_step(cfg, seeds=args.seeds, split=args.split, progress=not args.quiet,
                            allow_pickle=args.allow_pickle)
    if args.json:
        from ..evaluate import save_result

        save_result(args.json, results)
    return 0


def cmd_run(args) -> int:
    from ..pipeline import results_table, run

    cfg = _load(args)
    results = run(cfg, progress=not args.quiet)
    print(results_table(results))
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="train MCTformer+ from scratch on the built-in synthetic dataset, "
                                    "generate and evaluate seeds, write a gallery")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seeds-only", action="store_true",
                   help="stop after the seed table (skip pseudo masks and the segmentation network)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a class-token model (resumable)")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("maps", help="generate seeds (localisation maps) from a checkpoint")
    _config_args(p)
    p.add_argument("--checkpoint", help="checkpoint (default <output_dir>/checkpoint.pt)")
    p.add_argument("--split", help="dataset split (default maps.split)")
    p.add_argument("--out", help="output folder (default <output_dir>/seeds/<split>)")
    p.add_argument("--export-npy", action="store_true",
                   help="with maps.mode=authors: write the authors' .npy dicts instead of .npz")
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("evaluate", help="seed mIoU over a background-threshold grid (or mask mIoU)")
    _config_args(p)
    p.add_argument("--seeds", help="seeds folder: one kind (files) or several (sub-folders)")
    p.add_argument("--masks", help="evaluate label PNGs (pseudo masks, predictions) instead of seeds")
    p.add_argument("--split", help="dataset split (default eval.split)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read non-standard authors' .npy seeds with full unpickling (trusted files only: "
                        "unpickling can run code)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="the whole chain on any dataset: train → maps → evaluate")
    _config_args(p)
    p.set_defaults(func=cmd_run)
