"""``tokenseg sweep``: a grid over config keys, the chain per point (see :mod:`tokenseg.sweep`)."""
from __future__ import annotations

from .common import config_help


def cmd_sweep(args) -> int:
    from ..sweep import parse_axes, run_sweep

    axes, fixed = parse_axes(args.overrides)
    run_sweep(args.config, axes, fixed, out=args.out, stage=args.stage, progress=not args.quiet)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sweep", help="a grid over any config keys (key=v1,v2,...): train → maps → evaluate per "
                                     "point, resumable; a table (JSON + printed) and a plot of seed mIoU")
    p.add_argument("config", help=config_help())
    p.add_argument("overrides", nargs="*", metavar="key=v1,v2,...",
                   help="swept keys (values separated by commas) and fixed overrides (one value), e.g. "
                        "otpl.top_k=1,3,5,7,10 train.epochs=4")
    p.add_argument("--out", help="sweep folder, one sub-folder per point (default <output_dir>/sweep-<keys>)")
    p.add_argument("--stage", choices=("seeds", "masks"), default="seeds",
                   help="seeds: train, maps, seed mIoU; masks: also pseudo masks and their mIoU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)
