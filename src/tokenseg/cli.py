"""``tokenseg`` command line: one subcommand per pipeline arrow (see README)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .core.errors import TokensegError


def build_parser() -> argparse.ArgumentParser:
    from .commands import MODULES

    parser = argparse.ArgumentParser(
        prog="tokenseg",
        description="Weakly supervised semantic segmentation with class tokens (MCTformer-V1/V2/+, CTI, "
                    "CLIP-ES, OTPL, POT, MMCST). `--threads N` anywhere (or TOKENSEG_THREADS) sets the CPU "
                    "thread count.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _take_threads(argv: list[str]) -> tuple[list[str], int]:
    """``--threads N`` anywhere on the line (or ``TOKENSEG_THREADS``): torch's CPU thread count."""
    import os

    out, threads, i = [], int(os.environ.get("TOKENSEG_THREADS", "0") or 0), 0
    while i < len(argv):
        a = argv[i]
        if a == "--threads" and i + 1 < len(argv):
            threads, i = int(argv[i + 1]), i + 2
            continue
        if a.startswith("--threads="):
            threads = int(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    return out, threads


def _is_override(token: str) -> bool:
    return not token.startswith("-") and "=" in token and token.split("=", 1)[0].replace(".", "").replace(
        "_", "").isalnum()


def main(argv: list[str] | None = None) -> int:
    from .core.device import close_distributed, set_threads

    argv, threads = _take_threads(list(sys.argv[1:] if argv is None else argv))
    set_threads(threads)
    parser = build_parser()
    # key=value overrides may come after the options too ("maps cfg.yaml --split val maps.scales=[1]")
    args, extra = parser.parse_known_args(argv)
    stray = [t for t in extra if not (_is_override(t) and hasattr(args, "overrides"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    clean = False
    try:
        result = args.func(args)
        clean = True
    except TokensegError as exc:
        print(f"tokenseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenseg: interrupted; finished files are kept: re-run the same command to continue (train and "
              "segment train resume from their last checkpoint, as with --resume)", file=sys.stderr)
        return 130
    finally:
        close_distributed(synchronise=clean)
    return int(result or 0)


def run() -> None:
    """The console entry point: ``main()``'s status as the exit code. Under torchrun (``WORLD_SIZE`` > 1)
    a rank leaves with ``os._exit`` once its output is flushed: gloo's threads torn down by the interpreter
    abort a finished rank now and then ("terminate called without an active exception"), which torchrun
    reports as a failed run although every file was written (atomically, before this point)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
