"""What `thinkscale sft` and `thinkscale grpo` share: the checkpoint and failure options, skipping a
finished output, refusing to forget an unfinished one, and running the stage on local workers.
Errors (a bad option, a failed worker) propagate to `thinkscale.cli`, which prints them in one line."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Callable

from thinkscale.commands.argtypes import ensure_writable_dir, non_negative_int, positive_float, positive_int


def add_parallel_arguments(group, algorithm: str, nproc: int = 1, what: str = "") -> None:
    """--nproc and --algorithm (a relax algorithm by name; an unknown one fails before any worker starts)."""
    from thinkscale.relax import algorithms

    group.add_argument("--nproc", type=positive_int, default=nproc,
                       help=f"local worker processes{what} (ignored under torchrun; default %(default)s)")
    group.add_argument("--algorithm", default=algorithm,
                       help=f"relax algorithm, one of: {', '.join(algorithms.names())} (default %(default)s)")


def add_failure_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """--save-every, --keep-checkpoints, --resume, --max-restarts, --collective-timeout."""
    from thinkscale.train.launch import DEFAULT_TIMEOUT_S

    g = parser.add_argument_group("checkpoints and failures (see README: What survives a failure)")
    g.add_argument("--save-every", type=non_negative_int, default=defaults.save_every, metavar="N",
                   help="checkpoint every N steps and after the last one, into OUT/checkpoints/ (0: never); "
                        "a checkpoint is written whole or not at all")
    g.add_argument("--keep-checkpoints", type=positive_int, default=defaults.keep_checkpoints, metavar="K",
                   help="keep the newest K checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in OUT from its newest checkpoint (same options and --nproc); "
                        "on CPU with gradient_allreduce it ends bit-identical to an uninterrupted run")
    g.add_argument("--max-restarts", type=non_negative_int, default=0, metavar="N",
                   help="when a worker fails (an error, killed, out of memory, hung past --collective-timeout), "
                        "restart all workers up to N times; they resume from the newest checkpoint "
                        "(under torchrun, torchrun's own --max-restarts applies)")
    g.add_argument("--collective-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="seconds a worker waits for the others in a collective or the rendezvous before the "
                        "run counts as failed: how long a hung worker can stall the job")


def checkpoint_options(args: argparse.Namespace) -> dict:
    """The stage options that the failure arguments set."""
    return {"save_every": None if args.save_every == 0 else args.save_every,
            "keep_checkpoints": args.keep_checkpoints, "resume": args.resume}


def run_training_stage(stage: str, fn: Callable, options, args: argparse.Namespace,
                       print_summary: Callable[[dict], None], saved_what: str) -> int:
    from thinkscale.train import checkpoint
    from thinkscale.train.launch import launch, restart_count, under_torchrun

    if checkpoint.is_done(options.out) and not args.overwrite:
        print(f"{options.out} already holds a finished {stage} run (use --overwrite to retrain)")
        print_summary(checkpoint.load_state(options.out))
        return 0
    ensure_writable_dir(options.out)
    newest = checkpoint.latest_checkpoint(options.out)
    # (under torchrun a restarted worker runs this command again: it resumes without being asked)
    if newest is not None and not args.resume and not args.overwrite and restart_count() == 0:
        raise ValueError(f"{options.out} holds checkpoints of an unfinished run (newest: {newest.name}): add "
                         "--resume to continue it, or --overwrite to start over")
    if newest is not None and args.resume:
        workers = None if under_torchrun() else args.nproc  # (torchrun decides, and the workers check)
        checkpoint.check_resumable(newest, checkpoint.jsonable(asdict(options)), workers)  # before workers start
    summary = launch(fn, args=(options,), nproc=args.nproc, timeout_s=args.collective_timeout,
                     max_restarts=args.max_restarts)
    if summary is not None:  # rank 0 (or the only process)
        print_summary(summary)
        print(f"{saved_what} saved to {options.out}")
    return 0
