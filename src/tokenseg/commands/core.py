"""Core subcommands: demo, train, maps, evaluate, run."""
from __future__ import annotations


def register(sub) -> None:  # filled in below as the core lands
    pass
