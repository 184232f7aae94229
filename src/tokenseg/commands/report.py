"""``tokenseg report``: a static site (index.html + thumbnails) of one or more runs' seeds."""
from __future__ import annotations

import argparse


def cmd_report(args) -> int:
    from ..report import build_report

    build_report(args.runs, args.out, split=args.split, config=args.config, limit=args.limit,
                 progress=not args.quiet)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="a report to open in a browser: settings, seed table, charts, every image's maps; "
                       "several runs side by side",
        description="Write a self-contained static site (index.html, data.js, thumbnails; no network) from what "
                    "runs wrote: config.yaml, seeds/<split>/<kind>, eval_<kind>.json, pseudo/ and predictions/. "
                    "Thumbnails are made once: a rebuild reuses them and an interrupted build resumes. Nothing is "
                    "written outside --out.",
        epilog="examples:\n"
               "  tokenseg report runs/demo --out runs/demo/report\n"
               "  tokenseg report runs/a runs/b --out compare-a-b      # side by side, per-class and per-image Δ",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (output_dir of train / maps / evaluate)")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (index.html is written there)")
    p.add_argument("--split", help="the seeds' split (default eval.split of each run's config.yaml)")
    p.add_argument("--config", metavar="CONFIG", help="config for runs without config.yaml (training-free methods)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the split")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_report)
