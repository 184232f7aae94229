"""What every config-taking subcommand shares: the config argument, overrides, --quiet."""
from __future__ import annotations

import argparse


def config_help() -> str:
    from ..config import available_presets

    return f"a preset ({', '.join(available_presets())}) or a YAML file"


def config_args(p: argparse.ArgumentParser, example: str = "train.epochs=3") -> None:
    p.add_argument("config", help=config_help())
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config overrides, anywhere on the line, e.g. {example}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load(args):
    from ..config import load_config

    return load_config(args.config, args.overrides)


def guard_outputs(cfg, command: str, **paths) -> None:
    """The one check for the files a command writes besides its output folder (``--json``, ``--curve-png``,
    ``-o``, ``--save-masks``): none inside the dataset, checked before any work. Keyword: option name."""
    from ..data.guard import refuse_inside_dataset

    for option, path in paths.items():
        if path:
            refuse_inside_dataset(path, cfg, f"{command} --{option.replace('_', '-')}")
