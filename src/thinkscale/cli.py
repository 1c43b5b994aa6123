"""The `thinkscale` command: one entry point, one subcommand per stage.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `thinkscale --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("thinkscale.commands.data", "a built-in task's train/test/hard splits as JSONL (arithmetic, countdown)"),
    "sft": ("thinkscale.commands.sft", "supervised fine-tuning on worked solutions (built-in task or JSONL), data-parallel with relax"),
    "grpo": ("thinkscale.commands.grpo", "joint GRPO + SPR training: the policy learns from outcome reward, its SPRM head learns to score steps"),
    "eval": ("thinkscale.commands.eval", "sample k answers per question, grade them, report accuracy of each selection strategy vs k"),
    "bench": ("thinkscale.commands.bench", "benchmarks: relax vs torch DDP on an emulated network (root); the cost of SPRM scoring"),
    "serve": ("thinkscale.commands.serve", "an OpenAI-compatible server: chat/completions with reasoning_effort = best of k by the SPRM, batched"),
    "demo": ("thinkscale.commands.demo", "the whole pipeline on a built-in task: data, SFT, GRPO + head refit, eval at k = 1..32; writes runs/demo/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinkscale",
        description="Train reasoning models with relaxed data parallelism and scale them at test time.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        p.set_defaults(_module=module_name)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(known._module)
    # Re-parse with the chosen subcommand's full argument list.
    sub_parser = argparse.ArgumentParser(
        prog=f"thinkscale {known.command}", description=SUBCOMMANDS[known.command][1]
    )
    sub_parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(sub_parser)
    command_at = argv.index(known.command)
    rest = argv[:command_at] + argv[command_at + 1:]
    args = sub_parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if (args.verbose or known.verbose) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
