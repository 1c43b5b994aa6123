"""The `thinkscale` command: one entry point, one subcommand per stage.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `thinkscale --help` stays fast.

Errors: whatever a command raises (bad data, a model folder without a model, a failed worker) is printed
as one line, `thinkscale <command>: error: <file:line: problem>`, with exit status 2 for bad input
(ValueError, OSError) and 1 for any other failure; `-v` adds the traceback (a worker's too).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "data": ("thinkscale.commands.data", "a task's train/test/hard splits as JSONL (arithmetic, countdown, gym:NAME from reasoning-gym)"),
    "sft": ("thinkscale.commands.sft", "supervised fine-tuning on worked solutions (a task's or JSONL), data-parallel with relax"),
    "grpo": ("thinkscale.commands.grpo", "joint GRPO + SPR training: the policy learns from outcome reward, its SPRM head learns to score steps"),
    "eval": ("thinkscale.commands.eval", "sample k answers per question, grade them, report accuracy of each selection strategy vs k"),
    "bench": ("thinkscale.commands.bench", "benchmarks: relax vs torch DDP on an emulated network (root); the cost of SPRM scoring"),
    "serve": ("thinkscale.commands.serve", "an OpenAI-compatible server: chat/completions with reasoning_effort = best of k by the SPRM, batched"),
    "fit-head": ("thinkscale.commands.fit_head", "fit an SPRM head to any model (a folder or smollm2) from the graded outcomes of its own rollouts, resumable"),
    "demo": ("thinkscale.commands.demo", "the whole pipeline on a task: data, SFT, GRPO + head refit, eval at k = 1..32; writes runs/demo/"),
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
    args.verbose = args.verbose or known.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"thinkscale {known.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback is for -v
        print(f"thinkscale {known.command}: {describe_error(error)}", file=sys.stderr)
        if args.verbose:
            details = getattr(error, "details", "")  # a worker's traceback (train.launch.WorkerFailedError)
            print(details if details else traceback.format_exc(), file=sys.stderr)
        return 2 if isinstance(error, (ValueError, OSError)) else 1


def describe_error(error: BaseException) -> str:
    """`error` in one line: its message for bad input (ValueError, OSError), else with its type."""
    brief = getattr(error, "brief", None)  # a failed worker: "worker rank r failed: <its error>"
    if brief is not None:
        return brief
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, OSError) and error.strerror and error.filename:  # not "[Errno 2] No such file ..."
        text = f"{error.strerror}: {error.filename}"
    if isinstance(error, (ValueError, OSError)):
        return f"error: {text}" if text else f"error: {type(error).__name__}"
    return f"error: {type(error).__name__}: {text}" if text else f"error: {type(error).__name__}"


def run() -> None:
    """The `thinkscale` console script and `python -m thinkscale`: `main()`, then exit with its status.
    A command run under torchrun has run a process group: it ends with `relax.comm.exit_process`
    (see there why a normal exit can abort such a process after its work is done)."""
    code = main()
    if "RANK" in os.environ:  # cheap test first: `thinkscale --help` should not import torch
        from thinkscale.relax.comm import exit_process
        from thinkscale.train.launch import under_torchrun

        if under_torchrun():
            exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
