"""CLI subcommands: one module each, exposing `add_arguments(parser)` and `run(args) -> int`.

They are registered by name in `thinkscale.cli.SUBCOMMANDS` and imported only when run.
"""
