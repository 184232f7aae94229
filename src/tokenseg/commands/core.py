"""Core subcommands: demo, train, maps, evaluate, run."""
from __future__ import annotations

from ..core.errors import TokensegError
from .common import config_args, guard_outputs, load


def cmd_demo(args) -> int:
    from pathlib import Path

    from ..pipeline import demo, demo_preset
    from ..report import build_report

    demo(args.out, overrides=args.overrides, progress=not args.quiet, chain=not args.seeds_only,
         method=args.method)
    out = Path(args.out or f"runs/{demo_preset(args.method)}")
    index = build_report([out], out / "report", progress=not args.quiet)
    print(f"report: {index}  (open it in a browser)")
    return 0


def cmd_train(args) -> int:
    from ..pipeline import train_step

    cfg = load(args)
    path = train_step(cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    print(f"checkpoint: {path}")
    return 0


def cmd_maps(args) -> int:
    from ..pipeline import maps_step

    cfg = load(args)
    out = maps_step(cfg, checkpoint=args.checkpoint, split=args.split, out_dir=args.out, progress=not args.quiet,
                    export_npy=args.export_npy, overwrite=args.overwrite)
    print(f"seeds: {out}")
    return 0


def cmd_evaluate(args) -> int:
    from ..evaluate import format_result, save_result
    from ..pipeline import evaluate_step, results_table

    cfg = load(args)
    guard_outputs(cfg, "evaluate", json=args.json, curve_png=args.curve_png)
    if args.wsol:
        if args.masks:
            raise TokensegError("--wsol evaluates seed maps; it cannot be combined with --masks")
        from ..wsol import wsol_step

        results = wsol_step(cfg, seeds=args.seeds, split=args.split, resize=args.wsol_size,
                            curve_png=args.curve_png, progress=not args.quiet, allow_pickle=args.allow_pickle)
        if args.json:
            save_result(args.json, results)
        return 0
    if args.wsol_size is not None or args.curve_png:
        raise TokensegError("--wsol-size and --curve-png need --wsol")
    if args.masks:
        from ..data import build_dataset
        from ..refine.pseudo import evaluate_masks

        split = args.split or cfg.eval.split
        res = evaluate_masks(args.masks, build_dataset(cfg.data, split, "config key eval.split or the --split option"),
                             progress=not args.quiet, classes=cfg.eval.miou_classes)
        print(format_result(f"masks {args.masks} [{split}]", res, per_class=args.per_class))
        if args.json:
            save_result(args.json, res)
        return 0
    results = evaluate_step(cfg, seeds=args.seeds, split=args.split, progress=not args.quiet,
                            allow_pickle=args.allow_pickle, verbose=args.per_class)
    if not args.per_class:
        print(results_table(results))
    if args.json:
        save_result(args.json, results)
    return 0


def cmd_run(args) -> int:
    from ..pipeline import results_table, run

    cfg = load(args)
    results = run(cfg, progress=not args.quiet)
    if results:
        print(results_table(results))
    return 0


def register(sub) -> None:
    from ..methods import available_methods

    p = sub.add_parser("demo", help="the whole chain on the built-in synthetic dataset, from scratch on the CPU: "
                                    "train, seeds, evaluation table, gallery, pseudo masks, segmentation, and a "
                                    "report to open in a browser (<out>/report/index.html)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/demo-<method>)")
    p.add_argument("--method", default=None,
                   help="the method to demo (its demo-<method> preset), printed next to MCTformer+ "
                        f"(methods: {', '.join(available_methods())})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seeds-only", action="store_true",
                   help="stop after the seed table (skip pseudo masks and the segmentation network)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a method's model (resumable)")
    config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/checkpoint.pt (a run with the same settings does so anyway; "
                        "other settings stop with the differing keys)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over, replacing the checkpoint in output_dir (needed when the settings changed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("maps", help="generate seeds (localisation maps) from a checkpoint, or with a "
                                    "training-free method (clip-es)")
    config_args(p, "maps.scales=[1.0,0.5]")
    p.add_argument("--checkpoint", help="checkpoint (default <output_dir>/checkpoint.pt)")
    p.add_argument("--split", help="dataset split (default maps.split)")
    p.add_argument("--out", help="output folder (default <output_dir>/seeds/<split>)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo seeds already in the folder (needed when the settings changed)")
    p.add_argument("--export-npy", action="store_true",
                   help="with maps.mode=authors: write the authors' .npy dicts instead of .npz")
    p.set_defaults(func=cmd_maps)

    p = sub.add_parser("evaluate", help="seed mIoU over a background-threshold grid, mask mIoU (--masks) or "
                                        "WSOL PxAP / pIoU (--wsol)")
    config_args(p, "eval.early_stop=true")
    p.add_argument("--seeds", help="seeds folder: one kind (files) or several (sub-folders)")
    p.add_argument("--masks", help="evaluate label PNGs (pseudo masks, predictions) instead of seeds")
    p.add_argument("--split", help="dataset split (default eval.split)")
    p.add_argument("--json", help="also write the results (with per-class IoU and the curve) to this JSON file")
    p.add_argument("--per-class", action="store_true", help="print the IoU of every class, not only the summary")
    p.add_argument("--wsol", action="store_true",
                   help="WSOL evaluation: PxAP and pIoU of each image's ground-truth class maps "
                        "(clovaai/wsolevaluation protocol)")
    p.add_argument("--wsol-size", type=int, metavar="N",
                   help="with --wsol: evaluate at N×N (default eval.wsol_size = 224); 0: at mask resolution")
    p.add_argument("--curve-png", metavar="FILE", help="with --wsol: write the pixel precision-recall curve(s)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read non-standard authors' .npy seeds with full unpickling (trusted files only: "
                        "unpickling can run code)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="the whole chain on any dataset: train (unless training-free) → maps → evaluate")
    config_args(p)
    p.set_defaults(func=cmd_run)
