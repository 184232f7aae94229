"""CLI subcommands. Each module here has ``register(subparsers)``; add new modules to ``MODULES``."""
MODULES = [
    "tokenseg.commands.core",
    "tokenseg.commands.data",
    "tokenseg.commands.convert",
    "tokenseg.commands.post",
    "tokenseg.commands.sweep",
    "tokenseg.commands.report",
]
