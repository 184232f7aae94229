"""``tokenseg`` command line: one subcommand per pipeline arrow (see README)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .io import TokensegError


def build_parser() -> argparse.ArgumentParser:
    from .commands import MODULES

    parser = argparse.ArgumentParser(
        prog="tokenseg",
        description="Weakly supervised semantic segmentation with class tokens (MCTformer family).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except TokensegError as exc:
        print(f"tokenseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenseg: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
